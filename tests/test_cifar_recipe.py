"""The study's own setting, offline: the bundled cifar10 recipe, every experiment, scaled down.

Same experiments and settings as ``recipes/cifar10.yaml``; tiny sizes: CIFAR-10 fixture files in the
exact pickle layout (30 train / 10 test images), a 2-block ViT-Ti baseline at 32 px instead of ViT-B/16
at 224, DeiT-Ti students for the DeiT rows, Nyström landmarks scaled to the 5 tokens. The baseline and
the students come from local checkpoint files (224 px, 1000 classes, as hub weights would be), through
the keys the recipe's comments name: nothing is downloaded, and every row must finish.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import timm
import torch
import yaml
from fixtures_data import write_cifar10

from vitcompress.methods import get_method
from vitcompress.study import parse_recipe, run_study

pytestmark = pytest.mark.slow


def _scaled_down(root: Path, baseline_ckpt: Path, students: dict[str, Path]) -> dict:
    recipe = yaml.safe_load(resources.files("vitcompress.recipes").joinpath("cifar10.yaml").read_text())
    recipe["data"] = {"name": "cifar10", "root": str(root), "download": False, "calib_images": 8}
    b = recipe["baseline"]
    assert b["model"] == "vit_base_patch16_224" and b["pretrained"] is True
    b.update(model="vit_tiny_patch16_224", pretrained=False, checkpoint=str(baseline_ckpt), img_size=32,
             model_kwargs={"depth": 2})
    b["train"].update(epochs=1, batch_size=8, mixed_precision="no")
    recipe["measure"] = {"batch_size": 4, "repeats": 1, "warmup": 0, "min_repeat_seconds": 0.0,
                         "latency_samples": 2, "eval_batch_size": 16, "interleave": False}
    for exp in recipe["experiments"]:
        for step in exp["steps"]:
            (method, cfg), = step.items()
            if method in ("distill", "train"):
                name = cfg["student"].replace("deit_base", "deit_tiny")  # DeiT-B's rows get DeiT-Ti's layout
                assert cfg.pop("pretrained") is True
                cfg.update(student=name, checkpoint=str(students[name]), train_subset=16)
            if method == "lowrank.nystrom":
                cfg["landmarks"] = max(2, cfg["landmarks"] * 5 // 197)  # the study's m/n on 5 tokens
            if method == "tokens.merge":
                cfg["r"] = 1
            if method.startswith("prune."):
                cfg["finetune_subset"] = 16
            if method == "prune.structured":
                cfg["calib_batches"] = 1
    return recipe


def test_the_cifar10_recipe_runs_end_to_end_offline(tmp_path: Path, one_thread) -> None:
    write_cifar10(tmp_path / "data")
    torch.manual_seed(0)
    # Hub-shaped checkpoints: 224 px, 1000 classes (the head is re-initialised, pos_embed resampled).
    base = tmp_path / "vit_tiny.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model("vit_tiny_patch16_224", depth=2).state_dict(), str(base))
    student = tmp_path / "deit_tiny_distilled.pth"
    torch.save(timm.create_model("deit_tiny_distilled_patch16_224").state_dict(), student)
    recipe = parse_recipe(_scaled_down(tmp_path / "data", base, {"deit_tiny_distilled_patch16_224": student}),
                          "cifar10 (scaled down)")
    assert len(recipe.experiments) == 26
    res = run_study(recipe, tmp_path / "run", progress=False, log=lambda m: None)
    failed = {r["name"]: r["error"] for r in res.rows if r["status"] != "ok"}
    if get_method("qat.diffq").missing_package():  # opt-in (CC BY-NC): the row is skipped with how to install it
        assert {r["name"]: r["status"] for r in res.rows}["DIFFQ with diffq"] == "skipped"
        assert "pip install" in failed.pop("DIFFQ with diffq")
    assert not failed, failed
    ran = [r for r in res.rows if r["status"] == "ok"]
    assert len(res.rows) == 27 and all(r["n_test"] == 10 for r in ran)
    rows = {r["name"]: r for r in res.rows}
    assert rows["DeiT tiny"]["model"] == "deit_tiny_distilled_patch16_224"
    assert rows["Static int8 (minmax)"]["int_arithmetic"] is True
