"""The presets' convolutional stem: its layout, students that copy it, and saved artifacts that rebuild it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitcompress.artifact import load_artifact, save_artifact
from vitcompress.errors import VitcompressError
from vitcompress.methods.distill.students import check_same_layout, student_spec
from vitcompress.models import ModelSpec, create_model
from vitcompress.models.presets import ConvStem, build_vit, stem_channels


def _convs(stem: ConvStem) -> list[nn.Conv2d]:
    return [m for m in stem.layers if isinstance(m, nn.Conv2d)]


def test_vitc_small_has_a_conv_stem_that_makes_the_same_token_grid() -> None:
    model = create_model(ModelSpec("vitc_small"))
    stem = model.patch_embed.proj
    assert isinstance(stem, ConvStem) and stem_channels(model) == (32, 64, 128)
    convs = _convs(stem)
    assert [c.stride[0] for c in convs] == [1, 2, 2, 1]  # 3x3 convs, strides multiplying to the 4 px patch
    assert [c.out_channels for c in convs] == [32, 64, 128, 96] and convs[-1].kernel_size == (1, 1)
    x = torch.randn(3, 1, 28, 28)
    tokens = model.patch_embed(x)
    assert tokens.shape == (3, 49, 96)  # 7x7 patches, as timm's 4 px projection gives
    out = model.eval()(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    plain = create_model(ModelSpec("vitc_quick"))
    assert stem_channels(plain) is None
    assert model.patch_embed.num_patches == plain.patch_embed.num_patches


def test_a_stem_that_cannot_make_the_patch_size_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot make"):
        build_vit(img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2, stem=(8,))
    with pytest.raises(ValueError, match="cannot make"):
        build_vit(img_size=30, patch_size=3, embed_dim=32, depth=1, num_heads=2, stem=(8, 16))


@pytest.mark.parametrize("dist_token", [False, True])
def test_students_copy_the_teachers_stem_and_the_tiny_one_halves_it(dist_token: bool, tmp_path) -> None:
    teacher = create_model(ModelSpec("vitc_small"))
    same = student_spec("same", teacher, dist_token=dist_token, num_classes=10, img_size=28, in_chans=1)
    tiny = student_spec("tiny", teacher, dist_token=dist_token, num_classes=10, img_size=28, in_chans=1)
    assert list(same.kwargs["stem"]) == [32, 64, 128] and list(tiny.kwargs["stem"]) == [16, 32, 64]
    same_model, tiny_model = create_model(same), create_model(tiny)
    check_same_layout(same_model, teacher)  # every teacher weight, stem included, has a twin
    assert stem_channels(tiny_model) == (16, 32, 64) and tiny_model.embed_dim == 48
    n_teacher = sum(p.numel() for p in teacher.parameters())
    assert sum(p.numel() for p in tiny_model.parameters()) < 0.35 * n_teacher
    # The spec is all an artifact needs: it rebuilds the stem and loads strictly.
    save_artifact(tiny_model, tmp_path / "tiny", {"model": tiny.to_dict(), "steps": []})
    back = load_artifact(tmp_path / "tiny")
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(back.eval()(x), tiny_model.eval()(x))


def test_a_quarter_width_tiny_student_is_deit_tis_ratio(tmp_path) -> None:
    teacher = create_model(ModelSpec("vitc_small"))
    spec = student_spec("tiny", teacher, dist_token=True, num_classes=10, img_size=28, in_chans=1, width=0.25)
    # 96 -> 24 channels: one head (two would be 12 wide, under MIN_HEAD_DIM); the stem shrinks alike.
    assert spec.kwargs["embed_dim"] == 24 and spec.kwargs["num_heads"] == 1
    assert list(spec.kwargs["stem"]) == [8, 16, 32] and spec.kwargs["depth"] == 4
    student = create_model(spec)
    assert student.blocks[0].attn.head_dim == 24 and student.blocks[0].mlp.fc1.out_features == 96
    half = create_model(student_spec("tiny", teacher, dist_token=True, num_classes=10, img_size=28, in_chans=1))
    n = [sum(p.numel() for p in m.parameters()) for m in (teacher, half, student)]
    assert n[2] < 0.4 * n[1] and n[1] < 0.35 * n[0]
    save_artifact(student, tmp_path / "q", {"model": spec.to_dict(), "steps": []})
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(load_artifact(tmp_path / "q").eval()(x), student.eval()(x))


def test_the_tiny_students_head_count_can_be_set(tmp_path) -> None:
    teacher = create_model(ModelSpec("vitc_small"))
    spec = student_spec("tiny", teacher, dist_token=True, num_classes=10, img_size=28, in_chans=1, heads=1)
    assert spec.kwargs["embed_dim"] == 48 and spec.kwargs["num_heads"] == 1  # the default rule gives 3 of 16
    student = create_model(spec)
    assert student.blocks[0].attn.num_heads == 1 and student.blocks[0].attn.head_dim == 48
    save_artifact(student, tmp_path / "h", {"model": spec.to_dict(), "steps": []})
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(load_artifact(tmp_path / "h").eval()(x), student.eval()(x))
    with pytest.raises(VitcompressError, match="heads must divide the student's 48 channels"):
        student_spec("tiny", teacher, dist_token=True, num_classes=10, img_size=28, in_chans=1, heads=5)


def test_the_tiny_students_stem_can_shrink_or_go(tmp_path) -> None:
    teacher = create_model(ModelSpec("vitc_small"))  # conv stem 32-64-128
    kw = dict(dist_token=True, num_classes=10, img_size=28, in_chans=1, heads=1)
    assert student_spec("tiny", teacher, **kw).kwargs["stem"] == [16, 32, 64]  # follows the width by default
    assert student_spec("tiny", teacher, stem=0.25, **kw).kwargs["stem"] == [8, 16, 32]
    spec = student_spec("tiny", teacher, stem=0, **kw)
    assert "stem" not in spec.kwargs
    student = create_model(spec)
    assert stem_channels(student) is None and isinstance(student.patch_embed.proj, torch.nn.Conv2d)
    assert student.patch_embed.proj.kernel_size == (4, 4)  # timm's patch projection at the teacher's patch size
    x = torch.randn(2, 1, 28, 28)
    assert student.eval()(x).shape == (2, 10)
    save_artifact(student, tmp_path / "s", {"model": spec.to_dict(), "steps": []})
    assert torch.equal(load_artifact(tmp_path / "s").eval()(x), student(x))
    with pytest.raises(VitcompressError, match="stem is a fraction"):
        student_spec("tiny", teacher, stem=1.5, **kw)
