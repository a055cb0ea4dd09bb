"""``lowrank.performer``: FAVOR+ random-feature attention on a trained ViT, training-free.

Performer (Choromanski et al., ICLR 2021, the study's ref [9]). The softmax kernel is an
expectation over Gaussian ω (their Lemma 1, positive random features):

    exp(xᵀy) = E_ω[ exp(ωᵀx − ‖x‖²/2) · exp(ωᵀy − ‖y‖²/2) ],   ω ~ N(0, I_d),

so with ``φ(x) = exp(Ωx − ‖x‖²/2) / √M`` for M features Ω (M × d), and x = q/d^¼, y = k/d^¼,

    softmax(Q Kᵀ/√d) V  ≈  D⁻¹ φ(Q) (φ(K)ᵀ V),    D = diag(φ(Q) (φ(K)ᵀ 1)),

in O(n·M·d). The rows of Ω are *orthogonal* random features (their §2.4): blocks of d rows
from the QR of a Gaussian matrix, each row rescaled to the norm of an independent Gaussian
vector so its marginal stays N(0, I). Features are positive, so the normaliser D never
changes sign (the trig features of Random Feature Attention do, and blow up).

Ω is drawn once, from ``seed``, when the module is built, and stored as a buffer: the saved
artifact holds exactly the features that were evaluated (no redraws). One Ω per layer, shared
by its heads. Numerical stabilisers: a per-query max is subtracted in φ(Q) and one max over all
keys in φ(K); each cancels between numerator and D.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...config import check
from ...models.arch import PLAIN_VIT, needs_plain_vit
from ..registry import StepOutput, register_method
from ._common import ApproxAttention, check_finetune, finetune, one_thread, prefix_tokens, swap_attention


def orthogonal_features(features: int, dim: int, *, seed: int) -> torch.Tensor:
    """(features, dim) orthogonal Gaussian random features, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(math.ceil(features / dim), dim, dim, generator=g, dtype=torch.float64)
    with one_thread():
        q, _ = torch.linalg.qr(gaussian)  # (blocks, dim, dim), orthonormal columns
    omega = q.transpose(-1, -2).reshape(-1, dim)[:features]  # rows orthonormal within each block of dim
    norms = torch.randn(features, dim, generator=g, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (omega * norms).float()


def positive_features(x: torch.Tensor, omega: torch.Tensor, *, is_query: bool) -> torch.Tensor:
    """φ(x) = exp(Ωx − ‖x‖²/2) up to a constant that cancels; x (B, heads, n, d) -> (B, heads, n, M)."""
    logits = x @ omega.T - 0.5 * (x * x).sum(dim=-1, keepdim=True)  # (B, heads, n, M)
    # A query's constant cancels in its own row; the keys' constant must be shared by all keys.
    stab = logits.amax(dim=-1, keepdim=True) if is_query else logits.amax(dim=(-2, -1), keepdim=True)
    return torch.exp(logits - stab.detach())


def favor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, omega: torch.Tensor, *,
                    scale: float) -> torch.Tensor:
    """FAVOR+ approximation of ``softmax(q kᵀ · scale) v``; q, k, v (B, heads, n, d) -> (B, heads, n, d)."""
    root = math.sqrt(scale)  # scale = 1/√d: each side gets d^-¼
    phi_q = positive_features(q * root, omega, is_query=True)  # (B, heads, n, M)
    phi_k = positive_features(k * root, omega, is_query=False)  # (B, heads, n, M)
    kv = phi_k.transpose(-1, -2) @ v  # (B, heads, M, d)
    num = phi_q @ kv  # (B, heads, n, d)
    den = phi_q @ phi_k.sum(dim=-2, keepdim=True).transpose(-1, -2)  # (B, heads, n, 1)
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


class PerformerAttention(ApproxAttention):
    """timm ``Attention`` with its softmax core replaced by FAVOR+ (M positive orthogonal random features)."""

    omega: torch.Tensor

    def __init__(self, attn: nn.Module, *, features: int, seed: int = 0, exact_prefix: int = 0) -> None:
        super().__init__(attn, exact_prefix=exact_prefix)
        if features < 1:
            raise ValueError(f"features must be >= 1, got {features}")
        self.features = features
        self.register_buffer("omega", orthogonal_features(features, self.head_dim, seed=seed))

    @classmethod
    def from_attention(cls, attn: nn.Module, *, features: int, seed: int = 0, exact_prefix: int = 0) -> PerformerAttention:
        return cls(attn, features=features, seed=seed, exact_prefix=exact_prefix)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q, k, v: (B, heads, N, head_dim)
        return favor_attention(q, k, v, self.omega.float(), scale=self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, features={self.features}"


@dataclass(frozen=True)
class PerformerConfig:
    features: int = 256
    seed: int = 0  # layer i draws its features from seed + i
    exact_cls: bool = False
    finetune_epochs: int = 0
    lr: float | None = None  # fine-tune learning rate; null: a third of the baseline's
    finetune_images: int | None = None  # fine-tune on this many training images (null: all)

    def __post_init__(self) -> None:
        check(1 <= self.features <= 65536, f"features must be in [1, 65536], got {self.features}")
        check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        check_finetune(self)


def _swap(model: nn.Module, cfg: PerformerConfig) -> int:
    prefix = prefix_tokens(model, cfg.exact_cls)
    return swap_attention(model, lambda i, attn: PerformerAttention.from_attention(
        attn, features=cfg.features, seed=cfg.seed + i, exact_prefix=prefix))


def _restore(model: nn.Module, cfg: PerformerConfig, meta: dict[str, Any]) -> nn.Module:
    # The features are redrawn from the seed here and then overwritten by the saved buffers.
    _swap(model, cfg)
    return model


@register_method(
    "lowrank.performer",
    PerformerConfig,
    family="low-rank",
    summary="Performer FAVOR+ attention (positive orthogonal random features) on the trained weights",
    restore=_restore,
    supports=PLAIN_VIT,
    requires=needs_plain_vit,
)
def performer(model: nn.Module, cfg: PerformerConfig, ctx: Any) -> StepOutput:
    model = copy.deepcopy(model)
    layers = _swap(model, cfg)
    model = finetune(model, ctx, cfg, desc=f"performer M={cfg.features}")
    return StepOutput(model, {"features": cfg.features, "layers": layers})
