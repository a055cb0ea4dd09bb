"""Under `accelerate launch` with 2 CPU processes (gloo): training follows the single-process loss curve,
calibration and pruning importance combine to the single-process result, a whole study writes each row once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"


def _launch(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``accelerate launch`` 2 processes on the CPU with the gloo backend.

    ``--cpu`` alone would start a single process (accelerate runs several CPU processes only
    through MPI); ``--multi_gpu`` starts them through torchrun, and with no visible GPU each
    process joins a gloo group on the CPU.
    """
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate CLI not installed")
    with socket.socket() as s:  # a free port, so that two runs at once do not meet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                           *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path) -> None:
    single = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one"), "32"], capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = _launch(str(SCRIPT), str(tmp_path / "two"), "16")
    assert multi.returncode == 0, multi.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "world.json").read_text()) == 2
    one = json.loads((tmp_path / "one" / "hist.json").read_text())
    two = json.loads((tmp_path / "two" / "hist.json").read_text())
    assert len(one) == len(two) == 2
    # Same data, same global batch, averaged gradients: equal up to float summation order.
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-2


@pytest.mark.slow
def test_a_whole_study_under_accelerate_launch_writes_each_row_once(tmp_path) -> None:
    import yaml
    from conftest import FMNIST, tiny_recipe_dict

    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed")
    d = tiny_recipe_dict()
    # Two batches of calibration images: each process calibrates on one, the scales are merged.
    d["experiments"].append({"name": "Static", "steps": [{"ptq.static": {"calib_images": 128}}]})
    # Every other family's training loop under the same launch: QAT, distillation, a pruning fine-tune
    # (with Taylor scores reduced across processes), a low-rank fine-tune.
    d["experiments"] += [
        {"name": "LSQ", "steps": [{"qat.lsq": {"bits": 4, "epochs": 1, "train_subset": 256}}]},
        {"name": "DeiT", "steps": [{"distill": {"student": "same", "epochs": 1, "train_subset": 256}}]},
        {"name": "Pruned", "steps": [{"prune.structured": {"ratio": 0.2, "importance": "taylor",
                                                           "finetune_subset": 256}}]},
        {"name": "SVD", "steps": [{"lowrank.svd": {"keep": 0.5, "finetune_epochs": 1, "finetune_images": 256}}]},
    ]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(d))
    res = _launch("-m", "vitcompress", "study", str(recipe), "--out", str(tmp_path / "run"), "--no-progress",
                  timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["Vanilla ViT", "Dynamic Quantization", "Static", "LSQ", "DeiT", "Pruned",
                                         "SVD"]
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    meta = json.loads((tmp_path / "run" / rows[2]["artifact"]).with_name("meta.json").read_text())
    assert meta["steps"][-1]["meta"]["calib_images"] == 128  # counted over both processes


CALIBRATE = Path(__file__).parent / "scripts" / "ddp_calibrate.py"


@pytest.fixture(scope="module")
def two_process_calibration(tmp_path_factory) -> tuple[list[dict], dict]:
    """Each of 2 gloo processes calibrates and scores its half of the batches; and one process on all of them."""
    import importlib.util

    import torch

    out = tmp_path_factory.mktemp("calib")
    res = _launch(str(CALIBRATE), str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    spec = importlib.util.spec_from_file_location("ddp_calibrate", CALIBRATE)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    before = torch.get_num_threads()
    try:
        single = script.results(out / "single")  # not distributed here: every batch in this process
    finally:
        torch.set_num_threads(before)
    return ranks, single


@pytest.mark.slow
def test_calibration_across_processes_gives_the_one_process_scales(two_process_calibration) -> None:
    import torch

    (r0, r1), single = two_process_calibration
    assert int(r0["prune/batches"]) == int(r1["prune/batches"]) == 2 and int(single["prune/batches"]) == 4
    quant = [k for k in single if k.startswith("q")]
    assert len([k for k in quant if k.endswith(".alpha")]) >= 5  # PTF LayerNorm inputs are among them
    assert all(int(r0[f"q{i}/calib_images"]) == 256 for i in range(6))
    for key in quant:
        # The same on both processes, bit for bit, and the same as one process that saw every batch.
        assert torch.equal(r0[key], r1[key]), key
        assert torch.equal(r0[key], single[key]), key


@pytest.mark.slow
def test_importance_across_processes_cuts_the_one_process_units(two_process_calibration) -> None:
    import torch

    (r0, r1), single = two_process_calibration
    scores = [k for k in single if k.endswith((".units", ".heads")) and "/plan" not in k]
    plans = [k for k in single if "/plan" in k]
    assert scores and plans
    for key in scores:
        assert torch.equal(r0[key], r1[key]), key
        # Sums over batches, added in another order: equal up to float64 rounding.
        torch.testing.assert_close(r0[key], single[key], rtol=1e-9, atol=1e-12)
        assert single[key].abs().sum() > 0, key
    for key in plans:
        assert torch.equal(r0[key], r1[key]) and torch.equal(r0[key], single[key]), key
    # Something was cut, so "the same cut" is not the trivial one.
    assert any(len(single[k]) < 64 for k in plans if k.endswith(".mlp"))


def _observers():
    from vitcompress.methods.quant.observers import (
        EmaObserver,
        MinMaxObserver,
        OmseObserver,
        PercentileObserver,
        PowerOfTwoObserver,
    )

    # Samples far smaller than what they see, so that merging has to choose which values to keep.
    return {"minmax": MinMaxObserver, "ema": EmaObserver,
            "percentile": lambda: PercentileObserver(99.0, max_samples=300, seed=3),
            "omse": lambda: OmseObserver(max_samples=300), "ptf": lambda: PowerOfTwoObserver(8, max_rows=40)}


@pytest.mark.parametrize("name", ["minmax", "ema", "percentile", "omse", "ptf"])
def test_observer_states_merge_into_the_one_process_observer(name) -> None:
    """In-process check of what calibrate() does across processes: 2 halves of the batches, merged, = all."""
    import pickle

    import torch

    make = _observers()[name]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 10, 8, generator=g) * (i + 1) + i for i in range(6)]  # 320 values, 40 rows each
    one = make()
    for x in batches:
        one.update(x)
    halves = [make(), make()]
    halves[1].batch = 3  # the global index of its first batch, as calibrate() sets it
    for i, x in enumerate(batches):
        halves[i // 3].update(x)
    states = pickle.loads(pickle.dumps([h.state() for h in halves]))  # as all_gather_object sends them
    for h in halves:
        h.merge(states)
    if name == "ptf":
        want = one.ptf_params(255, 3)
        assert torch.equal(one.sample.values(), halves[0].sample.values())
        for h in halves:
            got = h.ptf_params(255, 3)
            assert got[:2] == want[:2] and torch.equal(got[2], want[2])
        return
    want = one.clip_range(0, 255)
    if name == "ema":  # later batches count more: not the plain min/max
        assert want != (one.lo, one.hi)
    for h in halves:
        assert h.clip_range(0, 255) == want and h.qparams(0, 255) == one.qparams(0, 255)
        if name in ("percentile", "omse"):
            assert len(h.sample.values()) == 300
            assert torch.equal(h.sample.values(), one.sample.values())
