"""What a model's architecture allows: the checks behind "method X cannot run on architecture Y".

Methods are written against timm's modules. Two requirements cover them:

* `plain_vit_problem`: a timm ``VisionTransformer`` (DeiT's distilled subclass and register
  tokens included) whose blocks are timm's plain ``Block`` with its ``Attention`` (fused qkv,
  no q/k norms) and a two-Linear ``Mlp``. Pruning cuts those Linears, token merging and the
  low-rank attentions replace those modules. Swin, BEiT, EVA, a CNN are not that.
* `linear_swap_problem`: every ``nn.Linear`` is used by calling it. Quantization and SVD
  replace each Linear by another module; an architecture that reads ``qkv.weight`` itself
  (BEiT and EVA add their own q/v biases that way) would then crash. This is found by running
  the model on the ``meta`` device (no memory, no arithmetic) with every Linear swapped for a
  module that has no ``weight``.

`meta_model` builds a model on the meta device, so ``vitcompress validate`` checks a recipe's
baseline and students without memory, downloads or weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

__all__ = ["ANY_MODEL", "PLAIN_VIT", "SWAPPABLE_LINEARS", "architecture_name", "linear_swap_problem", "meta_model",
           "needs_plain_vit", "needs_swappable_linears", "plain_vit_problem"]

PLAIN_VIT = "timm ViT / DeiT with plain blocks (presets, vit_*, deit_*, transformers ViT/DeiT)"
SWAPPABLE_LINEARS = "any model whose Linear layers are called as modules (ViT, DeiT, Swin, CNN heads; not BEiT, EVA)"
ANY_MODEL = "any model"


def architecture_name(model: nn.Module) -> str:
    return type(model).__name__


def plain_vit_problem(model: nn.Module) -> str | None:
    """Why ``model`` is not a timm ViT of plain blocks, or None when it is."""
    if not isinstance(model, VisionTransformer):
        return f"{architecture_name(model)} is not a timm VisionTransformer"
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not len(blocks):
        return "its blocks are not one nn.Sequential of timm Blocks"
    for i, blk in enumerate(blocks):
        if type(blk) is not Block:
            return f"block {i} is a {type(blk).__name__}, not timm's plain Block"
        attn, mlp = blk.attn, blk.mlp
        if type(attn) is not Attention or not isinstance(getattr(attn, "qkv", None), nn.Linear):
            return f"block {i}'s attention is a {type(attn).__name__}, not timm's Attention with a fused qkv"
        extras = [n for n in ("q_norm", "k_norm", "norm") if not isinstance(getattr(attn, n, nn.Identity()), nn.Identity)]
        if extras:
            return f"block {i}'s attention has {extras[0]}"
        if not isinstance(mlp, Mlp) or not isinstance(getattr(mlp, "fc1", None), nn.Linear) or not isinstance(
                getattr(mlp, "fc2", None), nn.Linear) or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            return f"block {i}'s MLP is not timm's two-Linear Mlp"
    return None


class _NoWeight(nn.Module):
    """Stands in for a Linear the way a quantized module does: callable, with no ``weight`` tensor."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], self.out_features))


def linear_swap_problem(model: nn.Module, example_shape: tuple[int, ...] | None) -> str | None:
    """Why replacing ``model``'s Linear layers by other modules breaks it, or None when it runs.

    ``model`` should live on the meta device (see `meta_model`); ``example_shape`` is one input
    (C, H, W), None to skip the run (only the structure is checked then).
    """
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        return f"{architecture_name(model)} has no Linear layers"
    if example_shape is None:
        return None
    probe = copy.deepcopy(model)
    for mod in list(probe.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                setattr(mod, child_name, _NoWeight(child))
    try:
        with torch.no_grad():
            probe.eval()(torch.empty((1, *example_shape), device="meta"))
    except (AttributeError, TypeError) as exc:
        return (f"{architecture_name(model)} reads its Linear layers' weights directly "
                f"({(str(exc).splitlines() or [''])[0][:80]}), so they cannot be replaced by quantized or factorized "
                "modules")
    except Exception:  # the meta run itself is not supported by this model: say nothing rather than guess
        return None
    return None


def meta_model(build: Any) -> nn.Module | None:
    """``build()`` run on the meta device (structure only); None when the model cannot be built there."""
    try:
        with torch.device("meta"):
            return build()
    except Exception:
        return None


def needs_plain_vit(model: nn.Module, config: Any = None, example_shape: tuple[int, ...] | None = None) -> str | None:
    """A method requirement (see ``register_method``): a timm ViT of plain blocks."""
    return plain_vit_problem(model)


def needs_swappable_linears(model: nn.Module, config: Any = None,
                            example_shape: tuple[int, ...] | None = None) -> str | None:
    """A method requirement: Linear layers that can be replaced by other modules."""
    return linear_swap_problem(model, example_shape)


def memory_need(model: nn.Module, *, train_batch: int | None, eval_batch: int) -> tuple[int, str]:
    """A rough upper estimate of the bytes running ``model`` takes (built on the meta device is enough), and
    what dominates it: its parameters (four copies when training: weights, gradients, AdamW's two moments),
    and for a ViT the activations a batch keeps per block and one block's attention scores (B x heads x N^2;
    every block's when training, for the backward pass)."""
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    need, parts = params * 4 * (4 if train_batch else 1), {"parameters": params * 4 * (4 if train_batch else 1)}
    embed = getattr(model, "patch_embed", None)
    blocks = getattr(model, "blocks", None)
    if embed is not None and blocks is not None and hasattr(embed, "num_patches") and len(blocks):
        n = int(embed.num_patches) + int(getattr(model, "num_prefix_tokens", 1))
        dim, depth = int(getattr(model, "embed_dim", 0)), len(blocks)
        heads = int(getattr(getattr(blocks[0], "attn", None), "num_heads", 1) or 1)
        evals = eval_batch * (8 * n * dim + heads * n * n) * 4
        parts["activations"] = evals
        if train_batch:
            trains = train_batch * depth * (12 * n * dim + heads * n * n) * 4
            parts["activations"] = max(evals, trains)
        need = parts["parameters"] + parts["activations"]
    top = max(parts, key=parts.get)  # type: ignore[arg-type]
    return need, f"mostly {top}: {parts[top] / 1e9:.1f} GB"


def machine_memory() -> int:
    """Bytes of RAM this machine has."""
    import os

    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse
