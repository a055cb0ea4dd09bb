"""Every registered method, through the same checks: apply, finite logits, save -> load gives the same model."""

from __future__ import annotations

import pytest
import torch
from conftest import synthetic_train_set

from vitcompress.artifact import load_artifact, save_artifact
from vitcompress.config import from_dict, to_dict
from vitcompress.data import ImageTensorDataset
from vitcompress.methods import list_methods
from vitcompress.models import ModelSpec, create_model
from vitcompress.study.context import StepContext
from vitcompress.train import TrainConfig

SPEC = ModelSpec("vitc_micro")


def _fake_train_set(n: int = 128) -> ImageTensorDataset:
    return synthetic_train_set(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model(SPEC)
    ds = _fake_train_set()
    cfg = TrainConfig(epochs=1, batch_size=32, lr=3e-3, mixed_precision="no")
    ctx = StepContext(ds, 28, 1, 10, 0, tmp_path_factory.mktemp("base"), cfg, progress=False)
    model = ctx.fit(model).model
    return model, ds


@pytest.mark.parametrize("spec", list_methods(), ids=lambda m: m.name)
def test_method_applies_and_round_trips(spec, trained, tmp_path) -> None:
    if spec.missing_package():
        pytest.skip(spec.missing_package())  # an opt-in package (diffq); its row is skipped in studies too
    base, ds = trained
    cfg = spec.config_cls()  # every setting has a default
    assert from_dict(spec.config_cls, to_dict(cfg)) == cfg
    ctx = StepContext(ds, 28, 1, 10, 0, tmp_path / "work",
                      TrainConfig(epochs=1, batch_size=32, mixed_precision="no", max_steps_per_epoch=2),
                      teacher=base, calib_images=64, progress=False)
    import copy

    out = spec.apply(copy.deepcopy(base), cfg, ctx)
    model = out.model.eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.inference_mode():
        y = model(x)
    assert y.shape == (5, 10)
    assert torch.isfinite(y).all()
    meta = {"model": SPEC.to_dict(), "steps": [{"method": spec.name, "config": to_dict(cfg), "meta": out.meta}]}
    save_artifact(model, tmp_path / "art", meta)
    loaded = load_artifact(tmp_path / "art")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), y, atol=1e-4, rtol=1e-4)
