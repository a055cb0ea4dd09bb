from __future__ import annotations

import pytest
import torch

from vitcompress.data import ImageTensorDataset, dataset_info
from vitcompress.errors import VitcompressError
from vitcompress.models import ModelSpec, create_model
from vitcompress.train import CKPT_FILE, TrainConfig, TrainingDiverged, fit, lr_at


def _data(n: int = 256) -> ImageTensorDataset:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 40, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, 0, (y % 5) * 5:(y % 5) * 5 + 5, :] = 200 if y < 5 else 120
    return ImageTensorDataset(images, labels, dataset_info("fashion-mnist"), "train", "synthetic")


CFG = TrainConfig(epochs=3, batch_size=32, lr=3e-3, mixed_precision="no", warmup_epochs=0.5)


def _fit(tmp, cfg=CFG, **kw):
    torch.manual_seed(0)
    return fit(create_model(ModelSpec("vitc_micro")), _data(), cfg, work_dir=tmp, img_size=28, in_chans=1,
               seed=0, progress=False, **kw)


def test_training_lowers_the_loss_and_writes_a_checkpoint(tmp_path) -> None:
    res = _fit(tmp_path)
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 3
    assert losses[-1] < losses[0] * 0.9
    assert (tmp_path / CKPT_FILE).is_file()
    assert not res.model.training


def test_resume_after_a_crash_gives_the_uninterrupted_result(tmp_path) -> None:
    full = _fit(tmp_path / "full").model

    calls = {"n": 0}

    def crashing_loss(model, x, y):
        calls["n"] += 1
        if calls["n"] > 8 + 2:  # 8 steps per epoch: crash early in epoch 2
            raise KeyboardInterrupt
        return torch.nn.functional.cross_entropy(model(x), y, label_smoothing=CFG.label_smoothing)

    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "crash", loss_fn=crashing_loss)
    resumed = _fit(tmp_path / "crash")
    assert resumed.resumed_from_epoch == 1
    for (k, a), b in zip(full.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k, atol=1e-5, rtol=1e-5)


def test_nan_loss_stops_with_a_clear_error(tmp_path) -> None:
    def nan_loss(model, x, y):
        return model(x).sum() * float("nan")

    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        _fit(tmp_path, loss_fn=nan_loss)


def test_schedule_warms_up_then_decays_to_min_lr() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5)
    lrs = [lr_at(s, 100, 10, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-5, abs=2e-6)


def test_too_few_images_for_one_batch(tmp_path) -> None:
    with pytest.raises(VitcompressError, match="lower train.batch_size"):
        _fit(tmp_path, TrainConfig(epochs=1, batch_size=1024, mixed_precision="no"))


def test_a_trained_model_carries_nothing_of_accelerate_and_trains_again(tmp_path) -> None:
    # accelerate marks a prepared model and never moves it again (on a GPU a second fit of the same
    # object stayed on the CPU), and under mixed precision it swaps `forward` for an autocast wrapper.
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-3, mixed_precision="bf16")
    model = create_model(ModelSpec("vitc_micro"))
    x = _data(8).images.float() / 255
    for run in ("first", "second"):  # gates then fine-tune: the same object through fit twice
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model = fit(model, _data(), cfg, work_dir=tmp_path / run, img_size=28, in_chans=1, progress=False).model
        assert not hasattr(model, "_is_accelerate_prepared") and "forward" not in vars(model)
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it did train
        with torch.no_grad():
            out = model(x)
            assert out.dtype == torch.float32
            assert torch.equal(out, type(model).forward(model, x))  # plain fp32, no autocast left on


def test_a_forward_the_model_set_itself_survives_training(tmp_path) -> None:
    model = create_model(ModelSpec("vitc_micro"))
    own = model.forward
    model.forward = own  # an instance-level forward, as a wrapper library might set
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-3, mixed_precision="bf16")
    model = fit(model, _data(), cfg, work_dir=tmp_path, img_size=28, in_chans=1, progress=False).model
    assert vars(model)["forward"] is own


def test_training_uses_deterministic_cudnn_and_restores_the_setting(tmp_path) -> None:
    import torch.backends.cudnn as cudnn

    seen = []

    def loss(model, x, y):
        seen.append((cudnn.deterministic, cudnn.benchmark))
        return torch.nn.functional.cross_entropy(model(x), y)

    before = cudnn.deterministic, cudnn.benchmark
    cudnn.benchmark = True
    try:
        _fit(tmp_path, TrainConfig(epochs=1, batch_size=64, mixed_precision="no"), loss_fn=loss)
        assert seen and set(seen) == {(True, False)}
        assert (cudnn.deterministic, cudnn.benchmark) == (before[0], True)
    finally:
        cudnn.deterministic, cudnn.benchmark = before
