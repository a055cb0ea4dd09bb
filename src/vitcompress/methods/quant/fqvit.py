"""``ptq.fqvit``: FQ-ViT, fully quantized ViT post-training quantization (Lin et al., 2021; the study's ref [19]).

Everything of ``ptq.static`` (int8 per-channel weights, calibrated uint8 inputs of
every Linear) plus the two parts FQ-ViT adds so that LayerNorm and Softmax can be
quantized as well:

* Power-of-Two Factor (§3.2): every LayerNorm input is quantized with one shared
  scale and zero point and a per-channel factor ``2^α_c``, ``α_c ∈ {0..K}``
  (``x_q = clip(round(x / (2^α_c s)) + zp, 0, 2^b − 1)``), which absorbs the
  inter-channel variation of LayerNorm inputs (the paper's Figure 1, left) that
  ruins a single per-tensor scale. ``ptf: false`` quantizes the same inputs with
  one per-tensor scale from the chosen calibrator, to show the difference.
* Log-Int-Softmax (§3.3): attention logits are quantized (8 bit), the softmax is
  computed with the integer exponential, and the probabilities are stored as
  ``att``-bit log2 codes ``q = clip(round(−log2 p), 0, 2^b − 1)``, so that
  ``attn · V`` is ``Σ V_q >> q`` (Figure 1, right). ``lis: false`` quantizes the
  probabilities uniformly at ``att`` bits instead (use ``w8a8att8`` to compare).

``bits`` reads like the paper's tables: ``w8a8att4`` is 8-bit weights, 8-bit
activations, 4-bit attention probabilities. Calibration runs on the float model
(all observers at once), as in FQ-ViT. In ONNX Runtime the Linear layers and
``q · kᵀ`` run as integer matmuls; PTF's quantizer and LayerNorm, the
Log-Int-Softmax and the shift-based ``attn · V`` have no integer kernel there and
run as float ops (see :func:`vitcompress.export.onnx.float_parts`).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ...config import check
from ...errors import VitcompressError
from ...models.arch import SWAPPABLE_LINEARS, needs_swappable_linears
from ..registry import StepOutput, register_method
from .observers import CALIBRATORS, CalibratorName, make_observer
from .static import (
    attention_names,
    calibrate,
    calibration_loader,
    fold_for_quantization,
    layernorm_names,
    linear_names,
    quantize_structure,
    refold,
)

_BITS = re.compile(r"^w(\d)a(\d)att(\d)$")


def parse_bits(bits: str) -> tuple[int, int, int]:
    """``"w8a8att4"`` → ``(8, 8, 4)``: weight, activation and attention-probability bits."""
    m = _BITS.match(bits)
    if not m:
        raise VitcompressError(f"ptq.fqvit.bits must look like 'w8a8att4' (weight, activation, attention bits), "
                               f"got {bits!r}")
    w, a, att = (int(g) for g in m.groups())
    if not (2 <= w <= 8 and 2 <= a <= 8 and 2 <= att <= 8):
        raise VitcompressError(f"ptq.fqvit.bits {bits!r}: each bit width must be in 2..8 (int8/uint8 storage)")
    return w, a, att


@dataclass(frozen=True)
class FQViTConfig:
    bits: str = "w8a8att4"
    calibrator: CalibratorName = "minmax"
    percentile: float = 99.99
    ptf: bool = True
    ptf_k: int = 3  # largest power-of-two factor exponent K (FQ-ViT: 3, factors 1, 2, 4, 8)
    lis: bool = True
    weight_calibrator: Literal["minmax", "omse"] = "minmax"
    calib_images: int | None = None  # None: the recipe's data.calib_images
    skip_head: bool = False
    convs: bool = True  # also the patch embedding / conv stem (BatchNorm folded first)

    def __post_init__(self) -> None:
        parse_bits(self.bits)
        check(self.calibrator in CALIBRATORS, f"ptq.fqvit.calibrator must be one of {', '.join(CALIBRATORS)}")
        check(50.0 < self.percentile <= 100.0, "ptq.fqvit.percentile must be in (50, 100]")
        check(0 <= self.ptf_k <= 7, "ptq.fqvit.ptf_k must be in 0..7")
        check(self.calib_images is None or self.calib_images >= 1, "ptq.fqvit.calib_images must be >= 1 or null")


def _structure(model: nn.Module, cfg: FQViTConfig, meta: dict[str, Any], weight_calibrator: str) -> nn.Module:
    w, a, att = parse_bits(cfg.bits)
    return quantize_structure(model, meta, w_bits=w, a_bits=a, att_bits=att, lis=cfg.lis, ptf=cfg.ptf,
                              ptf_k=cfg.ptf_k, weight_calibrator=weight_calibrator)


def _restore(model: nn.Module, cfg: FQViTConfig, meta: dict[str, Any]) -> nn.Module:
    return _structure(refold(model, meta), cfg, meta, "minmax").eval()


@register_method(
    "ptq.fqvit",
    FQViTConfig,
    family="quantization",
    summary="FQ-ViT PTQ: int8 weights/activations, Power-of-Two-Factor LayerNorm inputs, 4-bit Log-Int-Softmax",
    restore=_restore,
    produces_int_weights=True,
    supports=SWAPPABLE_LINEARS,
    requires=needs_swappable_linears,
)
def fqvit_quantize(model: nn.Module, cfg: FQViTConfig, ctx: Any) -> StepOutput:
    model = copy.deepcopy(model).cpu().eval()
    meta = fold_for_quantization(model, cfg.convs) | {
        "linears": linear_names(model, cfg.skip_head), "attentions": attention_names(model),
        "layernorms": layernorm_names(model)}
    _structure(model, cfg, meta, cfg.weight_calibrator)
    loader, first_batch = calibration_loader(ctx, cfg.calib_images)
    n = calibrate(model, loader, lambda: make_observer(cfg.calibrator, percentile=cfg.percentile, seed=ctx.seed),
                  first_batch)
    return StepOutput(model.eval(), meta | {"calib_images": n})
