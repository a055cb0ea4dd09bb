"""Chains: each step gets the previous step's model; shared prefixes are built once."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import tiny_recipe_dict

from vitcompress.artifact import load_artifact, save_artifact
from vitcompress.config import to_dict
from vitcompress.methods import METHODS, StepOutput, get_method
from vitcompress.methods.quant.dynamic import DynamicQuantConfig
from vitcompress.study import parse_recipe, run_study
from vitcompress.study.executors import shared_prefixes

pytestmark = pytest.mark.usefixtures("needs_fmnist")


@dataclasses.dataclass(frozen=True)
class ScaleHeadConfig:
    factor: float = 2.0


def _scale_head(model, cfg, ctx):
    model.head.weight.data *= cfg.factor
    return StepOutput(model)


@pytest.fixture
def counting(monkeypatch):
    """Register a float step `test.scale_head` and count calls of every step."""
    calls: dict[str, int] = {}

    def counted(name, fn):
        def wrapper(model, cfg, ctx):
            calls[name] = calls.get(name, 0) + 1
            return fn(model, cfg, ctx)
        return wrapper

    get_method("ptq.dynamic")  # load the registry first
    monkeypatch.setitem(METHODS, "test.scale_head", METHODS["ptq.dynamic"].__class__(
        "test.scale_head", "test", "scale the head", ScaleHeadConfig, counted("test.scale_head", _scale_head), None))
    dyn = METHODS["ptq.dynamic"]
    monkeypatch.setitem(METHODS, "ptq.dynamic", dataclasses.replace(dyn, apply=counted("ptq.dynamic", dyn.apply)))
    return calls


def test_shared_prefix_is_built_once_and_chain_equals_steps_by_hand(tmp_path, counting) -> None:
    d = tiny_recipe_dict()
    d["experiments"] = [
        {"name": "scaled", "steps": [{"test.scale_head": {"factor": 3.0}}]},
        {"name": "scaled + int8", "steps": [{"test.scale_head": {"factor": 3.0}}, {"ptq.dynamic": {}}]},
        {"name": "int8", "steps": [{"ptq.dynamic": {}}]},
    ]
    recipe = parse_recipe(d)
    assert shared_prefixes(list(recipe.experiments)) == [recipe.experiments[1].steps[:1]]
    res = run_study(recipe, tmp_path / "run", progress=False, log=lambda m: None)
    assert counting == {"test.scale_head": 1, "ptq.dynamic": 2}
    rows = {r["name"]: r for r in res.rows}

    # By hand: baseline -> scale -> quantize gives the chain's saved model.
    base = load_artifact((tmp_path / "run" / rows["Vanilla ViT"]["artifact"]).parent)
    by_hand = copy.deepcopy(base)
    by_hand.head.weight.data *= 3.0
    out = get_method("ptq.dynamic").apply(by_hand, DynamicQuantConfig(), None)
    chained = load_artifact((tmp_path / "run" / rows["scaled + int8"]["artifact"]).parent)
    meta = json.loads((tmp_path / "run" / rows["scaled + int8"]["artifact"]).with_name("meta.json").read_text())
    # Saved as the study saves after a quantization step (float16 for what stays float), then read back.
    save_artifact(out.model, tmp_path / "by_hand", meta | {"steps": meta["steps"][:1] + [
        {"method": "ptq.dynamic", "config": to_dict(DynamicQuantConfig()), "meta": out.meta}]}, small_tensors="float16")
    by_hand = load_artifact(tmp_path / "by_hand")
    x = torch.randn(6, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(chained(x), by_hand(x))
    assert [s["method"] for s in meta["steps"]] == ["test.scale_head", "ptq.dynamic"]
