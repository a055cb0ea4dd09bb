"""Distillation: the losses against hand computations, the DeiT token student, the methods, save/load, a study."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from conftest import synthetic_train_set, tiny_recipe_dict
from safetensors.torch import save_file
from timm.models.deit import VisionTransformerDistilled

from vitcompress.artifact import load_artifact, save_artifact
from vitcompress.config import from_dict, to_dict
from vitcompress.data import ImageTensorDataset, make_loader
from vitcompress.errors import VitcompressError
from vitcompress.measure import uses_integer_kernels
from vitcompress.methods import get_method, parse_config
from vitcompress.methods.distill.losses import (
    deit_distillation_loss,
    hard_distillation_loss,
    soft_distillation_loss,
    soft_kl,
)
from vitcompress.methods.distill.method import DistillConfig
from vitcompress.methods.distill.students import init_from_teacher
from vitcompress.models import ModelSpec, create_model
from vitcompress.study import parse_recipe, run_study
from vitcompress.study.context import StepContext
from vitcompress.study.recipe import Step
from vitcompress.train import TrainConfig

SPEC = ModelSpec("vitc_micro")
S = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.5, 0.3]])
T = torch.tensor([[1.0, 3.0, 0.0], [-0.5, 0.2, 2.5]])
Y = torch.tensor([0, 1])


def _log_softmax(row: list[float], tau: float = 1.0) -> list[float]:
    z = [v / tau for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def _hand_ce(logits: torch.Tensor, labels: list[int]) -> float:
    return -sum(_log_softmax(row)[y] for row, y in zip(logits.tolist(), labels)) / len(labels)


def _hand_kl(s: torch.Tensor, t: torch.Tensor, tau: float) -> float:
    total = 0.0
    for rs, rt in zip(s.tolist(), t.tolist()):
        ls, lt = _log_softmax(rs, tau), _log_softmax(rt, tau)
        total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))  # KL(p_t || p_s)
    return total / len(s)


def test_soft_loss_equals_hand_computation_with_tau_squared() -> None:
    for alpha, tau in [(0.5, 3.0), (0.1, 1.0), (0.7, 2.0)]:
        want = (1 - alpha) * _hand_ce(S, Y.tolist()) + alpha * tau**2 * _hand_kl(S, T, tau)
        got = soft_distillation_loss(S, T, Y, alpha=alpha, tau=tau).item()
        assert got == pytest.approx(want, rel=1e-5)
    # The teacher term alone carries τ²: doubling τ scales the KL's weight by 4.
    kl2 = _hand_kl(S, T, 2.0)
    assert soft_distillation_loss(S, T, Y, alpha=1.0, tau=2.0).item() == pytest.approx(4 * kl2, rel=1e-5)
    assert soft_kl(S, T, 2.0).item() == pytest.approx(kl2, rel=1e-5)
    # Direction: the teacher is the target; KL(p_t || p_s) != KL(p_s || p_t) on these logits.
    assert abs(_hand_kl(S, T, 1.0) - _hand_kl(T, S, 1.0)) > 1e-3
    assert soft_kl(S, T, 1.0).item() == pytest.approx(_hand_kl(S, T, 1.0), rel=1e-5)
    assert soft_kl(S, S, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_hard_loss_uses_the_teachers_argmax() -> None:
    teacher_labels = T.argmax(-1).tolist()  # [1, 2]: not the true labels
    assert teacher_labels != Y.tolist()
    want = 0.5 * _hand_ce(S, Y.tolist()) + 0.5 * _hand_ce(S, teacher_labels)
    assert hard_distillation_loss(S, T, Y).item() == pytest.approx(want, rel=1e-5)
    # Only the argmax matters: a sharper teacher with the same argmax gives the same loss.
    assert hard_distillation_loss(S, 10 * T, Y).item() == pytest.approx(want, rel=1e-6)
    agree = torch.nn.functional.one_hot(Y, 3).float()
    assert hard_distillation_loss(S, agree, Y).item() == pytest.approx(_hand_ce(S, Y.tolist()), rel=1e-5)


def test_deit_loss_splits_label_and_teacher_between_heads() -> None:
    cls, dist = S, S.flip(-1)
    want = 0.5 * _hand_ce(cls, Y.tolist()) + 0.5 * _hand_ce(dist, T.argmax(-1).tolist())
    assert deit_distillation_loss(cls, dist, T, Y).item() == pytest.approx(want, rel=1e-5)
    want_soft = 0.5 * _hand_ce(cls, Y.tolist()) + 0.5 * 9 * _hand_kl(dist, T, 3.0)
    got = deit_distillation_loss(cls, dist, T, Y, target="soft", tau=3.0).item()
    assert got == pytest.approx(want_soft, rel=1e-5)


def test_distilled_student_returns_both_heads_in_training_and_their_mean_in_eval() -> None:
    torch.manual_seed(0)
    model = create_model(ModelSpec("vitc_micro_dist"))
    assert isinstance(model, VisionTransformerDistilled)
    x = torch.randn(3, 1, 28, 28)
    model.set_distilled_training(True)
    model.train()
    cls, dist = model(x)
    assert cls.shape == dist.shape == (3, 10)
    assert not torch.allclose(cls, dist)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), (cls + dist).detach() / 2)


def test_gradients_reach_the_distillation_token_and_head() -> None:
    torch.manual_seed(0)
    model = create_model(ModelSpec("vitc_micro_quarter_dist")).train()
    model.set_distilled_training(True)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    cls, dist = model(x)
    deit_distillation_loss(cls, dist, torch.randn(4, 10), y).backward()
    assert model.dist_token.grad is not None and model.dist_token.grad.abs().sum() > 0
    assert model.head_dist.weight.grad.abs().sum() > 0
    assert model.cls_token.grad.abs().sum() > 0


def _fake_train_set(n: int = 256) -> ImageTensorDataset:
    return synthetic_train_set(n)


@pytest.fixture(scope="module")
def teacher_and_data(tmp_path_factory):
    torch.manual_seed(0)
    ds = _fake_train_set()
    cfg = TrainConfig(epochs=2, batch_size=32, lr=3e-3, mixed_precision="no")
    ctx = StepContext(ds, 28, 1, 10, 0, tmp_path_factory.mktemp("teacher"), cfg, progress=False)
    return ctx.fit(create_model(SPEC)).model, ds


def _ctx(ds: ImageTensorDataset, teacher, work: Path, **train) -> StepContext:
    cfg = TrainConfig(**{"epochs": 1, "batch_size": 32, "lr": 3e-3, "mixed_precision": "no", **train})
    return StepContext(ds, 28, 1, 10, 0, work, cfg, teacher=teacher, calib_images=64, progress=False)


def _logits(model, ds: ImageTensorDataset) -> torch.Tensor:
    x = next(iter(make_loader(ds, 64, train=False, img_size=28, in_chans=1)))[0]
    with torch.inference_mode():
        return model.eval()(x)


def test_distillation_lowers_the_kl_to_the_teacher(teacher_and_data, tmp_path) -> None:
    teacher, ds = teacher_and_data
    teacher = copy.deepcopy(teacher)
    with torch.no_grad():  # a confident teacher (logits x 8), so there is something to match
        teacher.head.weight.mul_(8)
        teacher.head.bias.mul_(8)
    cfg = DistillConfig(student="tiny", loss="soft", alpha=1.0, tau=1.0, epochs=3, lr=5e-3)
    torch.manual_seed(0)
    out = get_method("distill").apply(copy.deepcopy(teacher), cfg, _ctx(ds, teacher, tmp_path))
    torch.manual_seed(0)
    untrained = create_model(ModelSpec(**out.meta["student"]))  # the same student before training
    t = _logits(teacher, ds)
    before = soft_kl(_logits(untrained, ds), t, 1.0).item()
    after = soft_kl(_logits(out.model, ds), t, 1.0).item()
    # Trained on the labels alone (alpha 0) the same student only gets to ~0.8x; distilled, below 0.1x.
    assert after < 0.25 * before, (before, after)
    assert out.meta["params"] < sum(p.numel() for p in teacher.parameters()) / 2


@pytest.mark.parametrize("method", ["distill", "train"])
def test_augment_reaches_the_training_loop_and_stays_out_of_cache_keys(method, teacher_and_data, tmp_path) -> None:
    teacher, ds = teacher_and_data
    seen = []
    ctx = _ctx(ds, teacher, tmp_path)
    fit = ctx.fit

    def spy(model, *args, **kwargs):
        seen.append(kwargs.get("augment"))
        return fit(model, *args, **kwargs)

    ctx.fit = spy
    cfg_cls = get_method(method).config_cls
    for augment in (True, None):
        cfg = from_dict(cfg_cls, {"student": "tiny", "epochs": 1, "augment": augment}, "test")
        get_method(method).apply(copy.deepcopy(teacher), cfg, ctx)
        assert ("augment" in Step(method, cfg).key_dict()["config"]) == (augment is not None)
    assert seen == [True, None]  # None: the loop keeps the baseline's own setting


def _save_load(model, steps: list[dict], tmp_path: Path, name: str):
    meta = {"model": SPEC.to_dict(), "steps": steps}
    save_artifact(model, tmp_path / name, meta)
    return load_artifact(tmp_path / name)


def test_deit_student_save_load_and_chain_with_dynamic_quantization(teacher_and_data, tmp_path) -> None:
    teacher, ds = teacher_and_data
    cfg = parse_config("distill", {"student": "tiny", "epochs": 1}, "test")
    out = get_method("distill").apply(copy.deepcopy(teacher), cfg, _ctx(ds, teacher, tmp_path / "w"))
    student = out.model
    assert isinstance(student, VisionTransformerDistilled) and not student.distilled_training
    assert not student.training
    step = {"method": "distill", "config": to_dict(cfg), "meta": out.meta}
    loaded = _save_load(student, [step], tmp_path, "deit")
    assert isinstance(loaded, VisionTransformerDistilled) and loaded.embed_dim == 16
    torch.testing.assert_close(_logits(loaded, ds), _logits(student, ds), atol=1e-5, rtol=1e-5)

    qcfg = parse_config("ptq.dynamic", {}, "test")
    qout = get_method("ptq.dynamic").apply(student, qcfg, None)
    q = qout.model
    assert uses_integer_kernels(q)
    assert "quantized" in type(q.head).__module__ and "quantized" in type(q.head_dist).__module__
    qloaded = _save_load(q, [step, {"method": "ptq.dynamic", "config": to_dict(qcfg), "meta": qout.meta}], tmp_path, "q")
    x = next(iter(make_loader(ds, 16, train=False, img_size=28, in_chans=1)))[0]
    with torch.inference_mode():
        torch.testing.assert_close(qloaded(x), q(x))
        feats = qloaded.forward_features(x)  # (B, 2 + patches, D): class token, distillation token, ...
        mean = (qloaded.head(feats[:, 0]) + qloaded.head_dist(feats[:, 1])) / 2
        torch.testing.assert_close(qloaded(x), mean)
        assert (qloaded(x) - student(x)).abs().max() < 0.1


def test_same_student_from_teacher_weights_and_artifact_teacher(teacher_and_data, tmp_path) -> None:
    teacher, ds = teacher_and_data
    student = create_model(ModelSpec("vitc_micro_dist"))
    init_from_teacher(student, teacher)
    torch.testing.assert_close(student.blocks[1].mlp.fc2.weight, teacher.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(student.head_dist.weight, teacher.head.weight)
    torch.testing.assert_close(student.pos_embed[:, 1], teacher.pos_embed[:, 0])  # dist token at the cls position
    torch.testing.assert_close(student.pos_embed[:, 2:], teacher.pos_embed[:, 1:])

    # A teacher from an artifact folder; "same" then copies that teacher's layout.
    save_artifact(teacher, tmp_path / "teacher", {"model": SPEC.to_dict(), "steps": []})
    cfg = DistillConfig(teacher=str(tmp_path / "teacher"), loss="hard", init_from_teacher=True, epochs=1)
    out = get_method("distill").apply(create_model(SPEC), cfg, _ctx(ds, None, tmp_path / "w", max_steps_per_epoch=2))
    assert out.meta["student"]["name"] == "vitc_vit" and out.meta["student"]["kwargs"]["embed_dim"] == 32


def test_cnn_teacher_from_a_checkpoint_file(teacher_and_data, tmp_path) -> None:
    _, ds = teacher_and_data
    cnn = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    save_file(cnn.state_dict(), str(tmp_path / "cnn.safetensors"))
    ctx = _ctx(ds, None, tmp_path / "w", max_steps_per_epoch=2)
    cfg = DistillConfig(student="vitc_micro_quarter_dist", teacher=str(tmp_path / "cnn.safetensors"),
                        teacher_model="resnet10t")
    out = get_method("distill").apply(create_model(SPEC), cfg, ctx)
    assert isinstance(out.model, VisionTransformerDistilled) and out.meta["student"]["name"] == cfg.student
    assert torch.isfinite(_logits(out.model, ds)).all()
    # "tiny" with a CNN teacher: half the incoming ViT's layout (the teacher has none to copy).
    incoming = create_model(SPEC)
    tiny = get_method("distill").apply(incoming, replace(cfg, student="tiny"), ctx)
    assert tiny.meta["student"]["kwargs"]["embed_dim"] == incoming.embed_dim // 2
    with pytest.raises(VitcompressError, match="copies a ViT teacher's layout"):
        get_method("distill").apply(cnn, replace(cfg, student="tiny"), ctx)  # no ViT anywhere


def test_input_student_keeps_the_incoming_model(teacher_and_data, tmp_path) -> None:
    teacher, ds = teacher_and_data
    cfg = DistillConfig(student="input", loss="soft", epochs=1)
    incoming = copy.deepcopy(teacher)
    out = get_method("distill").apply(incoming, cfg, _ctx(ds, teacher, tmp_path / "w", max_steps_per_epoch=2))
    assert out.model is incoming and out.meta["student"] is None
    assert not torch.equal(out.model.head.weight, teacher.head.weight)  # it was trained
    loaded = _save_load(out.model, [{"method": "distill", "config": to_dict(cfg), "meta": out.meta}], tmp_path, "a")
    torch.testing.assert_close(_logits(loaded, ds), _logits(out.model, ds))


def test_config_rules_and_round_trip() -> None:
    for cls_name in ("distill", "train"):
        cls = get_method(cls_name).config_cls
        assert from_dict(cls, to_dict(cls())) == cls()
    assert DistillConfig().uses_token and not DistillConfig(loss="soft").uses_token
    for bad in ({"loss": "deit", "dist_token": False}, {"student": "nope_model"}, {"alpha": 1.5},
                {"init_from_teacher": True, "student": "vitc_micro_quarter"}, {"teacher_model": "vitc_micro"},
                {"pretrained": True, "student": "vitc_micro_quarter_dist"}, {"student": "input", "dist_token": True}):
        with pytest.raises(VitcompressError):
            parse_config("distill", bad, "test")
    for name in ("distill", "train"):
        for bad, match in (({"student": "same", "width": 0.25}, "drop it for student same"),
                           ({"student": "tiny", "width": 1.5}, "in \\(0, 1\\)"),
                           ({"student": "same", "heads": 1}, "drop it for student same"),
                           ({"student": "tiny", "heads": 0}, "heads must be >= 1"),
                           ({"student": "same", "stem": 0}, "drop it for student same"),
                           ({"student": "tiny", "stem": -0.5}, "stem is a fraction")):
            with pytest.raises(VitcompressError, match=match):
                parse_config(name, bad, "test")
        # width is a late option: at its default the cache key of a finished "tiny" row is unchanged.
        config = Step(name, parse_config(name, {"student": "tiny"}, "test")).key_dict()["config"]
        assert "width" not in config and "heads" not in config and "stem" not in config
        assert Step(name, parse_config(name, {"student": "tiny", "width": 0.25}, "test")).key_dict()["config"][
            "width"] == 0.25


def test_study_with_distillation_rows_and_control(tmp_path, needs_fmnist) -> None:
    recipe = parse_recipe(tiny_recipe_dict(experiments=[
        {"name": "DeiT tiny", "steps": [{"distill": {"student": "tiny", "epochs": 1}}]},
        {"name": "Tiny without teacher", "steps": [{"train": {"student": "tiny", "epochs": 1}}]},
        {"name": "DeiT base + Dynamic Quantization", "steps": [{"distill": {"epochs": 1}}, {"ptq.dynamic": {}}]},
    ]))
    res = run_study(recipe, tmp_path / "run", progress=False, log=lambda m: None)
    rows = {r["name"]: r for r in res.rows}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error") for r in rows.values()]
    base = rows["Vanilla ViT"]
    assert rows["DeiT tiny"]["params"] < base["params"] / 2
    assert rows["Tiny without teacher"]["params"] < rows["DeiT tiny"]["params"]  # no token, no second head
    assert rows["DeiT base + Dynamic Quantization"]["int_arithmetic"]
    assert all(0 <= r["top1"] <= 100 for r in rows.values())
