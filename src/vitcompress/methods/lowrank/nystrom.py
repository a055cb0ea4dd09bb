"""``lowrank.nystrom``: Nyström approximation of softmax attention on a trained ViT.

Nyströmformer (Xiong et al., AAAI 2021, §3; the study's ref [8] and its "ViT-Nyströmformer"
rows, m = 24/32/64 landmarks on 197 tokens). With ``S = softmax(Q Kᵀ / √d)`` and m landmarks
``Q̃, K̃`` (segment means of the queries and keys), the paper approximates

    S V  ≈  softmax(Q K̃ᵀ/√d) · (softmax(Q̃ K̃ᵀ/√d))⁺ · (softmax(Q̃ Kᵀ/√d) · V)
            (n × m)            (m × m)                (m × n)(n × d)

which costs O(n·m·d) instead of O(n²·d). The pseudo-inverse ``A⁺`` of the m × m landmark
kernel is the paper's iterative one (after Razavi et al. 2014):

    Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞),    Z_{j+1} = ¼ Z_j (13I − A Z_j (15I − A Z_j (7I − A Z_j))),

whose residual ``I − A Z`` shrinks as its cube per step (``p(1 − r) = ¾ r³ + ¼ r⁴``); the
paper uses 6 steps. Few steps leave the smallest singular directions of A un-inverted, which
acts as a regulariser, as in the paper.

Sequence lengths that m does not divide: **uneven segments**. Segment j covers tokens
``⌊j·n/m⌋ .. ⌊(j+1)·n/m⌋ − 1``, so segment
sizes are ⌊n/m⌋ or ⌈n/m⌉ with the larger ones spread evenly, and every landmark is the plain
mean of its own tokens (no padding, so no padded token dilutes a mean and no mask is needed).
With m = n each landmark is one token and the approximation is exact up to the pinv iteration.

The class token optionally attends exactly (``exact_cls``): its one row of S is computed in
full, O(n·d); the landmarks still cover all n tokens. The paper's extra depthwise-convolution
skip on V is a new trained layer, not part of loading vanilla weights, so it is left out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import check
from ...errors import VitcompressError
from ...models.arch import PLAIN_VIT, needs_plain_vit
from ..registry import StepOutput, register_method
from ._common import ApproxAttention, check_finetune, finetune, prefix_tokens, sequence_length, swap_attention

# Neither landmarks nor ratio set: the study's middle setting, m = 32 on 197 tokens, scaled to n.
DEFAULT_RATIO = 32 / 197


def iterative_pinv(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore–Penrose pseudo-inverse of each (m, m) matrix in ``a`` (..., m, m) by the order-3 iteration.

    The start ``Aᵀ / (‖A‖₁‖A‖∞)`` uses each matrix's own norms (max column / row abs sum): since
    ``σ_max² ≤ ‖A‖₁‖A‖∞`` every singular value of ``I − A Z₀`` lies in [0, 1), so it converges.
    """
    m = a.shape[-1]
    eye = torch.eye(m, dtype=a.dtype, device=a.device)
    norm_1 = a.abs().sum(dim=-2).amax(dim=-1)  # (...,) max column sum
    norm_inf = a.abs().sum(dim=-1).amax(dim=-1)  # (...,) max row sum
    z = a.transpose(-1, -2) / (norm_1 * norm_inf).clamp_min(torch.finfo(a.dtype).tiny)[..., None, None]
    for _ in range(iters):
        az = a @ z  # (..., m, m)
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def segment_bounds(n: int, m: int) -> list[int]:
    """Token boundaries of m contiguous segments of n tokens, sizes ⌊n/m⌋ or ⌈n/m⌉."""
    if not 1 <= m <= n:
        raise ValueError(f"need 1 <= m <= n landmarks, got m={m}, n={n}")
    return [(j * n) // m for j in range(m + 1)]


def segment_means(x: torch.Tensor, m: int) -> torch.Tensor:
    """Landmarks: means of m contiguous (possibly uneven) segments along dim -2. (..., n, d) -> (..., m, d)."""
    n = x.shape[-2]
    if n % m == 0:
        return x.unflatten(-2, (m, n // m)).mean(dim=-2)
    bounds = torch.tensor(segment_bounds(n, m), device=x.device)
    # Segment sums as differences of a prefix sum: O(n·d) whatever the segment sizes.
    csum = torch.nn.functional.pad(x.cumsum(dim=-2), (0, 0, 1, 0))  # (..., n + 1, d)
    sums = csum.index_select(-2, bounds[1:]) - csum.index_select(-2, bounds[:-1])  # (..., m, d)
    sizes = (bounds[1:] - bounds[:-1]).to(x.dtype)
    return sums / sizes[:, None]


def nystrom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, landmarks: int, scale: float,
                      pinv_iters: int = 6) -> torch.Tensor:
    """Nyström approximation of ``softmax(q kᵀ · scale) v``; q, k, v (B, heads, n, d) -> (B, heads, n, d)."""
    n = q.shape[-2]
    if landmarks > n:
        raise ValueError(f"{landmarks} landmarks exceed the {n} tokens of the sequence")
    q = q * scale  # the paper's q/d^¼ · k/d^¼: the product is what matters
    q_land = segment_means(q, landmarks)  # (B, heads, m, d)
    k_land = segment_means(k, landmarks)  # (B, heads, m, d)
    kernel_1 = (q @ k_land.transpose(-1, -2)).softmax(dim=-1)  # (B, heads, n, m)
    kernel_2 = (q_land @ k_land.transpose(-1, -2)).softmax(dim=-1)  # (B, heads, m, m)
    kernel_3 = (q_land @ k.transpose(-1, -2)).softmax(dim=-1)  # (B, heads, m, n)
    # Right to left keeps every product at n·m·d: no n × n matrix is ever formed.
    context = kernel_3 @ v  # (B, heads, m, d)
    context = iterative_pinv(kernel_2, pinv_iters) @ context  # (B, heads, m, d)
    return kernel_1 @ context  # (B, heads, n, d)


class NystromAttention(ApproxAttention):
    """timm ``Attention`` with its softmax core replaced by the Nyström approximation (m landmarks)."""

    def __init__(self, attn: nn.Module, *, landmarks: int, pinv_iters: int = 6, exact_prefix: int = 0) -> None:
        super().__init__(attn, exact_prefix=exact_prefix)
        if landmarks < 1 or pinv_iters < 0:
            raise ValueError(f"need landmarks >= 1 and pinv_iters >= 0, got {landmarks}, {pinv_iters}")
        self.landmarks = landmarks
        self.pinv_iters = pinv_iters

    @classmethod
    def from_attention(cls, attn: nn.Module, *, m: int, pinv_iters: int = 6, exact_prefix: int = 0) -> NystromAttention:
        """Build on a trained timm ``Attention``: shares its qkv/proj modules, heads, head_dim and scale."""
        return cls(attn, landmarks=m, pinv_iters=pinv_iters, exact_prefix=exact_prefix)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q, k, v: (B, heads, N, head_dim)
        return nystrom_attention(q, k, v, landmarks=self.landmarks, scale=self.scale, pinv_iters=self.pinv_iters)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, landmarks={self.landmarks}, pinv_iters={self.pinv_iters}"


@dataclass(frozen=True)
class NystromConfig:
    """m landmarks: ``landmarks``, or ``ratio`` (m = round(ratio · n) for n tokens), at most one of them.

    Neither set: ratio 32/197, i.e. the study's m = 32 on its 197 tokens (m = 8 on 50 tokens).
    """

    landmarks: int | None = None
    ratio: float | None = None
    pinv_iters: int = 6
    exact_cls: bool = False
    finetune_epochs: int = 0
    lr: float | None = None  # fine-tune learning rate; null: a third of the baseline's
    finetune_images: int | None = None  # fine-tune on this many training images (null: all)

    def __post_init__(self) -> None:
        check(self.landmarks is None or self.ratio is None,
              "set either landmarks or ratio, not both (ratio scales m with the sequence length)")
        check(self.landmarks is None or self.landmarks >= 1, f"landmarks must be >= 1, got {self.landmarks}")
        check(self.ratio is None or 0 < self.ratio < 1, f"ratio must be in (0, 1), got {self.ratio}")
        check(1 <= self.pinv_iters <= 50, f"pinv_iters must be in [1, 50], got {self.pinv_iters}")
        check_finetune(self)

    def resolve_landmarks(self, tokens: int) -> int:
        """m for a sequence of ``tokens``; refuses m >= n, which would be exact attention, not an approximation."""
        if self.landmarks is not None:
            m, how = self.landmarks, f"landmarks {self.landmarks}"
        else:
            ratio = self.ratio if self.ratio is not None else DEFAULT_RATIO
            m = max(1, round(ratio * tokens))
            how = f"ratio {ratio:.3g} x {tokens} tokens"
        if m >= tokens:
            raise VitcompressError(
                f"lowrank.nystrom: {how} gives m={m} >= n={tokens} tokens, which is exact attention, "
                f"not an approximation; use fewer landmarks (< {tokens}) or set ratio"
            )
        return m


def _swap(model: nn.Module, cfg: NystromConfig, m: int) -> int:
    prefix = prefix_tokens(model, cfg.exact_cls)
    return swap_attention(model, lambda i, attn: NystromAttention.from_attention(
        attn, m=m, pinv_iters=cfg.pinv_iters, exact_prefix=prefix))


def _restore(model: nn.Module, cfg: NystromConfig, meta: dict[str, Any]) -> nn.Module:
    _swap(model, cfg, int(meta["landmarks"]))
    return model


@register_method(
    "lowrank.nystrom",
    NystromConfig,
    family="low-rank",
    summary="Nyström attention (Nyströmformer, segment-mean landmarks, iterative pinv) on the trained weights",
    restore=_restore,
    supports=PLAIN_VIT,
    requires=needs_plain_vit,
)
def nystrom(model: nn.Module, cfg: NystromConfig, ctx: Any) -> StepOutput:
    tokens = sequence_length(model)
    m = cfg.resolve_landmarks(tokens)
    model = copy.deepcopy(model)
    layers = _swap(model, cfg, m)
    model = finetune(model, ctx, cfg, desc=f"nystrom m={m}")
    return StepOutput(model, {"landmarks": m, "tokens": tokens, "ratio": m / tokens, "layers": layers})
