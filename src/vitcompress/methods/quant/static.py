"""``ptq.static``: post-training static quantization with integer weights and calibrated activations.

Weights: per-output-channel symmetric, ``w_int = clip(round(w / s_c), −(2^(b−1) − 1), 2^(b−1) − 1)``
with ``s_c = max|w_c| / (2^(b−1) − 1)`` (or an MSE-searched clip, ``weight_calibrator: omse``),
stored in int8 whatever ``w_bits`` (8, 6, 4).

Activations: per-tensor *asymmetric uint8* at the input of every Linear,
``x_q = clip(round(x / s) + zp, 0, 2^b − 1)``, with ``(s, zp)`` from a calibrator
(``minmax``, ``ema``, ``percentile``, ``omse``; see :mod:`.observers`) run on a
seeded slice of the training split. Unsigned with a zero point because half the
Linear inputs (after GELU) are nearly all positive, and because uint8 × int8 is
the operand pair ONNX Runtime's x86 integer kernels (VPDPBUSD) take natively.
Optionally (``quant_attn_matmul: true``) both attention matmuls get quantized inputs too
and the softmax output is quantized uniformly (8 bit); ``quant_attn_matmul: qk`` quantizes
the inputs of ``Q·Kᵀ`` only, symmetric int8, which OpenVINO runs in its int8 attention
kernel while the softmax and ``softmax·V`` stay float (see :class:`.qmodules.QuantAttention`).

In PyTorch the model is a float simulation (:mod:`.qmodules`); its integer
deployment is the ONNX export (:mod:`vitcompress.export.onnx`), where
QuantizeLinear/DequantizeLinear around each MatMul run as ``MatMulIntegerToFloat``.
The module swap is by instance (Linear → QuantLinear), never by patching classes.

Convolutions (``convs: true``, the default): each BatchNorm after a conv is folded into
it (:mod:`.convs`), and each ``Conv2d`` (a timm ViT's patch projection, the convs of a
``vitc_small`` stem) becomes a :class:`.qmodules.QuantConv2d` with per-channel int8
weights and a calibrated uint8 input; in ONNX Runtime the stem's convs run as
``QLinearConv``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from timm.models.vision_transformer import Attention
from torch import nn

from ... import dist
from ...config import check
from ...data import make_loader
from ...models.arch import SWAPPABLE_LINEARS, needs_swappable_linears
from ..registry import StepOutput, register_method
from .convs import conv_names, fold_batchnorms, refold_structure
from .observers import CALIBRATORS, CalibratorName, Observer, make_observer
from .qmodules import ActQuantizer, PowerOfTwoLayerNorm, QuantAttention, QuantConv2d, QuantLinear

HEAD_NAMES = ("head", "head_dist")


@dataclass(frozen=True)
class StaticQuantConfig:
    w_bits: int = 8
    a_bits: int = 8
    calibrator: CalibratorName = "minmax"
    percentile: float = 99.99  # used by calibrator: percentile
    weight_calibrator: Literal["minmax", "omse"] = "minmax"
    calib_images: int | None = None  # None: the recipe's data.calib_images
    quant_attn_matmul: bool | Literal["qk"] = False  # true: both attention matmuls; "qk": Q·Kᵀ only
    skip_head: bool = False  # keep the classifier head float
    convs: bool = True  # also the patch embedding / conv stem (BatchNorm folded first); false: Linear layers only

    def __post_init__(self) -> None:
        check(self.w_bits in (2, 3, 4, 5, 6, 7, 8), "ptq.static.w_bits must be in 2..8 (int8 storage)")
        check(2 <= self.a_bits <= 8, "ptq.static.a_bits must be in 2..8 (uint8 storage)")
        check(self.calibrator in CALIBRATORS, f"ptq.static.calibrator must be one of {', '.join(CALIBRATORS)}")
        check(50.0 < self.percentile <= 100.0, "ptq.static.percentile must be in (50, 100]")
        check(self.calib_images is None or self.calib_images >= 1, "ptq.static.calib_images must be >= 1 or null")


# ---- structure (shared with ptq.fqvit and both restores) -----------------------------------------------------
def linear_names(model: nn.Module, skip_head: bool) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not (skip_head and n.split(".")[0] in HEAD_NAMES)]


def attention_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Attention) and not isinstance(m, QuantAttention)]


def layernorm_names(model: nn.Module) -> list[str]:
    # timm builds its own LayerNorm subclass; any LayerNorm over the last dim qualifies.
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.LayerNorm) and not isinstance(m, PowerOfTwoLayerNorm) and len(m.normalized_shape) == 1]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def swap_modules(model: nn.Module, names: Iterable[str], build: Callable[[Any], nn.Module], kind: type) -> None:
    for name in names:
        old = model.get_submodule(name)
        if not isinstance(old, kind):
            raise TypeError(f"{name} is a {type(old).__name__}, expected {kind.__name__}; the artifact does not "
                            "match its model")
        set_module(model, name, build(old))


def quantize_structure(model: nn.Module, meta: dict[str, Any], *, w_bits: int, a_bits: int, att_bits: int = 8,
                       lis: bool = False, ptf: bool = True, ptf_k: int = 3,
                       weight_calibrator: str = "minmax") -> nn.Module:
    """Swap the modules ``meta`` names for quantized ones (attention first: it keeps its qkv/proj by reference).

    ``meta["folded_bn"]`` (conv + BatchNorm pairs, see :mod:`.convs`) must already be folded.
    """
    qk_only = bool(meta.get("attn_qk_only", False))
    swap_modules(model, meta.get("attentions", []),
                 lambda m: QuantAttention(m, a_bits=a_bits, att_bits=att_bits, lis=lis, qk_only=qk_only), Attention)
    swap_modules(model, meta.get("layernorms", []),
                 lambda m: PowerOfTwoLayerNorm.from_layernorm(m, bits=a_bits, ptf=ptf, k=ptf_k), nn.LayerNorm)
    swap_modules(model, meta.get("linears", []),
                 lambda m: QuantLinear.from_linear(m, w_bits=w_bits, a_bits=a_bits,
                                                   weight_calibrator=weight_calibrator), nn.Linear)
    swap_modules(model, meta.get("convs", []),
                 lambda m: QuantConv2d.from_conv(m, w_bits=w_bits, a_bits=a_bits, weight_calibrator=weight_calibrator),
                 nn.Conv2d)
    return model


def fold_for_quantization(model: nn.Module, convs: bool) -> dict[str, Any]:
    """Fold the BatchNorms into their convs when the convs get quantized; the meta entries that say so."""
    if not convs:
        return {"convs": [], "folded_bn": []}
    return {"folded_bn": fold_batchnorms(model), "convs": conv_names(model)}


def refold(model: nn.Module, meta: dict[str, Any]) -> nn.Module:
    """The structure :func:`fold_for_quantization` left, rebuilt on a fresh float model (values from the file)."""
    refold_structure(model, meta.get("folded_bn", []))
    return model


@torch.no_grad()
def calibrate(model: nn.Module, loader: Iterable[Any], make: Callable[[], Observer], first_batch: int = 0) -> int:
    """Run ``loader`` through the float model with an observer on every quantizer; set scales. Returns #images.

    Under torch.distributed each process passes its own share of the batches (see
    :func:`calibration_loader`; ``first_batch`` is the global index of its first batch)
    and the observers merge across processes before the scales are set, so every
    process gets the scales one process would get from all the batches.
    """
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    for q in quantizers:
        q.begin_calibration(make())
        if q.observer is not None:
            q.observer.batch = first_batch
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    seen = 0
    try:
        for x, *_ in loader:
            model(x.to(device))
            seen += len(x)
        if dist.is_distributed():
            observers = [q.observer for q in quantizers if q.observer is not None]
            # One collective for all quantizers; each process's list is in the same (module) order.
            gathered = dist.all_gather_object((seen, [o.state() for o in observers]))
            seen = sum(n for n, _ in gathered)
            for i, o in enumerate(observers):
                o.merge([states[i] for _, states in gathered])  # type: ignore[arg-type]
    except BaseException:
        for q in quantizers:
            q.observer = None  # leave no half-calibrated observer behind
        raise
    for q in quantizers:
        q.end_calibration()
    return seen


def calibration_loader(ctx: Any, n: int | None, batch_size: int = 64) -> tuple[Iterable[Any], int]:
    """This process's share of the step's calibration slice, and the global index of its first batch.

    In one process: the whole slice (``ctx.calib_loader``'s batches). Under
    ``accelerate launch``: a contiguous run of whole batches, the processes'
    runs together making the one-process batches in order.
    """
    ds = ctx.calib_dataset(n)
    part = dist.shard(len(ds), batch_size)
    if not part:
        return [], part.start // batch_size
    loader = make_loader(ds.subset(torch.arange(part.start, part.stop)), batch_size, train=False,
                         img_size=ctx.img_size, in_chans=ctx.in_chans)
    return loader, part.start // batch_size


# ---- the method ---------------------------------------------------------------------------------------------
def _meta(model: nn.Module, cfg: StaticQuantConfig) -> dict[str, Any]:
    """Folds the model's BatchNorms (when its convs are quantized) and names what gets quantized."""
    return fold_for_quantization(model, cfg.convs) | {
        "linears": linear_names(model, cfg.skip_head),
        "attentions": attention_names(model) if cfg.quant_attn_matmul else [],
        "attn_qk_only": cfg.quant_attn_matmul == "qk"}


def _restore(model: nn.Module, cfg: StaticQuantConfig, meta: dict[str, Any]) -> nn.Module:
    # Values come from the file; minmax is the cheapest way to fill the placeholders.
    return quantize_structure(refold(model, meta), meta, w_bits=cfg.w_bits, a_bits=cfg.a_bits).eval()


@register_method(
    "ptq.static",
    StaticQuantConfig,
    family="quantization",
    summary="static int8 PTQ: per-channel int8 weights, calibrated uint8 activations (QDQ → int8 MatMul in ONNX Runtime)",
    restore=_restore,
    produces_int_weights=True,
    supports=SWAPPABLE_LINEARS,
    requires=needs_swappable_linears,
)
def static_quantize(model: nn.Module, cfg: StaticQuantConfig, ctx: Any) -> StepOutput:
    model = copy.deepcopy(model).cpu().eval()
    meta = _meta(model, cfg)
    quantize_structure(model, meta, w_bits=cfg.w_bits, a_bits=cfg.a_bits, weight_calibrator=cfg.weight_calibrator)
    loader, first_batch = calibration_loader(ctx, cfg.calib_images)
    n = calibrate(model, loader, lambda: make_observer(cfg.calibrator, percentile=cfg.percentile, seed=ctx.seed),
                  first_batch)
    return StepOutput(model.eval(), meta | {"calib_images": n})
