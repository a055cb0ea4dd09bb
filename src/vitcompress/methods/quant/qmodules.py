"""Quantized modules that hold integer weights, for ``ptq.static`` and ``ptq.fqvit``.

Every module here stores what an integer runtime needs and nothing else:
``QuantLinear`` keeps an int8 weight tensor with a (float16-stored) scale per
output channel (symmetric, ``w ≈ w_int · s_c``) plus the scale and zero point of
its input (asymmetric uint8, ``x ≈ (x_q − zp) · s``). They are buffers, so the
saved safetensors file holds int8 and the state dict round-trips exactly.

In PyTorch these modules *simulate* quantization in float (quantize, then
dequantize, then a float matmul): the arithmetic is not integer, and a result
row measured in torch eager must say so. The same graph exported to ONNX
(:mod:`vitcompress.export.onnx`) becomes QuantizeLinear/DequantizeLinear pairs
around each MatMul, which ONNX Runtime fuses into integer kernels
(``MatMulIntegerToFloat``: uint8 × int8 → int32 accumulate). The two custom ops
below are the seam: eager kernels here, ONNX translations in the exporter.

FQ-ViT (Lin et al., 2021) parts:

* :class:`PowerOfTwoLayerNorm` (§3.2, PTF): the LayerNorm input is quantized
  with one shared scale ``s`` and zero point and a per-channel power-of-two
  factor, ``x_q = clip(round(x / (2^α_c s)) + zp, 0, 2^b − 1)``. Integer
  LayerNorm computes mean and variance of ``(x_q − zp) << α_c``; LayerNorm is
  invariant to the common factor ``s``, so normalizing the dequantized input in
  float gives the same result.
* :class:`LogIntSoftmax` (§3.3, LIS): the softmax is evaluated on the integer
  attention logits with I-BERT's integer exponential (Kim et al., 2021, §3.4:
  ``exp(x) = 2^−z · exp(p)``, ``x = −z ln2 + p``, ``exp(p) ≈ 0.3585 (p + 1.353)² + 0.344``),
  and its output is quantized in the log2 domain at ``b`` bits,
  ``q = clip(round(−log2 p), 0, 2^b − 1)`` (rounded on the integer ratio
  ``Σ exp / exp``: MSB position plus the next bit); ``attn · V`` then needs only
  shifts, ``p ≈ 2^−q``. Codes that would exceed ``2^b − 1`` mean ``p ≈ 0``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import nn

from ...errors import VitcompressError
from .observers import Observer, PowerOfTwoObserver, quantize_weight_per_channel

_LN2 = math.log(2.0)


# ---- custom ops: eager kernels (the ONNX translations live in vitcompress.export.onnx) ---------------------
@torch.library.custom_op("vitcompress::fake_quant", mutates_args=())
def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize→dequantize ``x``; ``scale``/``zero_point`` are 0-d (per tensor) or ``(C,)`` along the last dim."""
    zp = zero_point.to(x.dtype)
    q = torch.clamp(torch.round(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


@fake_quant.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("vitcompress::dequant_weight_t", mutates_args=())
def dequant_weight_t(w_int: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The transposed float weight ``(in, out)`` of an int8 ``(out, in)`` weight with per-row scales."""
    # Transposed so that ``x @ w`` is one MatMul in ONNX with the DequantizeLinear right at its input,
    # the pattern ONNX Runtime fuses into an integer matmul.
    return w_int.t().to(torch.float32) * scale[None, :]


@dequant_weight_t.register_fake
def _(w_int: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # The same layout as the real kernel's output: the transpose of a contiguous (out, in) tensor.
    # A contiguous (in, out) here broke torch.compile ("expected stride 1==288") on every QDQ model.
    return w_int.new_empty((w_int.shape[0], w_int.shape[1]), dtype=torch.float32).t()


@torch.library.custom_op("vitcompress::dequant_weight", mutates_args=())
def dequant_weight(w_int: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float weight of an int8 weight ``(out, ...)`` with one scale per output channel (dim 0)."""
    return w_int.to(torch.float32) * scale.view(-1, *([1] * (w_int.dim() - 1)))


@dequant_weight.register_fake
def _(w_int: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(w_int, dtype=torch.float32)


class QuantModule(nn.Module):
    """Marker base: a module whose deployed form is integer QDQ in ONNX Runtime."""


# ---- activation quantizers ----------------------------------------------------------------------------------
class ActQuantizer(QuantModule):
    """Per-tensor asymmetric unsigned quantizer: ``x_q = clip(round(x / s) + zp, 0, 2^b − 1)``.

    During calibration an :class:`Observer` is attached and the input passes
    through unchanged (calibration sees the float model, as in FQ-ViT).
    ``fixed_scale`` pins the scale (zero point 0), e.g. softmax outputs in [0, 1].
    ``signed``: symmetric int8 instead, ``x_q = clip(round(x / s), −2^(b−1), 2^(b−1) − 1)`` with
    ``s = max(|lo|, |hi|) / (2^(b−1) − 1)`` over the calibrator's clip range; for operands that are
    centred on zero (attention queries and keys), where OpenVINO's int8 attention kernel wants them.
    """

    def __init__(self, bits: int = 8, fixed_scale: float | None = None, signed: bool = False) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise VitcompressError(f"activation bits must be in 2..8 (8-bit storage), got {bits}")
        self.bits = bits
        self.signed = signed
        self.qmin, self.qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        self.fixed = fixed_scale is not None
        self.register_buffer("scale", torch.tensor(fixed_scale if fixed_scale is not None else 1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.observer: Observer | PowerOfTwoObserver | None = None

    def begin_calibration(self, observer: Observer) -> None:
        if not self.fixed:
            self.observer = observer

    def end_calibration(self) -> None:
        if self.observer is None:
            return
        assert isinstance(self.observer, Observer)
        if self.signed:
            lo, hi = self.observer.clip_range(self.qmin, self.qmax)
            scale, zp = max(abs(lo), abs(hi), 1e-8) / self.qmax, 0
        else:
            scale, zp = self.observer.qparams(self.qmin, self.qmax)
        self.scale.fill_(scale)
        self.zero_point.fill_(zp)
        self.observer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        return fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        sign = ", signed" if self.signed else ""
        return f"bits={self.bits}{sign}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"


class PowerOfTwoQuantizer(ActQuantizer):
    """PTF quantizer of a ``(..., C)`` input: shared scale ``s`` and zero point, channel scale ``2^α_c s``."""

    def __init__(self, channels: int, bits: int = 8, k: int = 3) -> None:
        super().__init__(bits)
        if not 0 <= k <= 7:
            raise VitcompressError(f"PTF factor exponent K must be in 0..7, got {k}")
        self.channels, self.k = channels, k
        self.register_buffer("alpha", torch.zeros(channels, dtype=torch.int8))

    def begin_calibration(self, observer: Observer) -> None:
        # PTF picks its own range (min/max over all channels) and searches α per channel.
        self.observer = PowerOfTwoObserver(self.channels)

    def end_calibration(self) -> None:
        if self.observer is None:
            return
        assert isinstance(self.observer, PowerOfTwoObserver)
        base, zp, alpha = self.observer.ptf_params(self.qmax, self.k)
        self.scale.fill_(base)
        self.zero_point.fill_(zp)
        self.alpha.copy_(alpha)
        self.observer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        # round(x / (2^α s)) = round((x / 2^α) / s) exactly (power-of-two scaling is exact in float), so
        # PTF is a per-tensor quantizer between per-channel shifts: what integer LayerNorm does with
        # (x_q − zp) << α, and in ONNX a fast per-tensor QuantizeLinear instead of a per-axis one.
        shift = torch.pow(2.0, self.alpha.to(torch.float32))  # (C,)
        return fake_quant(x / shift, self.scale, self.zero_point, self.qmin, self.qmax) * shift

    def extra_repr(self) -> str:
        return super().extra_repr() + f", channels={self.channels}, K={self.k}"


# ---- weights ------------------------------------------------------------------------------------------------
def _fill_int8(mod: nn.Module, layer: nn.Linear | nn.Conv2d, w_bits: int, weight_calibrator: str):  # noqa: ANN202
    """Give ``mod`` (a ``QuantLinear`` or ``Int8Conv2d``) the per-channel int8 weight, float16 scales and bias of
    the float ``layer``; return it on the layer's device."""
    q, scale = quantize_weight_per_channel(layer.weight, w_bits, weight_calibrator,  # type: ignore[arg-type]
                                           scale_dtype=torch.float16)
    mod.weight_int8.copy_(q)
    mod.weight_scale.copy_(scale)
    if layer.bias is not None:
        assert mod.bias is not None
        mod.bias.data.copy_(layer.bias.detach())
    return mod.to(layer.weight.device)


class QuantLinear(QuantModule):
    """``y = Q(x) @ (w_int · s)ᵀ + b`` with int8 ``w_int`` (per-output-channel symmetric) and uint8 ``Q(x)``.

    The per-channel scales and the bias are stored in float16: next to 8-bit weights and
    activations their rounding (2^−11 relative) is noise, and it keeps the file near 1/4 of fp32.
    They are widened to float32 for compute (in ONNX the Cast folds into a float32 initializer).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, w_bits: int = 8, a_bits: int = 8) -> None:
        super().__init__()
        self.in_features, self.out_features, self.w_bits = in_features, out_features, w_bits
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=torch.float16), requires_grad=False) if bias else None
        self.input_quant = ActQuantizer(a_bits)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, w_bits: int = 8, a_bits: int = 8,
                    weight_calibrator: str = "minmax") -> QuantLinear:
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, w_bits=w_bits, a_bits=a_bits)
        return _fill_int8(mod, linear, w_bits, weight_calibrator)

    @property
    def weight_numel(self) -> int:
        """Weights held as int8 buffers (``vitcompress.measure.count_params`` adds them to the parameters)."""
        return self.weight_int8.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quant(x)
        w_t = dequant_weight_t(self.weight_int8, self.weight_scale.float())  # (in, out)
        if x.dim() == 2:
            # Keep a rank-3 MatMul: ONNX Runtime would fuse a rank-2 MatMul + Add into a float Gemm
            # before its QDQ pass sees it, and the head would stay float.
            y = (x.unsqueeze(1) @ w_t).squeeze(1)  # (B, out)
        else:
            y = x @ w_t  # (B, N, out)
        return y + self.bias.float() if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, w_bits={self.w_bits}, bias={self.bias is not None}"


class Int8Conv2d(nn.Module):
    """A ``Conv2d`` whose weight is stored as int8 with a float16 scale per output channel (symmetric).

    On its own (``ptq.dynamic``) it is weight-only quantization: the forward dequantizes
    the weight and convolves in float, and the int8 buffer is what the file holds. Its
    subclass :class:`QuantConv2d` also quantizes the input, which makes it an integer
    convolution once exported (see there). The bias is float16, like ``QuantLinear``'s.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], *, stride: tuple[int, int],
                 padding: tuple[int, int] | str, dilation: tuple[int, int], bias: bool, w_bits: int = 8) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.w_bits = in_channels, out_channels, w_bits
        self.kernel_size, self.stride, self.padding, self.dilation = tuple(kernel_size), tuple(stride), padding, \
            tuple(dilation)
        if not isinstance(padding, str):
            self.padding = tuple(padding)
        self.register_buffer("weight_int8", torch.zeros(out_channels, in_channels, *kernel_size, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=torch.float16), requires_grad=False) if bias else None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, w_bits: int = 8, weight_calibrator: str = "minmax", **kwargs: int):
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise VitcompressError(f"cannot quantize a Conv2d with groups={conv.groups} / padding_mode="
                                   f"{conv.padding_mode}; only plain convolutions are supported")
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,  # type: ignore[arg-type]
                  padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,  # type: ignore[arg-type]
                  w_bits=w_bits, **kwargs)
        return _fill_int8(mod, conv, w_bits, weight_calibrator)

    @property
    def weight_numel(self) -> int:
        """Weights held as int8 buffers (``vitcompress.measure.count_params`` adds them to the parameters)."""
        return self.weight_int8.numel()

    def _conv(self, x: torch.Tensor, padding: tuple[int, int] | str | None = None) -> torch.Tensor:
        w = dequant_weight(self.weight_int8, self.weight_scale.float())
        bias = self.bias.float() if self.bias is not None else None
        return F.conv2d(x, w, bias, self.stride, self.padding if padding is None else padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"w_bits={self.w_bits}, bias={self.bias is not None}")


class QuantConv2d(Int8Conv2d, QuantModule):
    """``y = conv(Q(x), w_int · s) + b``: int8 per-channel weights, uint8 calibrated input.

    In ONNX the input is QuantizeLinear → DequantizeLinear and the weight a
    DequantizeLinear of an int8 initializer (axis 0). When the conv's output is
    quantized again by the next layer's input quantizer (a ReLU in between is
    absorbed, the quantizer's zero point being 0 there), ONNX Runtime runs it as
    ``QLinearConv`` (uint8 × int8, int32 accumulation); the last conv of a stem, whose
    output feeds float token arithmetic, keeps an int8 weight but convolves in float.
    """

    def __init__(self, *args: object, a_bits: int = 8, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.input_quant = ActQuantizer(a_bits)
        # Pad before the input quantizer; export_onnx(..., target="openvino") turns it on for the export.
        self.pad_first = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pad_first or isinstance(self.padding, str) or not any(self.padding):
            return self._conv(self.input_quant(x))
        # The zero padding is added before the input quantizer, as its own op, and the conv pads nothing:
        # the same numbers, but in the exported graph the padded zeros pass through QuantizeLinear. On the
        # fashion-mnist stem OpenVINO 2026.4 computes the second conv (3x3, stride 2, padding 1, uint8
        # input) wrong when it pads: 91.64% in ONNX Runtime, 68.86% in OpenVINO; padded first, 92.4% on the
        # same 1000 images as ONNX Runtime. It is off by default: a Pad between a conv and the next
        # quantizer keeps ONNX Runtime from fusing that conv into QLinearConv (17% slower there).
        ph, pw = self.padding
        return self._conv(self.input_quant(F.pad(x, (pw, pw, ph, ph))), padding=(0, 0))


# ---- LayerNorm with PTF inputs ------------------------------------------------------------------------------
class PowerOfTwoLayerNorm(nn.LayerNorm, QuantModule):
    """LayerNorm whose input is quantized: PTF (per-channel 2^α_c) or, with ``ptf=False``, plain per-tensor."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6, *, bits: int = 8, ptf: bool = True, k: int = 3,
                 elementwise_affine: bool = True, bias: bool = True) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias)
        self.ptf = ptf
        self.input_quant: ActQuantizer = PowerOfTwoQuantizer(normalized_shape, bits, k) if ptf else ActQuantizer(bits)

    @classmethod
    def from_layernorm(cls, ln: nn.LayerNorm, *, bits: int = 8, ptf: bool = True, k: int = 3) -> PowerOfTwoLayerNorm:
        if len(ln.normalized_shape) != 1:
            raise VitcompressError("PowerOfTwoLayerNorm needs a LayerNorm over the last dimension only")
        mod = cls(ln.normalized_shape[0], ln.eps, bits=bits, ptf=ptf, k=k,
                  elementwise_affine=ln.elementwise_affine, bias=ln.bias is not None)
        mod.load_state_dict(ln.state_dict(), strict=False)
        return mod.to(ln.weight.device if ln.weight is not None else "cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quant(x)  # (B, N, C), each value on its channel's 2^α_c · s grid
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


# ---- softmax quantizers -------------------------------------------------------------------------------------
def _exp2(e: torch.Tensor) -> torch.Tensor:
    """``2^e`` for integer-valued ``e`` (a shift in integer hardware).

    ``exp(e ln2)``: within ~1e-6 relative of the exact power, and ONNX Runtime's Exp is vectorized
    where its Pow (and a table Gather) is an order of magnitude slower on attention-sized tensors.
    """
    return torch.exp(e * _LN2)


def _int_exp(x_int: torch.Tensor, scale: float | torch.Tensor, n: int = 30) -> torch.Tensor:
    """I-BERT's i-exp on integers ``x_int ≤ 0`` with real value ``x_int · scale``; returns ``exp · 2^n / c``.

    The common factor (``0.3585 · scale² / 2^n``) cancels in the softmax ratio, so it is not returned.
    """
    # I-BERT's 0.3585 (p + 1.353)² + 0.344 expanded to a p² + b p + c; on the integer grid
    # (p = p_int · scale) that is a scale² · (p_int² + p_int · b / (a scale) + c / (a scale²)).
    a, b, c = 0.35815147, 0.96963238, 1.0
    ln2_int = torch.floor(-math.log(2.0) / scale)  # −ln2 on the integer grid (negative)
    x_int = torch.maximum(x_int, n * ln2_int)  # beyond 2^−n everything is ~0 anyway
    # How many factors of 2 to shift out, 0..n: an integer division; the nudge keeps exact multiples
    # exact when a runtime divides through a reciprocal (non-multiples are ≥ 1/|ln2_int| away).
    z = torch.floor(x_int / ln2_int + 1e-6)
    p = x_int - ln2_int * z  # remainder in (−ln2, 0] on the integer grid
    b_int = torch.floor((b / a) / scale)
    c_int = torch.floor((c / a) / scale**2)
    poly = p * (p + b_int) + c_int  # exp(p) / (a scale²)
    # Exact arithmetic would give an integer here; _exp2 keeps it within ~1e-6 relative, which the
    # ratio Σe / e and its log2 rounding below do not see.
    return torch.clamp(torch.floor(poly * _exp2(n - z)), min=0)


def _log2_round(r: torch.Tensor) -> torch.Tensor:
    """``round(log2 r)`` for integer ``r ≥ 1`` as integer hardware does it: MSB index, plus one if the next bit is set.

    That is ``k + 1`` exactly when ``r ≥ 1.5 · 2^k``, i.e. ``floor(log2(r / 1.5)) + 1``, evaluated in
    float64 with a tolerance far below the gap between neighbouring integers, so exact boundaries
    (r = 3, 6, 12, …, where r / 1.5 is a power of two) land on the upper side.
    """
    t = torch.log2(r.to(torch.float64) / 1.5)
    return (torch.floor(t + 1e-9) + 1).to(r.dtype)


class LogIntSoftmax(QuantModule):
    """Softmax on 8-bit attention logits via i-exp, output quantized as ``2^−q`` with ``bits``-bit codes.

    Two fixed-point refinements over FQ-ViT's reference code, both still integer arithmetic: i-exp
    runs on the 8-bit logit codes shifted left by ``EXP_FRAC_BITS`` (on the bare 8-bit grid, −ln2 is
    a whole number of logit steps and each factor of two is off by up to ~10%), and ``1/p = Σe / e``
    keeps ``RATIO_FRAC_BITS`` fractional bits before its log2 rounding (rounding it to an integer
    first moves the thresholds of the largest probabilities). On a trained ``vitc_quick`` (Fashion-
    MNIST, 79.1%) they take w8a8att4 from 78.1% to 78.7%.

    The integers of i-exp outgrow float32's 24-bit mantissa, so this float simulation is exact only
    up to float rounding; PyTorch and ONNX Runtime sum them in different orders and ~0.2% of the
    4-bit codes differ by one between the two (top-1 78.72% vs 78.59% on that model).
    """

    EXP_FRAC_BITS = 8
    RATIO_FRAC_BITS = 4

    def __init__(self, bits: int = 4, logit_bits: int = 8) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise VitcompressError(f"LIS attention bits must be in 2..8, got {bits}")
        self.bits = bits
        self.logit_quant = ActQuantizer(logit_bits)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        if self.logit_quant.observer is not None:
            self.logit_quant(attn)
            return attn.softmax(dim=-1)
        f, g = self.EXP_FRAC_BITS, self.RATIO_FRAC_BITS
        x_int = torch.round(self.logit_quant(attn) / self.logit_quant.scale)  # (B, heads, N, N) 8-bit codes
        x_int = (x_int - x_int.amax(dim=-1, keepdim=True)) * 2**f  # ≤ 0, on a 2^−f finer grid
        e = _int_exp(x_int, self.logit_quant.scale / 2**f)
        ratio = torch.round(e.sum(dim=-1, keepdim=True) * 2**g / e)  # 2^g / p ≥ 2^g; inf where e is 0
        code_max = 2**self.bits - 1
        q = _log2_round(ratio) - g  # −log2 p, rounded
        p = _exp2(-torch.clamp(q, 0, code_max))
        # Codes past the top mean "too small to represent": exactly zero, as in FQ-ViT.
        return torch.where(q > code_max, torch.zeros_like(p), p)

    def extra_repr(self) -> str:
        return f"bits={self.bits} (log2)"


class UniformSoftmax(QuantModule):
    """Float softmax, output quantized uniformly on ``[0, 1]`` at ``bits`` (scale ``1 / (2^b − 1)``, zp 0)."""

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        self.bits = bits
        self.prob_quant = ActQuantizer(bits, fixed_scale=1.0 / (2**bits - 1))

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        return self.prob_quant(attn.softmax(dim=-1))


# ---- attention with quantized matmul inputs -----------------------------------------------------------------
class QuantAttention(Attention, QuantModule):
    """timm ``Attention`` with quantized inputs to both attention matmuls and a quantized softmax.

    ``qk_only``: only ``Q·Kᵀ`` gets quantized inputs, signed and symmetric (zero point 0); the softmax
    and ``softmax·V`` stay float. That is the form OpenVINO's CPU plugin fuses into an int8 attention
    kernel (it is what NNCF produces for transformers), and it keeps the probabilities exact: a uint8
    softmax with scale 1/255 rounds most of a 197-token row's probabilities (≈ 0.005) to 0 or 1/255.

    Built from an existing instance and sharing its submodules (same weights):
    ``Attention.__init__`` is skipped on purpose, it would allocate fresh layers.
    """

    def __init__(self, attn: Attention, *, a_bits: int = 8, att_bits: int = 8, lis: bool = False,
                 qk_only: bool = False) -> None:
        nn.Module.__init__(self)
        for name in ("num_heads", "head_dim", "scale"):
            setattr(self, name, getattr(attn, name))
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.fused_attn = False
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.attn_drop, self.norm, self.proj, self.proj_drop = attn.attn_drop, attn.norm, attn.proj, attn.proj_drop
        self.gate = getattr(attn, "gate", None)
        if lis and qk_only:
            raise VitcompressError("Log-Int-Softmax quantizes the softmax; it cannot be combined with qk_only")
        self.lis, self.qk_only = lis, qk_only
        self.q_quant = ActQuantizer(a_bits, signed=qk_only)
        self.k_quant = ActQuantizer(a_bits, signed=qk_only)
        self.v_quant: nn.Module = nn.Identity() if qk_only else ActQuantizer(a_bits)
        self.softmax_quant: nn.Module = (nn.Softmax(dim=-1) if qk_only else
                                         LogIntSoftmax(att_bits, a_bits) if lis else UniformSoftmax(att_bits))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise VitcompressError("QuantAttention supports unmasked self-attention only (ViT classification)")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        # Quantize right at the matmul inputs (after scaling and transposing) so that in ONNX each
        # DequantizeLinear feeds the MatMul directly. With qk_only K is quantized before its transpose, so
        # that the transpose lies between the quantizer and the matmul, where OpenVINO takes it into its
        # fused int8 attention kernel (quantized after it, OpenVINO moves the quantizer up anyway and
        # leaves a slow int8 transpose outside the kernel).
        q = self.q_quant(q * self.scale)
        k_t = self.k_quant(k).transpose(-2, -1) if self.qk_only else self.k_quant(k.transpose(-2, -1))
        attn = q @ k_t  # (B, heads, N, N)
        attn = self.attn_drop(self.softmax_quant(attn))
        x = attn @ self.v_quant(v)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
