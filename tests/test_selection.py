"""Weight selection (distill / train ``init_from_teacher`` for a "tiny" student): which teacher weights a
narrower, shallower student starts from, and the methods that use it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import synthetic_train_set

from vitcompress.errors import VitcompressError
from vitcompress.methods import get_method, parse_config
from vitcompress.methods.distill.method import restore_student
from vitcompress.methods.distill.selection import select_weights
from vitcompress.methods.distill.students import student_spec
from vitcompress.models import ModelSpec, create_model
from vitcompress.study.context import StepContext
from vitcompress.train import TrainConfig


def _tiny(teacher: torch.nn.Module, token: bool = True, **kw) -> torch.nn.Module:
    spec = student_spec("tiny", teacher, dist_token=token, num_classes=10, img_size=28, in_chans=1, **kw)
    return create_model(spec).eval()


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    """vitc_small (96 wide, 4 heads of 24, 4 blocks, stem 32-64-128) with weights that make the choice plain:
    heads 0 and 2 of every block are dead, residual channels 48..95 are strong, and the stem's BatchNorm
    gains rank its channels in reverse."""
    torch.manual_seed(0)
    t = create_model(ModelSpec("vitc_small")).eval()
    d, hd = t.embed_dim, t.blocks[0].attn.head_dim
    with torch.no_grad():
        for blk in t.blocks:
            qkv = blk.attn.qkv.weight.view(3, 4, hd, d)
            qkv[:, [0, 2]] = 0.0
            blk.attn.proj.weight.view(d, 4, hd)[:, [0, 2]] = 0.0
            blk.norm1.weight[48:] = 3.0
            blk.mlp.fc1.weight[::2] *= 3.0  # even hidden units are strong
        for mod in t.patch_embed.proj.layers:
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.copy_(torch.linspace(0.1, 2.0, mod.num_features))  # the last channels are strongest
                mod.running_mean.normal_()
    return t


def test_a_student_of_the_teachers_own_layout_reproduces_it(teacher) -> None:
    same = create_model(student_spec("same", teacher, dist_token=False, num_classes=10, img_size=28,
                                     in_chans=1)).eval()
    select_weights(same, teacher)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(same(x), teacher(x), atol=1e-5, rtol=1e-5)


def test_half_width_two_head_two_block_student_takes_the_strongest_parts(teacher) -> None:
    student = _tiny(teacher, heads=2, depth=2)
    kept = select_weights(student, teacher)
    assert kept["embed"] == list(range(48, 96))
    emb = torch.arange(48, 96)
    assert len(student.blocks) == 2 and student.blocks[0].attn.num_heads == 2
    for i, (sb, tb) in enumerate(zip(student.blocks, teacher.blocks)):  # the teacher's first blocks
        heads = sorted({j // 24 for j in kept["blocks"][i]["attn_dims"]})
        assert heads == [1, 3]  # the live heads, whole (same head width: q keeps its scale)
        dims = torch.tensor(kept["blocks"][i]["attn_dims"])
        torch.testing.assert_close(sb.attn.qkv.weight[:48], tb.attn.qkv.weight[dims][:, emb])
        torch.testing.assert_close(sb.attn.qkv.weight[96:], tb.attn.qkv.weight[dims + 192][:, emb])
        torch.testing.assert_close(sb.attn.proj.weight, tb.attn.proj.weight[emb][:, dims])
        assert kept["blocks"][i]["mlp"] == list(range(0, 384, 2))
        torch.testing.assert_close(sb.mlp.fc2.weight, tb.mlp.fc2.weight[emb][:, 0::2])
        torch.testing.assert_close(sb.norm1.weight, tb.norm1.weight[emb])
    # Stem: the channels with the largest BatchNorm gains, conv by conv; the 1x1 conv writes the kept residual.
    assert kept["stem"] == [list(range(16, 32)), list(range(32, 64)), list(range(64, 128))]
    s_layers, t_layers = student.patch_embed.proj.layers, teacher.patch_embed.proj.layers
    torch.testing.assert_close(s_layers[3].weight, t_layers[3].weight[32:64][:, 16:32])
    torch.testing.assert_close(s_layers[4].running_mean, t_layers[4].running_mean[32:64])
    torch.testing.assert_close(s_layers[9].weight, t_layers[9].weight[emb][:, 64:128])
    # Tokens: the distillation token's position is the class token's, its head the class head.
    torch.testing.assert_close(student.pos_embed[:, 1], teacher.pos_embed[0, :1, emb])
    torch.testing.assert_close(student.pos_embed[:, 2:], teacher.pos_embed[:, 1:, emb])
    torch.testing.assert_close(student.head_dist.weight, teacher.head.weight[:, emb])


def test_one_wide_head_is_the_two_best_heads_with_q_rescaled(teacher) -> None:
    student = _tiny(teacher, token=False, heads=1)
    kept = select_weights(student, teacher)
    dims = torch.tensor(kept["blocks"][0]["attn_dims"])
    assert sorted({int(j) // 24 for j in dims}) == [1, 3] and len(dims) == 48
    emb, tb = torch.arange(48, 96), teacher.blocks[0]
    # One head of 48 scales logits by 1/sqrt(48); q * sqrt(2) keeps each kept dim's 1/sqrt(24) share.
    torch.testing.assert_close(student.blocks[0].attn.qkv.weight[:48], tb.attn.qkv.weight[dims][:, emb] * math.sqrt(2))
    torch.testing.assert_close(student.blocks[0].attn.qkv.weight[48:96], tb.attn.qkv.weight[dims + 96][:, emb])
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.isfinite(student(x)).all()


def test_selection_refuses_what_it_cannot_map_in_one_line(teacher) -> None:
    stemless = _tiny(teacher, stem=0)
    with pytest.raises(VitcompressError, match="conv stem and the other a patch projection.*init_from_teacher"):
        select_weights(stemless, teacher)
    with pytest.raises(VitcompressError, match="deeper or wider than the teacher"):
        select_weights(create_model(ModelSpec("vitc_tiny")), create_model(ModelSpec("vitc_quick")))
    with pytest.raises(VitcompressError, match="depth must be in \\[1, 4\\]"):
        _tiny(teacher, depth=5)
    for method, bad, msg in [
        ("distill", {"student": "same", "depth": 2}, "depth sets the 'tiny' student's block count"),
        ("distill", {"student": "vitc_micro_quarter", "init_from_teacher": True}, "init_from_teacher needs student"),
        ("train", {"student": "same", "init_from_teacher": True}, "init_from_teacher here needs student: tiny"),
        ("train", {"student": "tiny", "depth": 0}, "depth must be >= 1"),
    ]:
        with pytest.raises(VitcompressError, match=msg):
            parse_config(method, bad, "test")


def _ctx(ds, teacher, work: Path) -> StepContext:
    base = TrainConfig(epochs=1, batch_size=16, lr=1e-3, mixed_precision="no", max_steps_per_epoch=2)
    return StepContext(ds, 28, 1, 10, 0, work, base, teacher=teacher, calib_images=64, progress=False)


def test_distill_and_its_control_start_a_tiny_student_at_the_selected_weights(tmp_path) -> None:
    torch.manual_seed(0)
    teacher = create_model(ModelSpec("vitc_quick")).eval()
    ds = synthetic_train_set(64)
    ctx = _ctx(ds, teacher, tmp_path / "w")
    cfg = parse_config("distill", {"student": "tiny", "heads": 2, "depth": 2, "init_from_teacher": True,
                                   "epochs": 0}, "test")
    out = get_method("distill").apply(teacher, cfg, ctx)
    assert out.meta["student"]["kwargs"]["depth"] == 2 and len(out.model.blocks) == 2
    emb = torch.tensor(out.meta["selected"]["embed"])
    # No training (0 epochs): the student is the selection itself.
    torch.testing.assert_close(out.model.blocks[1].mlp.fc1.bias,
                               teacher.blocks[1].mlp.fc1.bias[out.meta["selected"]["blocks"][1]["mlp"]])
    torch.testing.assert_close(out.model.norm.weight, teacher.norm.weight[emb])
    rebuilt = restore_student(teacher, cfg, out.meta)
    assert len(rebuilt.blocks) == 2 and rebuilt.blocks[0].attn.num_heads == 2
    rebuilt.load_state_dict(out.model.state_dict())

    # The control: the same selection, then labels only (one short epoch: the weights move).
    ctrl_cfg = parse_config("train", {"student": "tiny", "heads": 2, "depth": 2, "init_from_teacher": True}, "test")
    ctrl = get_method("train").apply(teacher, ctrl_cfg, ctx)
    assert ctrl.meta["selected"]["embed"] == out.meta["selected"]["embed"]
    assert not torch.equal(ctrl.model.blocks[0].attn.qkv.weight, out.model.blocks[0].attn.qkv.weight)
    scratch = get_method("train").apply(teacher, parse_config("train", {"student": "tiny", "depth": 2}, "test"), ctx)
    assert "selected" not in scratch.meta
