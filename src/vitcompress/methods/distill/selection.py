"""Weight selection: start a narrower, shallower student at a subset of its teacher's weights.

Xu et al. 2024 ("Initializing Models with Larger Ones", ICLR) initialise a small model with a
subset of a trained larger one's weights: *layer selection* (the student's blocks are the teacher's
first ones), *component mapping* (each student tensor comes from the same tensor of the teacher) and
*element selection* (which rows and columns), with one rule that matters most: the residual stream
keeps the same channels in every layer, so each block reads what the one before it wrote. The
student then trains as usual, with or without distillation; the paper finds the two gains add up.

The paper selects elements evenly spaced; here they are ranked, so the student keeps the strongest
parts of a small teacher (with 4 heads, "evenly spaced" cannot tell a useful head from a dead one):

* residual channels: summed squared weights over everything that writes or reads the channel (the
  patch embedding's output, class token, position embedding, every kept block's LayerNorm gains,
  qkv / fc1 input columns, proj / fc2 output rows, the final norm and the head);
* heads: the squared q/k/v rows and proj columns of a head over the kept channels. A student head
  no wider than the teacher's is one teacher head's best dims; a wider one is the next best teacher
  heads whole (one head of 48 = the two best heads of 24). Q is rescaled by sqrt(student head dim /
  teacher head dim) so that each kept dim adds to the attention logit what it added in the teacher;
* MLP units: the squared fc1 row times the squared fc2 column;
* conv stem channels: BatchNorm's |gamma| (the network-slimming criterion, Liu et al. 2017), conv by conv.

timm has no such routine, and Torch-Pruning removes a share of a model's channels in place rather
than mapping a model onto a given smaller layout (fewer blocks, a different head split), so it is
written here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ...errors import VitcompressError
from ...models.presets import ConvStem


def _sq(t: Tensor, dim: int) -> Tensor:
    """Squared L2 norm of ``t`` along every axis but ``dim``."""
    t = t.detach().float()
    return t.pow(2).sum(dim=tuple(d for d in range(t.dim()) if d != dim % t.dim()))


def _top(scores: Tensor, k: int) -> Tensor:
    """The indices of the ``k`` largest scores, in increasing index order (stable on ties)."""
    order = torch.argsort(-scores, stable=True)[:k]
    return order.sort().values


def _stem_convs(proj: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
    if isinstance(proj, ConvStem):
        mods = list(proj.layers)
        out = [(m, mods[i + 1]) for i, m in enumerate(mods) if isinstance(m, nn.Conv2d) and i + 1 < len(mods)
               and isinstance(mods[i + 1], nn.BatchNorm2d)]
        return out + [(mods[-1], None)]
    return [(proj, None)]


def _check_pair(student: nn.Module, teacher: nn.Module) -> None:
    for who, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, VisionTransformer) or not len(m.blocks):
            raise VitcompressError(f"weight selection maps one timm ViT onto another; the {who} is a "
                                   f"{type(m).__name__} (set init_from_teacher: false)")
    s_stem, t_stem = isinstance(student.patch_embed.proj, ConvStem), isinstance(teacher.patch_embed.proj, ConvStem)
    problems = []
    if s_stem != t_stem:
        problems.append("one has a conv stem and the other a patch projection (give the student a stem > 0)")
    if student.patch_embed.patch_size != teacher.patch_embed.patch_size:
        problems.append("their patch sizes differ")
    if len(student.blocks) > len(teacher.blocks) or student.embed_dim > teacher.embed_dim:
        problems.append("the student is deeper or wider than the teacher")
    if s_stem and len(_stem_convs(student.patch_embed.proj)) != len(_stem_convs(teacher.patch_embed.proj)):
        problems.append("their conv stems have different numbers of layers")
    if s_stem and any(s.out_channels > t.out_channels for (s, _), (t, _) in
                      zip(_stem_convs(student.patch_embed.proj), _stem_convs(teacher.patch_embed.proj))):
        problems.append("the student's stem is wider than the teacher's")
    s_fc1, t_fc1 = student.blocks[0].mlp.fc1, teacher.blocks[0].mlp.fc1
    if s_fc1.out_features > t_fc1.out_features:
        problems.append("the student's MLP is wider than the teacher's")
    if problems:
        raise VitcompressError(f"cannot start the student at a selection of the teacher's weights: {problems[0]}; "
                               "set init_from_teacher: false")


def _embed_scores(t: VisionTransformer, depth: int) -> Tensor:
    score = _sq(_stem_convs(t.patch_embed.proj)[-1][0].weight, 0)
    score = score + _sq(t.cls_token, -1) + _sq(t.pos_embed, -1)
    for blk in list(t.blocks)[:depth]:
        score = score + blk.norm1.weight.detach().pow(2) + _sq(blk.attn.qkv.weight, 1) + _sq(blk.attn.proj.weight, 0)
        score = score + blk.norm2.weight.detach().pow(2) + _sq(blk.mlp.fc1.weight, 1) + _sq(blk.mlp.fc2.weight, 0)
    return score + t.norm.weight.detach().pow(2) + _sq(t.head.weight, 1)


def _attn_dims(t_attn: nn.Module, emb: Tensor, s_heads: int, s_dim: int) -> Tensor:
    """The teacher's q/k/v output dims (indices into one of q, k, v) that fill the student's heads, head by head."""
    t_heads, t_hd = t_attn.num_heads, t_attn.head_dim
    w = t_attn.qkv.weight.detach()[:, emb].float()  # (3 * D_t, kept channels)
    rows = w.pow(2).sum(1).view(3, t_heads * t_hd).sum(0)  # q + k + v per dim
    dim_score = rows + _sq(t_attn.proj.weight[emb], 1)
    head_score = dim_score.view(t_heads, t_hd).sum(1)
    ranked = torch.argsort(-head_score, stable=True)
    s_hd = s_dim // s_heads
    if s_hd <= t_hd and s_heads <= t_heads:  # each student head: one teacher head's best dims
        picks = [h * t_hd + _top(dim_score[h * t_hd:(h + 1) * t_hd], s_hd) for h in ranked[:s_heads].tolist()]
    else:  # wider student heads: the best teacher heads whole, in rank order, then the best dims of the next
        picks = [h * t_hd + torch.argsort(-dim_score[h * t_hd:(h + 1) * t_hd], stable=True)
                 for h in ranked.tolist()]
    return torch.cat(picks)[:s_dim]


def select_weights(student: nn.Module, teacher: nn.Module) -> dict[str, Any]:
    """Load into ``student`` the teacher's weights it has room for (see the module docstring).

    Returns what was kept: the residual channels, per block the teacher's attention dims and MLP units,
    and the stem's channels, as lists of teacher indices.
    """
    _check_pair(student, teacher)
    s, t = student, teacher
    depth, d_s = len(s.blocks), s.embed_dim
    emb = _top(_embed_scores(t, depth), d_s)
    state: dict[str, Tensor] = {}
    kept: dict[str, Any] = {"embed": emb.tolist(), "blocks": [], "stem": []}

    # Patch embedding: a conv stem conv by conv (each conv's input is the previous one's kept output).
    s_convs, t_convs = _stem_convs(s.patch_embed.proj), _stem_convs(t.patch_embed.proj)
    s_prefix = {id(m): n for n, m in s.patch_embed.proj.named_modules()}
    prev = torch.arange(t_convs[0][0].in_channels)
    for (s_conv, s_bn), (t_conv, t_bn) in zip(s_convs, t_convs):
        if t_bn is not None:
            out = _top(t_bn.weight.detach().abs(), s_conv.out_channels)
            kept["stem"].append(out.tolist())
        else:
            out = emb
        name = "patch_embed.proj." + s_prefix[id(s_conv)] if s_prefix[id(s_conv)] else "patch_embed.proj"
        state[f"{name}.weight"] = t_conv.weight.detach()[out][:, prev]
        if t_conv.bias is not None:
            state[f"{name}.bias"] = t_conv.bias.detach()[out]
        if t_bn is not None:
            bn = "patch_embed.proj." + s_prefix[id(s_bn)]
            for key in ("weight", "bias", "running_mean", "running_var"):
                state[f"{bn}.{key}"] = getattr(t_bn, key).detach()[out]
            state[f"{bn}.num_batches_tracked"] = t_bn.num_batches_tracked.detach()
        prev = out

    state["cls_token"] = t.cls_token.detach()[..., emb]
    pos = t.pos_embed.detach()[..., emb]
    extra = s.pos_embed.shape[1] - pos.shape[1]
    if extra == 1 and getattr(s, "dist_token", None) is not None and getattr(t, "dist_token", None) is None:
        # (1, 1 + P, D) -> (1, 2 + P, D): class, distillation (the class token's position), then patches.
        pos = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
    elif extra:
        raise VitcompressError("cannot map the teacher's position embedding onto the student's "
                               "(different token counts); set init_from_teacher: false")
    state["pos_embed"] = pos
    if getattr(t, "dist_token", None) is not None and getattr(s, "dist_token", None) is not None:
        state["dist_token"] = t.dist_token.detach()[..., emb]

    for i, (sb, tb) in enumerate(zip(s.blocks, t.blocks)):
        p = f"blocks.{i}"
        dims = _attn_dims(tb.attn, emb, sb.attn.num_heads, d_s)
        d_t = tb.attn.num_heads * tb.attn.head_dim
        rows = torch.cat([dims + k * d_t for k in range(3)])
        qkv_w = tb.attn.qkv.weight.detach()[rows][:, emb].clone()
        gain = math.sqrt(sb.attn.head_dim / tb.attn.head_dim)  # keeps each dim's share of the logit
        qkv_w[:d_s] *= gain
        state[f"{p}.attn.qkv.weight"] = qkv_w
        if tb.attn.qkv.bias is not None:
            qkv_b = tb.attn.qkv.bias.detach()[rows].clone()
            qkv_b[:d_s] *= gain
            state[f"{p}.attn.qkv.bias"] = qkv_b
        state[f"{p}.attn.proj.weight"] = tb.attn.proj.weight.detach()[emb][:, dims]
        state[f"{p}.attn.proj.bias"] = tb.attn.proj.bias.detach()[emb]
        hidden = _top(_sq(tb.mlp.fc1.weight[:, emb], 0) * _sq(tb.mlp.fc2.weight[emb], 1), sb.mlp.fc1.out_features)
        state[f"{p}.mlp.fc1.weight"] = tb.mlp.fc1.weight.detach()[hidden][:, emb]
        state[f"{p}.mlp.fc1.bias"] = tb.mlp.fc1.bias.detach()[hidden]
        state[f"{p}.mlp.fc2.weight"] = tb.mlp.fc2.weight.detach()[emb][:, hidden]
        state[f"{p}.mlp.fc2.bias"] = tb.mlp.fc2.bias.detach()[emb]
        for norm in ("norm1", "norm2"):
            state[f"{p}.{norm}.weight"] = getattr(tb, norm).weight.detach()[emb]
            state[f"{p}.{norm}.bias"] = getattr(tb, norm).bias.detach()[emb]
        kept["blocks"].append({"attn_dims": dims.tolist(), "mlp": hidden.tolist()})

    state["norm.weight"], state["norm.bias"] = t.norm.weight.detach()[emb], t.norm.bias.detach()[emb]
    state["head.weight"], state["head.bias"] = t.head.weight.detach()[:, emb], t.head.bias.detach()
    if hasattr(s, "head_dist"):
        src = t.head_dist if hasattr(t, "head_dist") else t.head
        state["head_dist.weight"], state["head_dist.bias"] = src.weight.detach()[:, emb], src.bias.detach()

    own = s.state_dict()
    for key, value in state.items():
        if key not in own or own[key].shape != value.shape:
            raise VitcompressError(f"weight selection built {key} {tuple(value.shape)} but the student has "
                                   f"{tuple(own[key].shape) if key in own else 'no such weight'}; "
                                   "set init_from_teacher: false")
    missing, unexpected = s.load_state_dict({k: v.clone() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if k != "dist_token"]  # a new distillation token keeps its random start
    if missing or unexpected:
        raise VitcompressError(f"weight selection left {(missing or unexpected)[0]} unset; set init_from_teacher: false")
    return kept


__all__ = ["select_weights"]
