"""What the low-rank methods share: an attention module built on a trained timm ``Attention``,
swapping such modules into a model, the model's sequence length, and the optional fine-tune.

An approximate attention keeps the trained layer's own ``qkv``, ``proj`` and norm modules (the
same module objects, so the state-dict keys are those of the vanilla model) and replaces only
the core ``softmax(Q Kᵀ · scale) · V``. That is how the study loads vanilla ViT weights into
its Nyströmformer: nothing but the core changes, and the module is swapped as an instance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import nn

from ...errors import VitcompressError


class ApproxAttention(nn.Module):
    """Base for attention approximations that reuse a trained timm ``Attention``'s layers.

    Subclasses implement :meth:`mix`, the approximation of ``softmax(q kᵀ · scale) v``.
    ``exact_prefix`` leading tokens (the class token) attend exactly to all keys: one row of
    the attention matrix per such token, O(n) each, so the token the classifier reads is not
    approximated.
    """

    def __init__(self, attn: nn.Module, *, exact_prefix: int = 0) -> None:
        super().__init__()
        if exact_prefix < 0:
            raise ValueError(f"exact_prefix must be >= 0, got {exact_prefix}")
        self.num_heads: int = int(attn.num_heads)
        self.head_dim: int = int(attn.head_dim)
        self.attn_dim: int = int(getattr(attn, "attn_dim", self.num_heads * self.head_dim))
        self.scale: float = float(attn.scale)
        self.exact_prefix = exact_prefix
        # The trained layers themselves (shared, not copied): state-dict keys stay those of timm's Attention.
        self.qkv = attn.qkv
        self.q_norm = _module_or_identity(attn, "q_norm")
        self.k_norm = _module_or_identity(attn, "k_norm")
        self.norm = _module_or_identity(attn, "norm")
        self.gate = getattr(attn, "gate", None)
        self.proj = attn.proj
        self.proj_drop = _module_or_identity(attn, "proj_drop")

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Approximate ``softmax(q kᵀ · scale) v``; all (B, heads, N, head_dim), float32."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(f"{type(self).__name__} approximates unmasked self-attention only")
        B, N, C = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim) each
        q, k = self.q_norm(q), self.k_norm(k)
        dtype = v.dtype
        # The core runs in float32 even under the training loop's bf16 autocast: bf16 alone adds
        # ~1 % error to it (measured, 197 tokens), and the pinv iteration's cubic terms and the
        # random features' exponentials amplify rounding. It is O(n·m) work, cheap in float32.
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = q.float(), k.float(), v.float()
            out = self.mix(q, k, v)  # (B, heads, N, head_dim)
            p = min(self.exact_prefix, N)
            if p:
                exact = F.scaled_dot_product_attention(q[:, :, :p], k, v, scale=self.scale)  # (B, heads, p, head_dim)
                out = torch.cat([exact, out[:, :, p:]], dim=2)
        x = out.to(dtype).transpose(1, 2).reshape(B, N, self.attn_dim)  # (B, N, heads·head_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, exact_prefix={self.exact_prefix}"


@contextmanager
def one_thread() -> Iterator[None]:
    """Run small LAPACK calls (SVD, QR of matrices a few hundred wide) on one thread, then restore.

    Threaded LAPACK is slower than one thread at these sizes, and on a machine whose cores are
    shared a 96 x 32 SVD took a second with 2 threads against 0.1 ms with one (measured).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _module_or_identity(attn: nn.Module, name: str) -> nn.Module:
    # Older timm Attention classes lack some of these (norm, gate); absent means identity.
    mod = getattr(attn, name, None)
    return mod if isinstance(mod, nn.Module) else nn.Identity()


def swap_attention(model: nn.Module, build: Callable[[int, nn.Module], nn.Module]) -> int:
    """Replace every timm ``Attention`` in ``model`` by ``build(index, attn)``, in place; return the count.

    Module instances are replaced in their parents; no class is patched.
    """
    targets = [name for name, mod in model.named_modules() if isinstance(mod, Attention)]
    if not targets:
        raise VitcompressError(
            "the model has no timm Attention modules to approximate (already approximated, or not a timm ViT); "
            "put the attention approximation first in the chain"
        )
    for i, name in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build(i, getattr(parent, child)))
    return len(targets)


def sequence_length(model: nn.Module) -> int:
    """Tokens per image the blocks see: patches plus class/register tokens."""
    patch_embed = getattr(model, "patch_embed", None)
    patches = getattr(patch_embed, "num_patches", None)
    if patches is None:
        raise VitcompressError(
            f"cannot tell the sequence length of {type(model).__name__} (no patch_embed.num_patches); "
            "use a timm VisionTransformer with a fixed img_size"
        )
    return int(patches) + int(getattr(model, "num_prefix_tokens", 0))


def prefix_tokens(model: nn.Module, exact_cls: bool) -> int:
    """Leading tokens kept exact: the class (and register) tokens when ``exact_cls``."""
    if not exact_cls:
        return 0
    n = int(getattr(model, "num_prefix_tokens", 0))
    if n == 0:
        raise VitcompressError("exact_cls is set but the model has no class token; set exact_cls: false")
    return n


def finetune(model: nn.Module, ctx: Any, cfg: Any, desc: str) -> nn.Module:
    """A short fine-tune through the shared loop (AdamW, warm-up + cosine, checkpoints in ctx.work_dir).

    ``cfg`` carries ``finetune_epochs``, ``lr`` and ``finetune_images``. Without ``lr`` it uses a
    third of the baseline's learning rate: the weights start trained, only the approximation's
    error is to be absorbed. ``finetune_images`` trains on a seeded subset of the training split.
    """
    if cfg.finetune_epochs <= 0:
        return model
    base = ctx.baseline_train
    lr = cfg.lr if cfg.lr is not None else base.lr / 3
    over: dict[str, Any] = {}
    if cfg.finetune_images is not None:
        over["train_subset"] = cfg.finetune_images
    return ctx.fit(model, epochs=cfg.finetune_epochs, lr=lr, min_lr=min(base.min_lr, lr),
                   warmup_epochs=min(base.warmup_epochs, 0.1 * cfg.finetune_epochs), desc=desc, **over).model


def check_finetune(cfg: Any) -> None:
    from ...config import check

    check(cfg.finetune_epochs >= 0, f"finetune_epochs must be >= 0, got {cfg.finetune_epochs}")
    check(cfg.lr is None or 0 < cfg.lr < 10, f"lr must be in (0, 10) or null, got {cfg.lr}")
    check(cfg.finetune_images is None or cfg.finetune_images >= 1,
          f"finetune_images must be >= 1 or null, got {cfg.finetune_images}")
