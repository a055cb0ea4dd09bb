"""Students for distillation: the teacher's architecture or a quarter of it, with or without a distillation token.

The distillation token is DeiT's (Touvron et al. 2021, "Training data-efficient
image transformers & distillation through attention", section 4): a second
learned token next to the class token, read by its own head, that learns the
teacher's prediction while the class head learns the label; at inference the two
heads' logits are averaged. timm's ``VisionTransformerDistilled`` implements it
(``timm.models.deit``): with ``set_distilled_training(True)`` and in train mode
its forward returns ``(class_logits, dist_logits)``, otherwise their average.

Students are named in a recipe by

* ``"same"``: the teacher's own layout (width, depth, heads, patches), as DeiT-B
  is ViT-B's layout ("DeiT base");
* ``"tiny"``: half the teacher's width at the same depth, about a quarter of its
  parameters, since a block's weights grow with width squared ("DeiT tiny");
  ``width: 0.25`` gives DeiT-Ti's own ratio to DeiT-B (192 of 768 channels);
* any timm or vitcompress model name, e.g. the registered presets below or
  ``deit_tiny_distilled_patch16_224`` for the 224 px setting.

"same" and "tiny" are read from the teacher module, so they work for the presets
and for hub ViTs alike, and resolve to a ``ModelSpec`` of the generic entry points
``vitc_vit`` / ``vitc_deit`` with the layout in its ``kwargs``: that spec is all a
saved artifact needs to rebuild the student (both are registered in :mod:`vitcompress.models.presets`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.models import register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ...errors import VitcompressError
from ...models import ModelSpec, is_known_model
from ...models.presets import PRESETS, build_vit, stem_channels

# Narrower heads than this learn poorly; "tiny" lowers the head count instead.
MIN_HEAD_DIM = 16
STUDENT_CHOICES = ("same", "tiny", "input")


def _vit(distilled: bool, **kwargs: Any) -> VisionTransformer:
    return build_vit(VisionTransformerDistilled if distilled else VisionTransformer, **kwargs)


def quarter_arch(arch: dict[str, Any], width: float = 0.5, heads: int | None = None,
                 stem: float | None = None, depth: int | None = None) -> dict[str, Any]:
    """A narrower student (at the same depth unless ``depth`` says otherwise): ``width`` of the teacher's
    embedding width (and of its conv stem's channels). The default, half the width, has about a quarter of the parameters and of the MACs;
    ``width=0.25`` is DeiT-Ti's ratio to DeiT-B (192 of 768), about 1/16 of the block parameters.

    The head count stays the teacher's unless a head would be narrower than
    ``MIN_HEAD_DIM`` channels (vitc_tiny 192/3 heads -> 96/3; vitc_quick 96/4 -> 48/3, at 0.25 -> 24/1).
    ``heads`` sets it instead; it must divide the student's width. Fewer, wider heads run faster on a
    CPU at the same MACs (one head of 48 against three of 16: 2.7-2.8x against 2.1-2.2x the teacher,
    ``docs/results/student_speed/``), since every head is its own small matmul and softmax.

    A teacher's conv stem shrinks by ``width`` too, or by ``stem`` (a fraction of its channels) where given;
    ``stem=0`` gives the student timm's plain patch projection instead, DeiT's setting: a ViT student with
    no convolutions, taught by a teacher that has them.

    ``depth`` sets the student's block count (None: the teacher's). On this CPU a half-width, two-head
    student of 2 blocks runs about 4x the 4-block teacher, against 2.1-2.3x at the teacher's depth.
    """
    if not 0 < width <= 1:
        raise VitcompressError(f"width must be in (0, 1], got {width}")
    dim = int(int(arch["embed_dim"]) * width)
    if dim < MIN_HEAD_DIM:
        raise VitcompressError(f"a teacher {arch['embed_dim']} wide is too narrow for a student at width {width} "
                               f"(under {MIN_HEAD_DIM} channels); raise width or name a student model")
    if heads is not None:
        if heads < 1 or dim % heads:
            raise VitcompressError(f"heads must divide the student's {dim} channels (width {width} of "
                                   f"{arch['embed_dim']}); got {heads}")
    else:
        heads = int(arch["num_heads"])
        while heads > 1 and (dim % heads or dim // heads < MIN_HEAD_DIM):
            heads -= 1
    if stem is not None and not 0 <= stem <= 1:
        raise VitcompressError(f"stem is a fraction of the teacher's stem channels in [0, 1], got {stem}")
    if depth is not None and not 1 <= depth <= int(arch["depth"]):
        raise VitcompressError(f"depth must be in [1, {arch['depth']}] (the teacher's), got {depth}")
    out = {**arch, "embed_dim": dim, "num_heads": heads, "depth": int(arch["depth"]) if depth is None else depth}
    out.pop("stem", None)
    frac = width if stem is None else stem
    if arch.get("stem") and frac > 0:  # a conv stem shrinks with the blocks, or it would dominate the student's cost
        out["stem"] = [max(8, int(int(c) * frac)) for c in arch["stem"]]
    return out


def _student_presets() -> dict[str, tuple[dict[str, Any], bool, str]]:
    # <preset>_dist: the preset with a distillation token ("same"); <preset>_quarter[_dist]: its "tiny" student.
    out: dict[str, tuple[dict[str, Any], bool, str]] = {}
    for name, (arch, _) in PRESETS.items():
        q = quarter_arch(arch)
        out[f"{name}_dist"] = (dict(arch), True, f"{name} with DeiT's distillation token")
        out[f"{name}_quarter"] = (q, False, f"{name} at half width ({q['embed_dim']}, {q['num_heads']} heads): "
                                            "about 1/4 of the parameters")
        out[f"{name}_quarter_dist"] = (q, True, f"{name}_quarter with DeiT's distillation token")
    return out


# Named students for the small presets, so a recipe can name one (name -> (layout, token?, text)).
STUDENT_PRESETS = _student_presets()


def _entry_point(name: str) -> Callable[..., VisionTransformer]:
    arch, distilled, text = STUDENT_PRESETS[name]

    def build(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        return _vit(distilled, **{**arch, **kwargs})

    build.__name__ = build.__qualname__ = name  # timm registers an entry point under its function name
    build.__doc__ = text
    return build


for _student in STUDENT_PRESETS:
    register_model(_entry_point(_student))


def teacher_arch(teacher: nn.Module) -> dict[str, Any]:
    """The layout of a timm ViT teacher as constructor kwargs; the rest stays at timm's ViT defaults.

    ``check_same_layout`` catches a teacher that differs in what is not read here.
    """
    if not isinstance(teacher, VisionTransformer) or not len(teacher.blocks):
        raise VitcompressError(
            f"student 'same'/'tiny' copies a ViT teacher's layout, but the teacher is a {type(teacher).__name__}; "
            "name the student model instead (e.g. student: vitc_tiny_quarter_dist)"
        )
    patch = teacher.patch_embed.patch_size
    attn = teacher.blocks[0].attn
    fc1 = getattr(teacher.blocks[0].mlp, "fc1", None)
    if patch[0] != patch[1] or not isinstance(fc1, nn.Linear) or not hasattr(attn, "qkv"):
        raise VitcompressError("this teacher's blocks are not timm's standard ViT blocks; name the student model")
    arch = {
        "patch_size": int(patch[0]),
        "embed_dim": int(teacher.embed_dim),
        "depth": len(teacher.blocks),
        "num_heads": int(attn.num_heads),
        "mlp_ratio": fc1.out_features / teacher.embed_dim,
        "qkv_bias": attn.qkv.bias is not None,
    }
    stem = stem_channels(teacher)
    if stem:
        arch["stem"] = list(stem)
    # What a converted transformers ViT differs in (timm's defaults are left out, so the presets' and
    # timm ViTs' student specs stay as they were): LayerNorm epsilon, MLP activation, register tokens.
    eps = float(getattr(teacher.norm, "eps", 1e-6))
    if eps != 1e-6:
        arch["norm_eps"] = eps
    act = type(getattr(teacher.blocks[0].mlp, "act", None)).__name__
    if act != "GELU":
        if act not in _ACT_NAMES:
            raise VitcompressError(f"the teacher's MLP activation {act} has no timm name here; name the student model")
        arch["act_layer"] = _ACT_NAMES[act]
    if int(getattr(teacher, "num_reg_tokens", 0) or 0):
        arch["reg_tokens"] = int(teacher.num_reg_tokens)
    return arch


# timm activation classes -> the act_layer names timm's VisionTransformer takes
_ACT_NAMES = {"GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "ReLU": "relu", "SiLU": "silu"}


def student_spec(choice: str, reference: nn.Module | None, *, dist_token: bool, num_classes: int, img_size: int,
                 in_chans: int, pretrained: bool = False, width: float | None = None,
                 heads: int | None = None, stem: float | None = None, depth: int | None = None) -> ModelSpec:
    """The spec of the student ``choice`` names; ``reference`` (the teacher) fixes "same" and "tiny"
    (``width``: tiny's fraction of the teacher's width, None for a half; ``heads``: its head count,
    None for ``quarter_arch``'s rule; ``stem``: its conv stem's fraction of the teacher's, None for
    ``width``, 0 for a plain patch projection; ``depth``: its block count, None for the teacher's)."""
    if choice in ("same", "tiny"):
        if reference is None:
            raise VitcompressError(f"student '{choice}' needs a teacher to copy the layout from")
        arch = teacher_arch(reference)
        if dist_token:  # a teacher's register token (a converted DeiT's distillation token) becomes the student's
            arch.pop("reg_tokens", None)
        if choice == "tiny":
            arch = quarter_arch(arch, 0.5 if width is None else width, heads, stem, depth)
        return ModelSpec("vitc_deit" if dist_token else "vitc_vit", num_classes, img_size, in_chans, kwargs=arch)
    if not is_known_model(choice):
        raise VitcompressError(f"unknown student model '{choice}'; use 'same', 'tiny', a preset "
                               f"({', '.join(STUDENT_PRESETS)}) or a timm model name")
    return ModelSpec(choice, num_classes, img_size, in_chans, pretrained=pretrained)


def check_same_layout(student: nn.Module, teacher: nn.Module) -> None:
    """Every teacher weight has a student twin of the same shape (pos_embed aside), or a one-line error.

    Guards "same": a ViT variant whose layout ``teacher_arch`` cannot read (layer
    scale, q/k norms, pooling heads) would otherwise give a student that only looks alike.
    """
    own = student.state_dict()
    for key, value in teacher.state_dict().items():
        if key == "pos_embed":
            continue
        if key == "reg_token" and "reg_token" not in own:
            key = "dist_token"  # a converted DeiT's distillation token, held as timm's register token
        if key not in own or own[key].shape != value.shape:
            raise VitcompressError(
                f"student 'same' does not mirror the teacher (weight {key}); name the student model instead"
            )


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Start a "same" student at the teacher's weights; the token's position and head start as the class token's.

    The distillation token itself keeps its random start, so the two tokens do not
    begin as one and the same vector.
    """
    check_same_layout(student, teacher)
    state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    own = student.state_dict()
    if "reg_token" in state and "reg_token" not in own:
        state["dist_token"] = state.pop("reg_token")
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != own["pos_embed"].shape:
        if own["pos_embed"].shape[1] != pos.shape[1] + 1:
            raise VitcompressError("cannot map the teacher's position embedding onto the student's; "
                                   "set init_from_teacher: false")
        # (1, 1 + P, D) -> (1, 2 + P, D): class, distillation (the class token's position), then patches.
        state["pos_embed"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
    if "head_dist.weight" in own and "head_dist.weight" not in state:
        state["head_dist.weight"] = state["head.weight"].clone()
        state["head_dist.bias"] = state["head.bias"].clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"dist_token"}:
        raise VitcompressError(f"cannot start the student at the teacher's weights ({(unexpected or missing)[0]}); "
                               "set init_from_teacher: false")
