"""The convolutions of a ViT (patch projection or conv stem) for the quantization methods.

A timm ViT's patch embedding is one ``Conv2d``; the ``vitc_small`` stem is a
``Conv2d → BatchNorm2d → ReLU`` stack (a fifth of that model's parameters). The
quantization methods quantize these weights too, so that a quantized file holds
integer weights everywhere a float model holds a weight matrix. Before that, every
``BatchNorm2d`` that directly follows a ``Conv2d`` in an ``nn.Sequential`` is folded
into the conv (eval-mode statistics, ``torch.nn.utils.fusion.fuse_conv_bn_eval``) and
replaced by ``nn.Identity``: BatchNorm is an affine map at inference, so the folded
conv computes the same function with one weight tensor to quantize and no
BatchNorm buffers to store.

:func:`fold_batchnorms` returns what it folded (conv name, BatchNorm name) so a
method's ``restore`` can rebuild the same structure from the artifact's meta with
:func:`refold_structure` before the saved tensors are loaded.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorms(model: nn.Module) -> list[dict[str, str]]:
    """Fold each ``Conv2d`` + ``BatchNorm2d`` pair of every ``nn.Sequential`` in ``model`` (in place)."""
    folded: list[dict[str, str]] = []
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                prefix = f"{seq_name}." if seq_name else ""
                seq._modules[a] = fuse_conv_bn_eval(conv.eval(), bn.eval())
                seq._modules[b] = nn.Identity()
                folded.append({"conv": prefix + a, "bn": prefix + b})
    return folded


def refold_structure(model: nn.Module, folded: list[dict[str, str]]) -> None:
    """Give ``model`` the structure :func:`fold_batchnorms` left (values come from the artifact afterwards)."""
    for pair in folded:
        conv = model.get_submodule(pair["conv"])
        if conv.bias is None:
            conv.bias = nn.Parameter(conv.weight.new_zeros(conv.out_channels))
        model.set_submodule(pair["bn"], nn.Identity())


def conv_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Conv2d`` modules (groups 1) of ``model``, the ones the quantization methods take."""
    return [n for n, m in model.named_modules()
            if type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"]


def conv_meta(conv: nn.Conv2d) -> dict[str, Any]:
    """What rebuilding a quantized version of ``conv`` needs (JSON)."""
    return {"in": conv.in_channels, "out": conv.out_channels, "kernel": list(conv.kernel_size),
            "stride": list(conv.stride),
            "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding), "dilation": list(conv.dilation),
            "bias": conv.bias is not None}
