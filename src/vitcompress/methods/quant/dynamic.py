"""``ptq.dynamic``: PyTorch dynamic int8 quantization of ``nn.Linear`` layers.

The study's "Dynamic Quantization" row (``torch.ao.quantization.quantize_dynamic``):
weights are stored as int8 with a scale (per output channel by default, per
tensor as in the study when ``per_channel: false``); activations are quantized
on the fly per batch, and the matmuls run in int8 (fbgemm/oneDNN kernels, VNNI
on this CPU). It needs no data. The runtime is CPU only: PyTorch has no CUDA
kernel for these modules.

PyTorch has no dynamic quantization for convolutions, so the patch embedding (or
conv stem, BatchNorm folded first) gets weight-only int8 (``convs: true``, the
default): int8 weights with per-channel scales in the file, dequantized when the
conv runs in float. Without it a conv-stem model's file keeps a fifth of its
weights in float32.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

from ...models.arch import SWAPPABLE_LINEARS, needs_swappable_linears
from ..registry import StepOutput, register_method
from .qmodules import Int8Conv2d
from .static import fold_for_quantization, refold, swap_modules


@dataclass(frozen=True)
class DynamicQuantConfig:
    per_channel: bool = True
    # Keep the classifier head in float: it is tiny, and its logits are what accuracy reads.
    skip_head: bool = False
    convs: bool = True  # weight-only int8 for the Conv2d layers (BatchNorm folded); false: Linear layers only


def _quantize(model: nn.Module, cfg: DynamicQuantConfig) -> nn.Module:
    qconfig = per_channel_dynamic_qconfig if cfg.per_channel else default_dynamic_qconfig
    spec: dict[Any, Any] = {nn.Linear: qconfig}
    model = model.cpu().eval()
    if cfg.skip_head:
        # Names in the spec select modules; list every Linear except the head ones.
        spec = {
            name: qconfig
            for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and not name.startswith(("head", "head_dist"))
        }
    return quantize_dynamic(model, spec, dtype=torch.qint8, inplace=False)


def _int8_convs(model: nn.Module, meta: dict[str, Any]) -> nn.Module:
    swap_modules(model, meta.get("convs", []), Int8Conv2d.from_conv, nn.Conv2d)
    return model


def _restore(model: nn.Module, cfg: DynamicQuantConfig, meta: dict[str, Any]) -> nn.Module:
    return _quantize(_int8_convs(refold(model, meta), meta), cfg)


@register_method(
    "ptq.dynamic",
    DynamicQuantConfig,
    family="quantization",
    summary="dynamic int8 Linear layers (torch quantize_dynamic, int8 GEMM on CPU)",
    restore=_restore,
    produces_int_weights=True,
    supports=SWAPPABLE_LINEARS,
    requires=needs_swappable_linears,
)
def dynamic_quantize(model: nn.Module, cfg: DynamicQuantConfig, ctx: Any) -> StepOutput:
    model = copy.deepcopy(model).cpu().eval()
    meta = fold_for_quantization(model, cfg.convs)
    return StepOutput(_quantize(_int8_convs(model, meta), cfg), meta)
