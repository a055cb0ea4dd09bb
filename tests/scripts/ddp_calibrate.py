"""Calibrate static quantization and score pruning importance on this process's share of the batches.

Run alone (one process: all batches) or under `accelerate launch` by tests/test_distributed.py, which also
imports ``results`` to compute the one-process reference in its own process. Writes ``OUT/rank<r>.pt``: every
activation quantizer's scale / zero point (/ PTF exponents), every importance score and every kept unit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vitcompress import dist
from vitcompress.data import ImageTensorDataset, dataset_info
from vitcompress.methods import get_method
from vitcompress.methods.prune.groups import find_groups
from vitcompress.methods.prune.importance import importance_scores, magnitude_importance
from vitcompress.methods.prune.select import plan_pruning
from vitcompress.methods.prune.structured import calibration_batches, count_parameters
from vitcompress.methods.quant.qmodules import ActQuantizer
from vitcompress.models import ModelSpec, create_model
from vitcompress.study.context import StepContext
from vitcompress.train import TrainConfig

CALIB_IMAGES = 256  # 4 batches of 64: two per process under 2 processes
QUANT = [("ptq.static", {"calibrator": c, "quant_attn_matmul": True}) for c in ("minmax", "ema", "percentile", "omse")]
QUANT += [("ptq.fqvit", {"bits": "w8a8att4"}), ("ptq.fqvit", {"bits": "w8a8att8", "ptf": False, "lis": False,
                                                              "calibrator": "percentile"})]
# (criterion, attention unit): KL by whole heads and by channel chunks, Taylor by heads.
PRUNE = [("taylor", "head"), ("kl", "head"), ("kl", "dim")]


def results(work: Path) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)  # the same float arithmetic in every process and in the test's own
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (CALIB_IMAGES,), generator=g)
    images = torch.randint(0, 255, (CALIB_IMAGES, 1, 28, 28), generator=g, dtype=torch.uint8)
    ds = ImageTensorDataset(images, labels, dataset_info("fashion-mnist"), "train", "synthetic")
    torch.manual_seed(0)
    model = create_model(ModelSpec("vitc_micro")).eval()
    ctx = StepContext(ds, 28, 1, 10, 0, work, TrainConfig(mixed_precision="no"), calib_images=CALIB_IMAGES,
                      progress=False)
    out: dict[str, torch.Tensor] = {}
    for i, (name, params) in enumerate(QUANT):
        method = get_method(name)
        step = method.apply(model, method.config_cls(**params), ctx)
        out[f"q{i}/calib_images"] = torch.tensor(step.meta["calib_images"])
        for mod_name, mod in step.model.named_modules():
            if isinstance(mod, ActQuantizer) and not mod.fixed:
                for buf in ("scale", "zero_point", "alpha"):
                    if hasattr(mod, buf):
                        out[f"q{i}/{mod_name}.{buf}"] = getattr(mod, buf).clone()
    groups = find_groups(model)
    batches = calibration_batches(ctx, CALIB_IMAGES // 64)
    out["prune/batches"] = torch.tensor(len(batches))
    for criterion, unit in PRUNE:
        scores = importance_scores(criterion, model, groups, batches, chunks=4, attention_unit=unit)  # type: ignore[arg-type]
        plans, _ = plan_pruning(groups, scores, magnitude_importance(model, groups), ratio=0.3,
                                total_params=count_parameters(model), attention=unit, min_keep=0.1)
        for j, s in enumerate(scores):
            out[f"{criterion}-{unit}/{j}.units"] = s.units
            if s.heads is not None:
                out[f"{criterion}-{unit}/{j}.heads"] = s.heads
        for b, plan in enumerate(plans.blocks):
            out[f"{criterion}-{unit}/plan{b}.heads"] = torch.tensor(plan.heads)
            out[f"{criterion}-{unit}/plan{b}.dims"] = torch.tensor(plan.dims)
            out[f"{criterion}-{unit}/plan{b}.mlp"] = torch.tensor(plan.mlp)
    return out


if __name__ == "__main__":
    dist.init_if_launched("no")
    out_dir = Path(sys.argv[1])
    res = results(out_dir / f"work{dist.rank()}")
    torch.save(res, out_dir / f"rank{dist.rank()}.pt")
    dist.shutdown()
