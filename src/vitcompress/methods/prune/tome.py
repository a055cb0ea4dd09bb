"""``tokens.merge``: Token Merging (Bolya et al., ICLR 2023), training-free token reduction.

The study's suggested fix for pruning's accuracy loss is to shorten the token
sequence instead (patch slimming / DynamicViT, its refs [22], [23]). ToMe does
that without training: in every block, between attention and the MLP, the r most
similar token pairs are merged by *bipartite soft matching*:

1. the non-prefix tokens are split alternately into sets A and B;
2. each token in A is linked to its most similar token in B (cosine similarity
   of the attention keys, averaged over heads: ToMe's eq. for the metric);
3. the r links with the highest similarity are merged (A token averaged into its
   B partner, weighted by how many patches each already stands for); the rest of
   A and all of B stay, the class token (and any other prefix token) is never merged.

``entry`` merges tokens once more, before the first block, matched on the
incoming tokens themselves (patch embedding + position; there are no keys yet):
then every block runs on the shorter sequence. On the fashion-mnist ViT, 20 tokens
merged there cost what 20 merged inside block 1 cost (-0.66 against -0.61 points,
no training) and ran 1.28x instead of 1.16x in OpenVINO, since block 1's attention
and MLP shrink too; 22 before block 1: 1.31-1.33x at -0.90 points
(benchmarks/tome_schedule.py, docs/results/tome_schedule/).

Merged tokens carry a *size* s (patches represented), and attention is
*proportional*: ``softmax(q k^T / sqrt(d) + log s)`` so a merged token keeps the
attention weight of the tokens it replaced (ToMe's eq. 1).

The model stays a timm VisionTransformer with the same weights: each block's
``Attention`` becomes a :class:`MergingAttention` and each ``Block`` a
:class:`MergingBlock` (instances of subclasses holding the very same submodules),
and ``model.blocks`` becomes :class:`MergingBlocks`, which threads the token sizes
from block to block. Nothing is patched on a class.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import nn

from ...config import LATE, check
from ...errors import VitcompressError
from ...models.arch import PLAIN_VIT, needs_plain_vit
from ..registry import StepOutput, register_method

DEFAULT_R = 4
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class TokenMergeConfig:
    r: int | None = None  # tokens merged in every block; with neither r nor keep: r = 4
    keep: float | None = None  # or: every block keeps this fraction of its non-class tokens
    # Or: tokens merged in each block, in order (missing blocks merge none), e.g. [24] merges once, in the
    # first block. Each merge is a handful of small operators (matching, sort, gathers); on a short sequence
    # their overhead can cost what the shorter sequence saves, so fewer, larger merges may run faster.
    schedule: tuple[int, ...] | None = field(default=None, metadata=LATE)
    # Proportional attention (ToMe's eq. 1: + log size in the softmax). Off, merged tokens are still size-weighted
    # averages but attend as one token each, and the blocks after a merge run attention without a mask.
    prop_attn: bool = field(default=True, metadata=LATE)
    # Tokens merged before the first block, matched on the tokens themselves (patch embedding + position): every
    # block then runs on the shorter sequence, where a merge inside block 1 leaves its attention at full length.
    # With entry alone the blocks merge nothing more (r, keep or schedule add merges inside the blocks).
    entry: int = field(default=0, metadata=LATE)

    def __post_init__(self) -> None:
        given = [n for n in ("r", "keep", "schedule") if getattr(self, n) is not None]
        check(len(given) <= 1, f"tokens.merge takes one of r, keep or schedule, not {' and '.join(given)}")
        check(self.entry >= 0, f"entry must be >= 0, got {self.entry}")
        check(self.schedule is None or all(v >= 0 for v in self.schedule),
              f"schedule entries must be >= 0, got {list(self.schedule or ())}")
        check(self.r is None or self.r >= 0, f"r must be >= 0, got {self.r}")
        check(self.keep is None or 0 < self.keep <= 1, f"keep must be in (0, 1], got {self.keep}")


def same_parts(cls: type[M], module: nn.Module) -> M:
    """An instance of subclass ``cls`` holding ``module``'s own submodules, parameters and settings."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, child in module.named_children():
        new.add_module(name, child)
    for name, param in module.named_parameters(recurse=False):
        new.register_parameter(name, param)
    for name, buf in module.named_buffers(recurse=False):
        new.register_buffer(name, buf)
    for name, value in vars(module).items():
        if not name.startswith("_") and name != "training":
            setattr(new, name, value)
    return new.train(module.training)


class MergingAttention(Attention):
    """timm Attention with proportional attention (``+ log size``) that also returns the keys for matching."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, size: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)  # (B, 1, 1, N)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
            if bias is not None:
                attn = attn + bias
            x = self.attn_drop(attn.softmax(dim=-1)) @ v  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj_drop(self.proj(x))
        return x, k.mean(dim=1)  # metric: (B, N, head_dim)


def bipartite_merge(metric: torch.Tensor, r: int, prefix: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """ToMe's bipartite soft matching: a function summing the r most similar A tokens into their B partners.

    ``metric`` is (B, N, C). Prefix tokens (the class token) pass through untouched and
    stay first; the unmerged A tokens follow (most similar first), then the B tokens.
    Token order carries no meaning past the position embedding: attention and the MLP
    treat tokens as a set, and the model reads out the class token only.

    Written for exported graphs as much as for PyTorch (OpenVINO is where the study
    times it): one gather of the A tokens in merge order, and the scatter-add into the
    B tokens as a matmul with a one-hot (B, Nb, r) matrix. On the fashion-mnist ViT in
    OpenVINO this graph ran 1.04x (r=10) and 1.08x (r=16) as fast as the two gathers and
    scatter-add it replaced.
    """
    with torch.no_grad():
        m = metric[:, prefix:]
        m = m / m.norm(dim=-1, keepdim=True)
        a, b = m[:, ::2], m[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # (B, Na, Nb)
        best, partner = scores.max(dim=-1)  # (B, Na)
        order = best.argsort(dim=-1, descending=True)  # A tokens: the first r merge, the rest stay
        dst = partner.gather(1, order[:, :r])  # (B, r): the B partner of each merging A token
        slots = torch.arange(b.shape[1], device=dst.device)
        joins = (dst[:, None, :] == slots[None, :, None]).to(metric.dtype)  # (B, Nb, r)

    def merge(x: torch.Tensor) -> torch.Tensor:
        head, rest = x[:, :prefix], x[:, prefix:]
        xa = rest[:, ::2].gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
        xb = rest[:, 1::2] + joins.to(x.dtype) @ xa[:, :r]
        return torch.cat([head, xa[:, r:], xb], dim=1)

    return merge


def merge_weighted(x: torch.Tensor, size: torch.Tensor | None,
                   merge: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens merged as size-weighted averages, and their new sizes (patches each stands for).

    Merges [x * s, s] in one go, then divides. Before the first merge every token stands for one patch.
    """
    if size is None:
        merged = merge(torch.cat([x, torch.ones_like(x[..., :1])], dim=-1))
    else:
        merged = merge(torch.cat([x * size, size], dim=-1))
    size = merged[..., -1:]
    return merged[..., :-1] / size, size


class MergingBlock(Block):
    """timm Block that merges ``r`` tokens between its attention and its MLP."""

    r: int
    prefix: int
    prop_attn: bool = True

    def merge_forward(self, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, metric = self.attn(self.norm1(x), size if self.prop_attn else None)
        x = x + self.drop_path1(self.ls1(y))  # (B, N, C)
        if self.r > 0:
            x, size = merge_weighted(x, size, bipartite_merge(metric, self.r, self.prefix))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise VitcompressError("token merging does not support attention masks")
        return self.merge_forward(x, None)[0]


class MergingBlocks(nn.Sequential):
    """``model.blocks`` that carries the merged tokens' sizes from one block to the next, after merging
    ``entry`` tokens before the first block (matched on the incoming tokens themselves)."""

    entry: int = 0
    prefix: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = None
        if self.entry > 0:
            x, size = merge_weighted(x, None, bipartite_merge(x, self.entry, self.prefix))
        for blk in self:
            x, size = blk.merge_forward(x, size)
        return x


def _cap(r: int, rest: int) -> int:
    return max(0, min(r, math.ceil(rest / 2), rest - 1))  # |A| = ceil(rest/2); keep one patch token


def merge_schedule(tokens: int, prefix: int, depth: int, cfg: TokenMergeConfig) -> list[int]:
    """Tokens merged in each block, capped so that bipartite matching can pair them and >= 1 patch token stays.

    ``tokens`` is the count entering the first block (after any ``entry`` merge)."""
    if cfg.schedule is not None and len(cfg.schedule) > depth:
        raise VitcompressError(f"tokens.merge schedule has {len(cfg.schedule)} entries for a model of {depth} "
                               "blocks; give at most one per block")
    out = []
    for i in range(depth):
        rest = tokens - prefix
        if cfg.schedule is not None:
            r = cfg.schedule[i] if i < len(cfg.schedule) else 0
        elif cfg.keep is not None:
            r = int(round((1 - cfg.keep) * rest))
        elif cfg.r is not None:
            r = cfg.r
        else:
            r = 0 if cfg.entry else DEFAULT_R  # entry alone merges before the blocks only
        r = _cap(r, rest)
        out.append(r)
        tokens -= r
    return out


def _check_model(model: nn.Module) -> tuple[int, int]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not all(type(b) is Block for b in blocks):
        raise VitcompressError("tokens.merge needs a timm VisionTransformer with plain Blocks "
                               "(apply it once, after any pruning)")
    if not all(isinstance(b.attn, Attention) and type(b.attn) is Attention for b in blocks):
        raise VitcompressError("tokens.merge needs plain timm Attention modules; put it before other swaps")
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if getattr(model, "global_pool", "token") != "token" or prefix < 1:
        raise VitcompressError("tokens.merge needs class-token pooling (global_pool='token'): averaged merged "
                               "tokens would be weighted wrongly")
    patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if patches is None:
        raise VitcompressError("tokens.merge needs model.patch_embed.num_patches to plan the merge schedule")
    return prefix, prefix + int(patches)


def apply_merging(model: nn.Module, cfg: TokenMergeConfig) -> tuple[nn.Module, list[int], list[int]]:
    """Swap in merging blocks, in place; the per-block r and the tokens entering each block."""
    prefix, tokens = _check_model(model)
    entry = _cap(cfg.entry, tokens - prefix)  # merged before the first block, capped as a block's merge is
    tokens -= entry
    schedule = merge_schedule(tokens, prefix, len(model.blocks), cfg)
    blocks = []
    for blk, r in zip(model.blocks, schedule):
        new = same_parts(MergingBlock, blk)
        new.attn = same_parts(MergingAttention, blk.attn)
        new.r, new.prefix, new.prop_attn = r, prefix, cfg.prop_attn
        blocks.append(new)
    model.blocks = MergingBlocks(*blocks)
    model.blocks.entry, model.blocks.prefix = entry, prefix
    entering = [tokens - sum(schedule[:i]) for i in range(len(schedule))]
    return model, schedule, entering


def _restore(model: nn.Module, cfg: TokenMergeConfig, meta: dict[str, Any]) -> nn.Module:
    model, schedule, _ = apply_merging(model, cfg)
    if meta.get("r_per_block") not in (None, schedule) or meta.get("entry", 0) != model.blocks.entry:
        raise VitcompressError("tokens.merge schedule differs from the saved one; the artifact does not match")
    return model


@register_method(
    "tokens.merge",
    TokenMergeConfig,
    family="pruning",
    summary="ToMe: merge r similar tokens per block (bipartite matching, proportional attention), no training",
    restore=_restore,
    supports=PLAIN_VIT,
    requires=needs_plain_vit,
)
def token_merge(model: nn.Module, cfg: TokenMergeConfig, ctx: Any) -> StepOutput:
    model, schedule, entering = apply_merging(copy.deepcopy(model), cfg)
    meta = {"r_per_block": schedule, "tokens_per_block": entering, "tokens_out": entering[-1] - schedule[-1]}
    if model.blocks.entry:
        meta["entry"] = model.blocks.entry  # merged before block 1: tokens_per_block[0] is after it
    return StepOutput(model.eval(), meta)
