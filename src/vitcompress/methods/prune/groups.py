"""Which dimensions of a timm ViT are coupled: removing one unit removes every slice it touches.

The prunable units follow Visual Transformer Pruning (Zhu et al., the study's
ref [15], Fig. 2a) and Torch-Pruning's dependency groups:

* attention, one unit per (head, dim): the dim's row in each of q, k and v of the
  fused ``qkv`` Linear (weight and bias) and its column of ``proj``. q and k dims
  are tied because their product forms the logits; v and proj's input because proj
  reads v's output; and timm's fused qkv needs one ``head_dim`` for q, k and v, so
  all four move together. A whole head is the union of its dims.
* MLP, one unit per hidden channel: ``fc1``'s row and bias entry and ``fc2``'s column.

The embedding dimension is *not* a prunable group here: one channel runs through
the patch embedding, class token, position embedding, every LayerNorm, every
block's qkv/proj/fc1/fc2 and the head, and removing it changes every LayerNorm's
mean and variance, so the cut would not equal zeroing the channel and the
importance criteria below would not predict its effect.

A group is data: which parameter slices a unit owns (:class:`ParamSlice`), so the
importance criteria (``importance.py``) reduce over them without knowing the
architecture, and ``cut.py`` knows how to shrink the modules.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Literal

from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from ...errors import VitcompressError


@dataclass(frozen=True)
class ParamSlice:
    """Slices of one parameter owned by the units of a group.

    ``axis`` is the parameter axis that runs over units; reshaped to ``view`` its
    trailing ``len(group.shape)`` dims index the units, leading dims repeat them
    (the ``3`` of q, k, v in timm's fused qkv rows).
    """

    name: str
    axis: int
    view: tuple[int, ...]


@dataclass(frozen=True)
class CoupledGroup:
    """All units of one layer that can be removed independently of each other."""

    block: int
    kind: Literal["attn", "mlp"]
    shape: tuple[int, ...]  # (heads, head_dim) for attention, (hidden,) for an MLP
    slices: tuple[ParamSlice, ...]
    unit_cost: int  # parameters removed with one unit
    gate_site: str  # the Linear that masks.py gates for this group

    @property
    def units(self) -> int:
        return math.prod(self.shape)

    @property
    def head_cost(self) -> int:
        """Parameters of one whole head (attention groups)."""
        return self.unit_cost * self.shape[-1]


def _slice_cost(param: nn.Parameter, s: ParamSlice, unit_dims: int) -> int:
    per_index = param.numel() // param.shape[s.axis]
    repeats = math.prod(s.view[: len(s.view) - unit_dims])
    return per_index * repeats


def make_group(block: int, kind: Literal["attn", "mlp"], shape: tuple[int, ...], slices: tuple[ParamSlice, ...],
          params: dict[str, nn.Parameter], gate_site: str) -> CoupledGroup:
    """A group whose unit cost is counted from the actual parameters."""
    cost = sum(_slice_cost(params[s.name], s, len(shape)) for s in slices)
    return CoupledGroup(block, kind, shape, slices, cost, gate_site)


def _check_block(i: int, blk: nn.Module) -> None:
    attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
    # Exact types: a subclass (token merging, a gated or a quantized module) has other shapes or forwards.
    if type(attn) is not Attention or type(mlp) is not Mlp:
        raise VitcompressError(
            f"pruning needs plain timm Attention and Mlp blocks; block {i} has {type(attn).__name__} and "
            f"{type(mlp).__name__} (run pruning before tokens.merge, quantization or low-rank steps)"
        )
    extras = [name for name in ("q_norm", "k_norm", "norm") if not isinstance(getattr(attn, name), nn.Identity)]
    if getattr(attn, "gate", None) is not None:
        extras.append("gate")
    if not isinstance(mlp.norm, nn.Identity):
        extras.append("mlp.norm")
    if extras or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        raise VitcompressError(
            f"block {i} has layers pruning does not cut ({', '.join(extras) or 'conv MLP'}); "
            "prune a ViT without qk-norm, scale-norm or gated attention"
        )


def attention_cut_supported() -> bool:
    """Whether timm's Attention takes ``attn_head_dim`` (1.0.31 does; older releases may not).

    Without it the constructor derives head_dim from dim // num_heads, so a cut
    attention cannot be built by timm's own constructor.
    """
    return "attn_head_dim" in inspect.signature(Attention.__init__).parameters


def find_groups(model: nn.Module, *, attention: bool = True) -> list[CoupledGroup]:
    """The coupled groups of a timm VisionTransformer: per block an attention group, then an MLP group."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not isinstance(blocks, nn.Sequential):
        raise VitcompressError(f"pruning needs a timm VisionTransformer (model.blocks); got {type(model).__name__}")
    params = dict(model.named_parameters())
    groups: list[CoupledGroup] = []
    for i, blk in enumerate(blocks):
        _check_block(i, blk)
        a, m = f"blocks.{i}.attn", f"blocks.{i}.mlp"
        if attention:
            h, d = blk.attn.num_heads, blk.attn.head_dim
            slices = [ParamSlice(f"{a}.qkv.weight", 0, (3, h, d))]
            if blk.attn.qkv.bias is not None:
                slices.append(ParamSlice(f"{a}.qkv.bias", 0, (3, h, d)))
            slices.append(ParamSlice(f"{a}.proj.weight", 1, (h, d)))
            groups.append(make_group(i, "attn", (h, d), tuple(slices), params, f"{a}.qkv"))
        hidden = blk.mlp.fc1.out_features
        slices = [ParamSlice(f"{m}.fc1.weight", 0, (hidden,))]
        if blk.mlp.fc1.bias is not None:
            slices.append(ParamSlice(f"{m}.fc1.bias", 0, (hidden,)))
        slices.append(ParamSlice(f"{m}.fc2.weight", 1, (hidden,)))
        groups.append(make_group(i, "mlp", (hidden,), tuple(slices), params, f"{m}.fc2"))
    return groups
