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
from .groups import attention_cut_supported
from .select import BlockPlan


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


def apply_plans(model: nn.Module, plans: list[BlockPlan]) -> nn.Module:
    """Cut every block of ``model`` (a timm VisionTransformer) to its plan, in place; returns the model."""
    if len(plans) != len(model.blocks):
        raise VitcompressError(f"pruning plan has {len(plans)} blocks, the model {len(model.blocks)}; "
                               "the artifact does not match its model")
    for blk, plan in zip(model.blocks, plans):
        blk.attn = cut_attention(blk.attn, plan.heads, plan.dims)
        cut_mlp(blk.mlp, plan.mlp)
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


def plans_to_meta(plans: list[BlockPlan]) -> list[dict[str, Any]]:
    """JSON for a step's meta: the shapes per block and the kept indices as ranges."""
    return [{"num_heads": len(p.heads), "head_dim": len(p.dims[0]), "mlp_hidden": len(p.mlp),
             "heads": ranges(p.heads), "dims": [ranges(d) for d in p.dims], "mlp": ranges(p.mlp)}
            for p in plans]


def plans_from_meta(blocks: list[dict[str, Any]]) -> list[BlockPlan]:
    try:
        return [BlockPlan(parse_ranges(b["heads"]), tuple(parse_ranges(d) for d in b["dims"]),
                          parse_ranges(b["mlp"])) for b in blocks]
    except (KeyError, TypeError, ValueError) as exc:
        raise VitcompressError(f"pruning meta is malformed ({exc}); delete the artifact and re-run") from None
