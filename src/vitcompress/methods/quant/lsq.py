"""``qat.lsq``: Learned Step Size Quantization-aware training of Linear and Conv2d weights, exported bit-packed.

Esser et al., "Learned Step Size Quantization", ICLR 2020. Each quantized
tensor ``v`` has a learned step ``s``; with ``Q_N = 2**(b-1)``, ``Q_P = 2**(b-1) - 1``
for signed ``b``-bit integers:

* Eq. 1-2: ``v_bar = round(clip(v / s, -Q_N, Q_P))`` and ``v_hat = v_bar * s``;
  the round passes the gradient straight through (STE);
* Eq. 3: so ``d v_hat / d s`` is ``-v/s + round(v/s)`` inside the clip range and
  ``-Q_N`` or ``Q_P`` outside it (autograd derives this from Eq. 1-2 with the STE);
* §2.2: the step's gradient is scaled by ``g = 1 / sqrt(N * Q_P)``, ``N`` the number
  of values sharing that step (a whole weight tensor per-tensor; per-channel, the
  ``in_features`` weights of one output row of a Linear or the ``in_channels * kh * kw``
  of one output channel of a conv; the features of one sample for activations),
  so steps and weights learn at comparable relative rates;
* §2: the step starts at ``2 * mean(|v|) / sqrt(Q_P)`` (on the first calibration batch
  for activations).

diffq's ``LSQ`` class (the study's "DIFFQ with LSQ" row) omits the gradient scale
and starts from ``2 * mean(|w|) / sqrt(2**(b-1))``; this module follows the paper.

Training swaps each ``nn.Linear`` for a :class:`LsqLinear` and each ``nn.Conv2d`` (a
timm ViT's patch projection, every conv of a ``vitc_small`` stem) for a :class:`LsqConv2d`,
after folding each BatchNorm that follows a conv into that conv (:mod:`.convs`: at
inference a BatchNorm is an affine map, so the folded weight is the one a deployed
network computes with and the one to quantize), and trains through the shared loop (``ctx.fit``), from
the trained baseline by default or from a re-initialised model (``from_scratch``).
``convs: false`` quantizes the Linear layers only and leaves the convs and their
BatchNorms as they are. Export replaces each trained layer with a :class:`LsqPackedLinear`
or :class:`LsqPackedConv2d` whose state holds the integer weights bit-packed into a
``uint8`` buffer (two 4-bit values per byte, see :mod:`.packing`), the step(s) and the
float bias, so the saved file's bytes are the packed size; the study stores the position
embedding, norms, steps and biases in one byte per value (``small_tensors: uint8``, see
:mod:`vitcompress.artifact`; float16 on request). Their forward unpacks and dequantizes the weights on
the fly and multiplies (or convolves) in float: ``int_arithmetic`` is false for this
row, and its CPU speed includes the unpacking.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config import check
from ...models.arch import SWAPPABLE_LINEARS, needs_swappable_linears
from ..registry import StepOutput, register_method
from .convs import conv_meta, conv_names, fold_batchnorms, refold_structure
from .packing import pack_bits, packed_numel, unpack_bits


@dataclass(frozen=True)
class LsqConfig:
    bits: int = 4
    # One step per output row keeps 4-bit rows with small weights from rounding to zero; the paper uses
    # one per tensor (per_channel: false).
    per_channel: bool = True
    act_bits: int | None = None  # also fake-quantize each Linear's input (signed, one learned step per layer)
    skip_head: bool = False  # keep the classifier head in float
    # Quantize the Conv2d weights too (patch projection or conv stem, BatchNorms folded in first);
    # false: Linear weights only, the convs and BatchNorms stay as they are.
    convs: bool = True
    epochs: int = 1
    lr: float | None = None  # None: the baseline's learning rate
    train_subset: int | None = None  # None: the baseline's
    from_scratch: bool = False  # re-initialise all weights before QAT (the study trained DiffQ this way)
    calib_images: int = 64  # images whose first batch initialises the activation steps
    # How the study's file stores the float tensors left (steps, biases, norms, position embedding):
    # "uint8" codes them in one byte each (a log2 grid for the positive steps), "float16" in two. They are
    # 10% of a 4-bit vitc_small file in float16; every reported number is measured on the file read back.
    small_tensors: str = "uint8"

    def __post_init__(self) -> None:
        check(2 <= self.bits <= 8, f"bits must be in 2..8, got {self.bits}")
        check(self.act_bits is None or 2 <= self.act_bits <= 8, f"act_bits must be in 2..8 or null, got {self.act_bits}")
        check(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        check(self.lr is None or 0 < self.lr < 10, f"lr must be in (0, 10) or null, got {self.lr}")
        check(self.train_subset is None or self.train_subset >= 1, "train_subset must be >= 1 or null")
        check(self.calib_images >= 1, f"calib_images must be >= 1, got {self.calib_images}")
        check(self.small_tensors in ("uint8", "float16"),
              f"small_tensors must be uint8 or float16, got {self.small_tensors!r}")


def signed_range(bits: int) -> tuple[int, int]:
    """``(Q_N, Q_P)`` of Eq. 1 for signed ``bits``-bit integers."""
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def grad_scale_factor(n: int, bits: int) -> float:
    """LSQ's step gradient scale ``g = 1 / sqrt(N * Q_P)`` (§2.2)."""
    return 1.0 / math.sqrt(n * signed_range(bits)[1])


def initial_step(v: torch.Tensor, bits: int, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """``2 * mean(|v|) / sqrt(Q_P)`` (§2), over all of ``v`` or over ``dim`` (one step per index of the others)."""
    mean_abs = v.detach().abs().mean() if dim is None else v.detach().abs().mean(dim=dim)
    # A row of zeros would give step 0 and divide by zero; any positive step quantizes it exactly.
    return (2 * mean_abs / math.sqrt(signed_range(bits)[1])).clamp_min(1e-8).reshape(-1)


class _RoundSTE(torch.autograd.Function):
    """round() whose backward is the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``g``.

    A custom function rather than ``(s - s*g).detach() + s*g`` so the forward value
    is bit-identical to ``s`` and the packed export reproduces training's eval logits.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.g, None


def lsq_quantize(v: torch.Tensor, step: torch.Tensor, bits: int, g: float) -> torch.Tensor:
    """``v_hat`` of Eq. 2 with the STE round and the step gradient scaled by ``g``; ``step`` broadcasts to ``v``."""
    qn, qp = signed_range(bits)
    s = _ScaleGrad.apply(step, g)
    return _RoundSTE.apply(torch.clamp(v / s, -qn, qp)) * s


def _fake_quant_input(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    # Features of one sample share the step: (B, N, C) -> N * C; (B, C, H, W) -> C * H * W.
    n = x.numel() // max(1, x.shape[0]) if x.dim() > 1 else x.numel()
    return lsq_quantize(x, step, bits, grad_scale_factor(max(1, n), bits))


def layer_geometry(mod: nn.Module) -> dict[str, Any]:
    """What a quantized layer is rebuilt from (JSON): ``kind`` ("linear" or "conv2d"), sizes, bias, conv arithmetic.

    Reads the same attributes from an ``nn.Linear``/``nn.Conv2d`` and from the quantized
    layers here, so a quantized layer describes itself as the float one did.
    """
    if isinstance(mod, (nn.Conv2d, Conv2dOp)):
        return {"kind": "conv2d", **conv_meta(mod)}  # a Conv2dOp layer has the Conv2d attributes conv_meta reads
    return {"kind": "linear", "in": mod.in_features, "out": mod.out_features, "bias": mod.bias is not None}


class LinearOp:
    """Mixin of the quantized ``nn.Linear`` layers (here and in DiffQ): their sizes and ``F.linear``.

    A quantized layer class is this (or :class:`Conv2dOp`) plus a base that owns the
    weight's storage; the base calls ``_set_geometry`` to learn the weight's shape and
    ``_op`` to apply the weight it has made.
    """

    kind = "linear"
    bias: torch.Tensor | None

    def _set_geometry(self, geometry: dict[str, Any]) -> tuple[int, ...]:
        """Keep the sizes of :func:`layer_geometry`'s dict; return the weight's shape."""
        self.in_features, self.out_features = int(geometry["in"]), int(geometry["out"])
        return self.out_features, self.in_features

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # x: (..., in_features)
        return F.linear(x, w, self.bias)  # (..., out_features)

    def _geometry_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Conv2dOp:
    """Mixin of the quantized ``nn.Conv2d`` layers (groups 1): sizes, stride, padding, dilation, ``F.conv2d``."""

    kind = "conv2d"
    bias: torch.Tensor | None

    def _set_geometry(self, geometry: dict[str, Any]) -> tuple[int, ...]:
        """Keep the conv's sizes and arithmetic (``conv_meta``'s keys); return the weight's shape."""
        self.in_channels, self.out_channels = int(geometry["in"]), int(geometry["out"])
        self.kernel_size = tuple(int(k) for k in geometry["kernel"])
        self.stride = tuple(int(k) for k in geometry["stride"])
        padding = geometry["padding"]
        self.padding = padding if isinstance(padding, str) else tuple(int(k) for k in padding)
        self.dilation = tuple(int(k) for k in geometry["dilation"])
        return self.out_channels, self.in_channels, *self.kernel_size

    def _op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # x: (B, in_channels, H, W)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)  # (B, out_channels, H', W')

    def _geometry_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}")


def _per_channel_view(step: torch.Tensor, weight_dims: int) -> torch.Tensor:
    """``step`` (out,) or (1,) shaped to broadcast over a weight of ``weight_dims`` dims: (out, 1, ...)."""
    return step.view(-1, *[1] * (weight_dims - 1))


class _LsqLayer(nn.Module):
    """A layer trained with LSQ fake-quantized weights (and optionally inputs).

    Subclasses mix in :class:`LinearOp` or :class:`Conv2dOp` (``_set_geometry``, ``_op``).
    """

    def __init__(self, geometry: dict[str, Any], bits: int, per_channel: bool, act_bits: int | None = None) -> None:
        super().__init__()
        shape = self._set_geometry(geometry)
        self.bits, self.per_channel, self.act_bits = bits, per_channel, act_bits
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.zeros(shape[0])) if geometry["bias"] else None
        # 1-D even per-tensor, so the shared loop leaves steps out of weight decay.
        self.weight_step = nn.Parameter(torch.ones(shape[0] if per_channel else 1))
        self.act_step = nn.Parameter(torch.ones(1)) if act_bits is not None else None
        # The first forward sets the activation step from its input (LSQ's data-dependent init).
        self.act_init_pending = act_bits is not None

    @classmethod
    def from_float(cls, mod: nn.Module, bits: int, per_channel: bool, act_bits: int | None = None) -> _LsqLayer:
        """The LSQ layer of a float ``nn.Linear``/``nn.Conv2d``: its weight and bias, the initial step of §2."""
        out = cls(layer_geometry(mod), bits, per_channel, act_bits)
        with torch.no_grad():
            out.weight.copy_(mod.weight)
            if mod.bias is not None:
                out.bias.copy_(mod.bias)
            per_row = tuple(range(1, mod.weight.dim()))  # everything but the output channel
            out.weight_step.copy_(initial_step(mod.weight, bits, dim=per_row if per_channel else None))
        return out.to(mod.weight.device)

    def weight_grad_scale(self) -> float:
        n = self.weight[0].numel() if self.per_channel else self.weight.numel()
        return grad_scale_factor(n, self.bits)

    def quantized_weight(self) -> torch.Tensor:
        step = _per_channel_view(self.weight_step, self.weight.dim())  # (out, 1, ...) or (1, 1, ...)
        return lsq_quantize(self.weight, step, self.bits, self.weight_grad_scale())

    def int_weight(self) -> torch.Tensor:
        """The integer levels ``v_bar`` of Eq. 1 (the same float ops as the forward, so exactly its values)."""
        qn, qp = signed_range(self.bits)
        with torch.no_grad():
            step = _per_channel_view(self.weight_step, self.weight.dim())
            levels = torch.round(torch.clamp(self.weight / step, -qn, qp))
        return levels.to(torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_step is not None:
            if self.act_init_pending:
                with torch.no_grad():
                    self.act_step.copy_(initial_step(x.float(), self.act_bits))
                self.act_init_pending = False
            x = _fake_quant_input(x, self.act_step, self.act_bits)
        return self._op(x, self.quantized_weight())

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, bits={self.bits}, per_channel={self.per_channel}, act_bits={self.act_bits}"


class LsqLinear(LinearOp, _LsqLayer):
    """A Linear layer trained with LSQ fake-quantized weights (and optionally inputs)."""


class LsqConv2d(Conv2dOp, _LsqLayer):
    """A Conv2d trained with LSQ fake-quantized weights (and optionally inputs)."""


class _LsqPackedLayer(nn.Module):
    """The exported LSQ layer: bit-packed integer weights, dequantized on the fly; float arithmetic.

    Subclasses mix in :class:`LinearOp` or :class:`Conv2dOp` (``_set_geometry``, ``_op``).
    State: ``weight_packed`` uint8 ``(ceil(weight_numel * bits / 8),)`` (the weight's
    levels in C order: row by row of a Linear, output channel by channel of a conv),
    ``weight_step`` float32 ``(out,)`` or ``(1,)``, ``bias`` float32 ``(out,)``, and
    ``act_step`` ``(1,)`` when the inputs are quantized too.
    """

    def __init__(self, geometry: dict[str, Any], bits: int, per_channel: bool, act_bits: int | None = None) -> None:
        super().__init__()
        self.weight_shape = self._set_geometry(geometry)
        self.bits, self.per_channel, self.act_bits = bits, per_channel, act_bits
        out = self.weight_shape[0]
        self.register_buffer("weight_packed", torch.zeros(packed_numel(self.weight_numel, bits), dtype=torch.uint8))
        self.register_buffer("weight_step", torch.ones(out if per_channel else 1))
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if geometry["bias"] else None
        self.register_buffer("act_step", torch.ones(1) if act_bits is not None else None)

    @classmethod
    def from_lsq(cls, mod: _LsqLayer) -> _LsqPackedLayer:
        out = cls(layer_geometry(mod), mod.bits, mod.per_channel, mod.act_bits)
        with torch.no_grad():
            out.weight_packed.copy_(pack_bits(mod.int_weight(), mod.bits))
            out.weight_step.copy_(mod.weight_step.float())
            if mod.bias is not None:
                out.bias.copy_(mod.bias)
            if mod.act_step is not None:
                out.act_step.copy_(mod.act_step)
        return out

    @property
    def weight_numel(self) -> int:
        """Weights this layer represents (its buffer holds them packed)."""
        return math.prod(self.weight_shape)

    def int_weight(self) -> torch.Tensor:
        levels = unpack_bits(self.weight_packed, self.bits, self.weight_numel, signed=True)
        return levels.view(self.weight_shape)

    def dequantized_weight(self) -> torch.Tensor:
        step = _per_channel_view(self.weight_step, len(self.weight_shape))
        return self.int_weight().to(self.weight_step.dtype) * step  # weight_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_step is not None:
            qn, qp = signed_range(self.act_bits)
            x = torch.round(torch.clamp(x / self.act_step, -qn, qp)) * self.act_step
        return self._op(x, self.dequantized_weight().to(x.dtype))

    def extra_repr(self) -> str:
        return (f"{self._geometry_repr()}, bits={self.bits} (packed), per_channel={self.per_channel}, "
                f"act_bits={self.act_bits}")


class LsqPackedLinear(LinearOp, _LsqPackedLayer):
    """The exported :class:`LsqLinear`: bit-packed weights, ``F.linear`` on the dequantized ones."""


class LsqPackedConv2d(Conv2dOp, _LsqPackedLayer):
    """The exported :class:`LsqConv2d`: bit-packed weights, ``F.conv2d`` on the dequantized ones."""


# Training and exported class of each layer kind (a layer's meta names its kind).
_LSQ_LAYERS: dict[str, type[_LsqLayer]] = {"linear": LsqLinear, "conv2d": LsqConv2d}
_LSQ_PACKED: dict[str, type[_LsqPackedLayer]] = {"linear": LsqPackedLinear, "conv2d": LsqPackedConv2d}

def reinit_weights(model: nn.Module, seed: int) -> None:
    """Re-initialise every weight of ``model`` in place (seeded), for QAT from scratch."""
    torch.manual_seed(seed)
    init = getattr(model, "init_weights", None)
    if callable(init):
        init()  # timm ViT: resets every submodule, then its own trunc-normal init of Linear and embeddings
        return
    for mod in model.modules():
        if mod is not model and hasattr(mod, "reset_parameters"):
            mod.reset_parameters()


def quantizable_linears(model: nn.Module, skip_head: bool) -> list[str]:
    """Names of the ``nn.Linear`` modules a QAT step quantizes."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and not (skip_head and name.split(".")[0] in ("head", "head_dist"))]


def quantizable_layers(model: nn.Module, skip_head: bool, convs: bool) -> list[str]:
    """The Linears of :func:`quantizable_linears`, with ``convs`` also the Conv2d of ``conv_names``; model order."""
    names = set(quantizable_linears(model, skip_head)) | (set(conv_names(model)) if convs else set())
    return [name for name, _ in model.named_modules() if name in names]


def layers_meta(model: nn.Module, names: list[str]) -> list[dict[str, Any]]:
    """Name and :func:`layer_geometry` of each named layer: what ``restore`` rebuilds them from."""
    return [{"name": name, **layer_geometry(model.get_submodule(name))} for name in names]


def prepare_lsq(model: nn.Module, names: list[str], cfg: LsqConfig) -> nn.Module:
    """Swap each named ``nn.Linear``/``nn.Conv2d`` for its LSQ layer with the initial step of §2 (in place)."""
    for name in names:
        mod = model.get_submodule(name)
        lsq = _LSQ_LAYERS[layer_geometry(mod)["kind"]].from_float(mod, cfg.bits, cfg.per_channel, cfg.act_bits)
        model.set_submodule(name, lsq)
    return model


def pack_lsq(model: nn.Module, names: list[str]) -> nn.Module:
    """Swap each named LSQ layer for its bit-packed :class:`LsqPackedLinear`/:class:`LsqPackedConv2d` (in place)."""
    for name in names:
        mod = model.get_submodule(name)
        model.set_submodule(name, _LSQ_PACKED[mod.kind].from_lsq(mod))
    return model


def _restore(model: nn.Module, cfg: LsqConfig, meta: dict[str, Any]) -> nn.Module:
    refold_structure(model, meta.get("folded_bn", []))
    for layer in meta["layers"]:
        # Meta written before convs were quantized names no kind: those layers are all Linear.
        cls = _LSQ_PACKED[layer.get("kind", "linear")]
        model.set_submodule(layer["name"], cls(layer, cfg.bits, cfg.per_channel, cfg.act_bits))
    return model


def fit_overrides(cfg: LsqConfig | Any, ctx: Any) -> dict[str, Any]:
    """The TrainConfig fields a QAT config sets for ``ctx.fit``."""
    overrides: dict[str, Any] = {"epochs": cfg.epochs}
    if cfg.lr is not None:
        overrides["lr"] = cfg.lr
        overrides["min_lr"] = min(ctx.baseline_train.min_lr, cfg.lr)
    if cfg.train_subset is not None:
        overrides["train_subset"] = cfg.train_subset
    return overrides


@register_method(
    "qat.lsq",
    LsqConfig,
    family="quantization",
    summary="LSQ quantization-aware training of Linear and Conv2d weights (learned step), bit-packed file, float ops",
    restore=_restore,
    produces_int_weights=True,
    supports=SWAPPABLE_LINEARS,
    requires=needs_swappable_linears,
)
def lsq_qat(model: nn.Module, cfg: LsqConfig, ctx: Any) -> StepOutput:
    model = copy.deepcopy(model).cpu()
    if cfg.from_scratch:
        reinit_weights(model, ctx.seed)
    folded = fold_batchnorms(model) if cfg.convs else []
    names = quantizable_layers(model, cfg.skip_head, cfg.convs)
    layers = layers_meta(model, names)
    quantized = sum(model.get_submodule(name).weight.numel() for name in names)
    prepare_lsq(model, names, cfg)
    if cfg.act_bits is not None:
        # One batch sets every activation step (each LSQ layer initialises on its first input).
        with torch.no_grad():
            x, _ = next(iter(ctx.calib_loader(cfg.calib_images, batch_size=cfg.calib_images)))
            model.eval()(x)
    model = ctx.fit(model, desc="qat.lsq", **fit_overrides(cfg, ctx)).model
    pack_lsq(model, names)
    return StepOutput(model.eval(), {
        "layers": layers,
        "folded_bn": folded,
        "avg_bits": float(cfg.bits),  # bits per quantized Linear/Conv2d weight, as stored
        "quantized_weights": quantized,
        "int_arithmetic": False,
    })
