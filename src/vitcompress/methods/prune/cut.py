"""Cut pruned units out of a timm ViT, so that it is a plain, smaller timm ViT afterwards.

Linear layers shrink (``in_features``/``out_features``), and each pruned block gets a
new timm ``Attention`` built by its own constructor with the new ``num_heads`` and
``attn_head_dim``, so ``num_heads``, ``head_dim``, ``attn_dim`` and ``scale`` are
whatever timm derives from the shapes: the model saves, loads, exports to ONNX and
runs in any runtime without anyone fixing attributes afterwards.

Why not Torch-Pruning: its timm ViT example (examples/transformers/prune_timm_vit.py)
rebinds ``Attention.forward`` on each instance and sets ``num_heads``/``head_dim`` by
hand after the cut; it leaves ``scale`` and timm 1.0's ``attn_dim`` (which the
forward reshapes with) at their old values. The cut itself is a few index selects,
so we write it and keep the module consistent by construction.

Temperature when head dims are removed: the trained logits are
``q.k / sqrt(d_old)``. timm's fused path calls ``scaled_dot_product_attention``
without ``scale``, which divides by ``sqrt(q.shape[-1])`` = ``sqrt(d_new)`` whatever
``self.scale`` says, so keeping ``scale = d_old**-0.5`` would be silently ignored on
the fused path and disagree with the manual one. Instead the q rows (weight and
bias) are multiplied by ``sqrt(d_new / d_old)``: then ``q'.k / sqrt(d_new)`` equals
the trained ``q.k / sqrt(d_old)`` on both paths, and ``scale`` stays timm's own
``d_new**-0.5``. Removing whole heads leaves ``head_dim`` and the temperature alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.models.vision_transformer import Attention
from torch import nn

from ...errors import VitcompressError
from .groups import STEM, attention_cut_supported, stem_convs
from .select import BlockPlan, PrunePlan


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def cut_attention(attn: Attention, heads: tuple[int, ...], dims: tuple[tuple[int, ...], ...]) -> Attention:
    """A new timm Attention holding only ``heads``, each with its ``dims`` (the same count for every head)."""
    h_old, d_old = attn.num_heads, attn.head_dim
    d_new = len(dims[0])
    if not heads or any(len(d) != d_new for d in dims) or d_new == 0:
        raise VitcompressError("a pruning plan must keep at least one head and the same number of dims per head")
    if (len(heads), d_new) == (h_old, d_old):
        return attn
    if not attention_cut_supported():
        raise VitcompressError("this timm's Attention has no attn_head_dim argument; upgrade timm (1.0.31 has it) "
                               "or prune MLP channels only (heads: false)")
    inner = torch.tensor([h * d_old + d for h, ds in zip(heads, dims) for d in ds])  # kept (head, dim) columns
    width = h_old * d_old
    rows = torch.cat([inner, inner + width, inner + 2 * width])  # the same columns of q, k and v
    qkv, proj = attn.qkv, attn.proj
    new = Attention(
        qkv.in_features, num_heads=len(heads), attn_head_dim=d_new, dim_out=proj.out_features,
        qkv_bias=qkv.bias is not None, proj_bias=proj.bias is not None,
        attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p,
        device=qkv.weight.device, dtype=qkv.weight.dtype,
    )
    weight = qkv.weight.detach()[rows].clone()
    bias = qkv.bias.detach()[rows].clone() if qkv.bias is not None else None
    q = slice(0, len(inner))
    temperature = math.sqrt(d_new / d_old)  # keeps q.k / sqrt(d) at its trained value (module docstring)
    weight[q] *= temperature
    if bias is not None:
        bias[q] *= temperature
    new.qkv = _linear(weight, bias)
    new.proj = _linear(proj.weight.detach()[:, inner], proj.bias.detach() if proj.bias is not None else None)
    new.fused_attn = attn.fused_attn  # the same kernel choice as the module it replaces
    return new.train(attn.training)


def cut_mlp(mlp: nn.Module, keep: tuple[int, ...]) -> None:
    """Keep only the hidden channels ``keep`` of a timm Mlp (fc1 rows, fc2 columns), in place."""
    if not keep:
        raise VitcompressError("a pruning plan must keep at least one MLP channel")
    if len(keep) == mlp.fc1.out_features:
        return
    idx = torch.tensor(keep)
    fc1, fc2 = mlp.fc1, mlp.fc2
    mlp.fc1 = _linear(fc1.weight.detach()[idx], fc1.bias.detach()[idx] if fc1.bias is not None else None)
    mlp.fc2 = _linear(fc2.weight.detach()[:, idx], fc2.bias.detach() if fc2.bias is not None else None)


def _conv(like: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    out = nn.Conv2d(weight.shape[1], weight.shape[0], like.kernel_size, like.stride, like.padding, like.dilation,
                    bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def cut_stem(model: nn.Module, keep: tuple[tuple[int, ...], ...]) -> None:
    """Keep only the channels ``keep[k]`` of each prunable stem conv k (its filters, its BatchNorm's entries,
    the next conv's input slices), in place; the stem's ``channels`` follow."""
    convs = stem_convs(model)
    if len(keep) != len(convs):
        raise VitcompressError(f"pruning plan has {len(keep)} stem convs, the model {len(convs)}; "
                               "the artifact does not match its model")
    stem = model.get_submodule(STEM)
    layers = stem.layers
    for (c, b), kept in zip(convs, keep):
        conv, bn, nxt = layers[c], layers[b], layers[c + 3]
        if not kept:
            raise VitcompressError("a pruning plan must keep at least one channel of every stem conv")
        if len(kept) == conv.out_channels:
            continue
        idx = torch.tensor(kept)
        layers[c] = _conv(conv, conv.weight.detach()[idx], conv.bias.detach()[idx] if conv.bias is not None else None)
        new_bn = nn.BatchNorm2d(len(kept), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                                track_running_stats=bn.track_running_stats,
                                device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(bn, name) is not None:
                    getattr(new_bn, name).copy_(getattr(bn, name)[idx])
            new_bn.num_batches_tracked.copy_(bn.num_batches_tracked)
        layers[b] = new_bn.train(bn.training)
        layers[c + 3] = _conv(nxt, nxt.weight.detach()[:, idx], nxt.bias.detach() if nxt.bias is not None else None)
    stem.channels = tuple(layers[c].out_channels for c, _ in convs)


def apply_plans(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Cut ``model`` (a timm VisionTransformer) to ``plan``, in place: every block, and the stem where the plan
    has one; returns the model."""
    if len(plan.blocks) != len(model.blocks):
        raise VitcompressError(f"pruning plan has {len(plan.blocks)} blocks, the model {len(model.blocks)}; "
                               "the artifact does not match its model")
    if plan.stem:
        cut_stem(model, plan.stem)
    for blk, bp in zip(model.blocks, plan.blocks):
        blk.attn = cut_attention(blk.attn, bp.heads, bp.dims)
        cut_mlp(blk.mlp, bp.mlp)
    return model


def ranges(indices: tuple[int, ...] | list[int]) -> str:
    """Sorted indices as compact text: ``(0, 1, 2, 5, 7, 8)`` -> ``"0-2,5,7-8"``."""
    parts: list[str] = []
    run: list[int] = []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def parse_ranges(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


def plan_to_meta(plan: PrunePlan) -> dict[str, Any]:
    """JSON for a step's meta: ``plan``, the shapes per block and the kept indices as ranges, and, when the
    stem was pruned, ``stem_plan``, the kept channels of each stem conv."""
    out: dict[str, Any] = {"plan": [
        {"num_heads": len(p.heads), "head_dim": len(p.dims[0]), "mlp_hidden": len(p.mlp),
         "heads": ranges(p.heads), "dims": [ranges(d) for d in p.dims], "mlp": ranges(p.mlp)}
        for p in plan.blocks]}
    if plan.stem:
        out["stem_plan"] = [{"channels": len(k), "kept": ranges(k)} for k in plan.stem]
    return out


def plan_from_meta(meta: dict[str, Any]) -> PrunePlan:
    """The :class:`PrunePlan` that :func:`plan_to_meta` wrote (meta without ``stem_plan``: blocks only)."""
    try:
        blocks = tuple(BlockPlan(parse_ranges(b["heads"]), tuple(parse_ranges(d) for d in b["dims"]),
                                 parse_ranges(b["mlp"])) for b in meta["plan"])
        stem = tuple(parse_ranges(k["kept"]) for k in meta.get("stem_plan", []))
    except (KeyError, TypeError, ValueError) as exc:
        raise VitcompressError(f"pruning meta is malformed ({exc}); delete the artifact and re-run") from None
    return PrunePlan(blocks, stem)
