"""Which dimensions of a timm ViT are coupled: removing one unit removes every slice it touches.

The prunable units follow Visual Transformer Pruning (Zhu et al., the study's
ref [15], Fig. 2a) and Torch-Pruning's dependency groups:

* attention, one unit per (head, dim): the dim's row in each of q, k and v of the
  fused ``qkv`` Linear (weight and bias) and its column of ``proj``. q and k dims
  are tied because their product forms the logits; v and proj's input because proj
  reads v's output; and timm's fused qkv needs one ``head_dim`` for q, k and v, so
  all four move together. A whole head is the union of its dims.
* MLP, one unit per hidden channel: ``fc1``'s row and bias entry and ``fc2``'s column.
* conv stem (``stem=True``, a ViT built with a :class:`~vitcompress.models.presets.ConvStem`),
  one unit per output channel of each 3x3 conv: the conv's filter, its BatchNorm's
  gain and shift (and running statistics) and the next conv's input slice. The stem's
  last 1x1 conv writes the embedding, so its outputs are not prunable (below). The
  stem holds a fifth of ``vitc_small``'s parameters and a quarter of its MACs, which
  pruning the blocks alone cannot reach.

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
from dataclasses import dataclass, replace
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

    block: int  # the block's index; for kind "stem", the stem conv's index (0 = the first conv)
    kind: Literal["attn", "mlp", "stem"]
    shape: tuple[int, ...]  # (heads, head_dim) for attention, (hidden,) for an MLP, (channels,) for a stem conv
    slices: tuple[ParamSlice, ...]
    unit_cost: int  # parameters removed with one unit
    gate_site: str  # the Linear (or, for the stem, the next Conv2d) that masks.py gates for this group
    # (index of another group, parameters one unit of each owns together): adjacent stem convs share the
    # weights between a channel of one and a channel of the next, which unit_cost counts in both.
    shared: tuple[tuple[int, int], ...] = ()

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


def make_group(block: int, kind: Literal["attn", "mlp", "stem"], shape: tuple[int, ...], slices: tuple[ParamSlice, ...],
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


STEM = "patch_embed.proj"  # where a ConvStem sits in a timm VisionTransformer


def stem_convs(model: nn.Module) -> list[tuple[int, int]]:
    """``(conv, batchnorm)`` indices in ``ConvStem.layers`` of each stem conv whose outputs are prunable.

    Raises a one-line error when the model has no conv stem.
    """
    from ...models.presets import ConvStem

    stem = model.get_submodule(STEM) if hasattr(model, "patch_embed") else None
    if not isinstance(stem, ConvStem):
        raise VitcompressError("stem: true prunes a conv stem's channels, but this model has a plain patch "
                               "projection; use a preset with a stem (vitc_small) or set stem: false")
    layers = list(stem.layers)
    # ConvStem lays out [conv, BatchNorm, ReLU] per 3x3 layer, then the 1x1 conv to the embedding width.
    return [(i, i + 1) for i in range(0, len(layers) - 1, 3)]


def _stem_groups(model: nn.Module, params: dict[str, nn.Parameter]) -> list[CoupledGroup]:
    groups = []
    for k, (c, b) in enumerate(stem_convs(model)):
        conv, nxt = f"{STEM}.layers.{c}", f"{STEM}.layers.{c + 3}"
        channels = model.get_submodule(conv).out_channels
        slices = (ParamSlice(f"{conv}.weight", 0, (channels,)), ParamSlice(f"{STEM}.layers.{b}.weight", 0, (channels,)),
                  ParamSlice(f"{STEM}.layers.{b}.bias", 0, (channels,)), ParamSlice(f"{nxt}.weight", 1, (channels,)))
        groups.append(make_group(k, "stem", (channels,), slices, params, nxt))
    # Group k's channels are the input channels of conv k+1, whose outputs are group k+1's: one weight
    # kernel per pair belongs to both. (Stem groups come first in find_groups, so index k is group k.)
    for k in range(len(groups) - 1):
        kernel = math.prod(model.get_submodule(groups[k].gate_site).kernel_size)
        groups[k] = replace(groups[k], shared=groups[k].shared + ((k + 1, kernel),))
        groups[k + 1] = replace(groups[k + 1], shared=groups[k + 1].shared + ((k, kernel),))
    return groups


def find_groups(model: nn.Module, *, attention: bool = True, stem: bool = False) -> list[CoupledGroup]:
    """The coupled groups of a timm VisionTransformer: with ``stem``, one per stem conv first; then per block an
    attention group and an MLP group."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not isinstance(blocks, nn.Sequential):
        raise VitcompressError(f"pruning needs a timm VisionTransformer (model.blocks); got {type(model).__name__}")
    params = dict(model.named_parameters())
    groups: list[CoupledGroup] = _stem_groups(model, params) if stem else []
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
