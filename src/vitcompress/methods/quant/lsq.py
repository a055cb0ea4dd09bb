"""``qat.lsq``: Learned Step Size Quantization-aware training of ``nn.Linear`` weights, exported bit-packed.

Esser et al., "Learned Step Size Quantization", ICLR 2020. Each quantized
tensor ``v`` has a learned step ``s``; with ``Q_N = 2**(b-1)``, ``Q_P = 2**(b-1) - 1``
for signed ``b``-bit integers:

* Eq. 1-2: ``v_bar = round(clip(v / s, -Q_N, Q_P))`` and ``v_hat = v_bar * s``;
  the round passes the gradient straight through (STE);
* Eq. 3: so ``d v_hat / d s`` is ``-v/s + round(v/s)`` inside the clip range and
  ``-Q_N`` or ``Q_P`` outside it (autograd derives this from Eq. 1-2 with the STE);
* §2.2: the step's gradient is scaled by ``g = 1 / sqrt(N * Q_P)``, ``N`` the number
  of values sharing that step (a whole weight tensor per-tensor, one row of
  ``in_features`` weights per-channel, the features of one sample for activations),
  so steps and weights learn at comparable relative rates;
* §2: the step starts at ``2 * mean(|v|) / sqrt(Q_P)`` (on the first calibration batch
  for activations).

diffq's ``LSQ`` class (the study's "DIFFQ with LSQ" row) omits the gradient scale
and starts from ``2 * mean(|w|) / sqrt(2**(b-1))``; this module follows the paper.

Training swaps each ``nn.Linear`` instance for a :class:`LsqLinear` and trains through
the shared loop (``ctx.fit``), from the trained baseline by default or from a
re-initialised model (``from_scratch``). Export replaces each :class:`LsqLinear` with a
:class:`LsqPackedLinear` whose state holds the integer weights bit-packed into a
``uint8`` buffer (two 4-bit values per byte, see :mod:`.packing`), the step(s) and the
float bias, so the saved file's bytes are the packed size. Its forward unpacks and
dequantizes the weights on the fly and multiplies in float: ``int_arithmetic`` is
false for this row, and its CPU speed includes the unpacking.
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
from ..registry import StepOutput, register_method
from .packing import pack_bits, packed_numel, unpack_bits


@dataclass(frozen=True)
class LsqConfig:
    bits: int = 4
    # One step per output row keeps 4-bit rows with small weights from rounding to zero; the paper uses
    # one per tensor (per_channel: false).
    per_channel: bool = True
    act_bits: int | None = None  # also fake-quantize each Linear's input (signed, one learned step per layer)
    skip_head: bool = False  # keep the classifier head in float
    epochs: int = 1
    lr: float | None = None  # None: the baseline's learning rate
    train_subset: int | None = None  # None: the baseline's
    from_scratch: bool = False  # re-initialise all weights before QAT (the study trained DiffQ this way)
    calib_images: int = 64  # images whose first batch initialises the activation steps

    def __post_init__(self) -> None:
        check(2 <= self.bits <= 8, f"bits must be in 2..8, got {self.bits}")
        check(self.act_bits is None or 2 <= self.act_bits <= 8, f"act_bits must be in 2..8 or null, got {self.act_bits}")
        check(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        check(self.lr is None or 0 < self.lr < 10, f"lr must be in (0, 10) or null, got {self.lr}")
        check(self.train_subset is None or self.train_subset >= 1, "train_subset must be >= 1 or null")
        check(self.calib_images >= 1, f"calib_images must be >= 1, got {self.calib_images}")


def signed_range(bits: int) -> tuple[int, int]:
    """``(Q_N, Q_P)`` of Eq. 1 for signed ``bits``-bit integers."""
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def grad_scale_factor(n: int, bits: int) -> float:
    """LSQ's step gradient scale ``g = 1 / sqrt(N * Q_P)`` (§2.2)."""
    return 1.0 / math.sqrt(n * signed_range(bits)[1])


def initial_step(v: torch.Tensor, bits: int, dim: int | None = None) -> torch.Tensor:
    """``2 * mean(|v|) / sqrt(Q_P)`` (§2), over all of ``v`` or per index of ``dim``."""
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
    # Features of one sample share the step: (B, N, C) -> N * C.
    n = x.numel() // max(1, x.shape[0]) if x.dim() > 1 else x.numel()
    return lsq_quantize(x, step, bits, grad_scale_factor(max(1, n), bits))


class LsqLinear(nn.Module):
    """A Linear layer trained with LSQ fake-quantized weights (and optionally inputs)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, per_channel: bool,
                 act_bits: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.per_channel, self.act_bits = bits, per_channel, act_bits
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # 1-D even per-tensor, so the shared loop leaves steps out of weight decay.
        self.weight_step = nn.Parameter(torch.ones(out_features if per_channel else 1))
        self.act_step = nn.Parameter(torch.ones(1)) if act_bits is not None else None
        # The first forward sets the activation step from its input (LSQ's data-dependent init).
        self.act_init_pending = act_bits is not None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, per_channel: bool, act_bits: int | None = None) -> LsqLinear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, per_channel, act_bits)
        with torch.no_grad():
            mod.weight.copy_(linear.weight)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias)
            mod.weight_step.copy_(initial_step(linear.weight, bits, dim=1 if per_channel else None))
        return mod.to(linear.weight.device)

    def weight_grad_scale(self) -> float:
        return grad_scale_factor(self.in_features if self.per_channel else self.weight.numel(), self.bits)

    def quantized_weight(self) -> torch.Tensor:
        step = self.weight_step.view(-1, 1)  # (out, 1) or (1, 1)
        return lsq_quantize(self.weight, step, self.bits, self.weight_grad_scale())

    def int_weight(self) -> torch.Tensor:
        """The integer levels ``v_bar`` of Eq. 1 (the same float ops as the forward, so exactly its values)."""
        qn, qp = signed_range(self.bits)
        with torch.no_grad():
            levels = torch.round(torch.clamp(self.weight / self.weight_step.view(-1, 1), -qn, qp))
        return levels.to(torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in_features)
        if self.act_step is not None:
            if self.act_init_pending:
                with torch.no_grad():
                    self.act_step.copy_(initial_step(x.float(), self.act_bits))
                self.act_init_pending = False
            x = _fake_quant_input(x, self.act_step, self.act_bits)
        return F.linear(x, self.quantized_weight(), self.bias)  # (..., out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"per_channel={self.per_channel}, act_bits={self.act_bits}")


class LsqPackedLinear(nn.Module):
    """The exported LSQ layer: bit-packed integer weights, dequantized on the fly; float arithmetic.

    State: ``weight_packed`` uint8 ``(ceil(out * in * bits / 8),)``, ``weight_step``
    float32 ``(out,)`` or ``(1,)``, ``bias`` float32 ``(out,)``, and ``act_step``
    ``(1,)`` when the inputs are quantized too.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, per_channel: bool,
                 act_bits: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.per_channel, self.act_bits = bits, per_channel, act_bits
        self.register_buffer("weight_packed",
                             torch.zeros(packed_numel(in_features * out_features, bits), dtype=torch.uint8))
        self.register_buffer("weight_step", torch.ones(out_features if per_channel else 1))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.register_buffer("act_step", torch.ones(1) if act_bits is not None else None)

    @classmethod
    def from_lsq(cls, mod: LsqLinear) -> LsqPackedLinear:
        out = cls(mod.in_features, mod.out_features, mod.bias is not None, mod.bits, mod.per_channel, mod.act_bits)
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
        return self.in_features * self.out_features

    def int_weight(self) -> torch.Tensor:
        levels = unpack_bits(self.weight_packed, self.bits, self.weight_numel, signed=True)
        return levels.view(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.int_weight().to(self.weight_step.dtype) * self.weight_step.view(-1, 1)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in_features)
        if self.act_step is not None:
            qn, qp = signed_range(self.act_bits)
            x = torch.round(torch.clamp(x / self.act_step, -qn, qp)) * self.act_step
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, self.bias)  # (..., out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits} (packed), "
                f"per_channel={self.per_channel}, act_bits={self.act_bits}")


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


def _layer_meta(model: nn.Module, names: list[str]) -> list[dict[str, Any]]:
    out = []
    for name in names:
        mod = model.get_submodule(name)
        out.append({"name": name, "in": mod.in_features, "out": mod.out_features, "bias": mod.bias is not None})
    return out


def prepare_lsq(model: nn.Module, names: list[str], cfg: LsqConfig) -> nn.Module:
    """Swap each named ``nn.Linear`` for an :class:`LsqLinear` with the initial step of §2 (in place)."""
    for name in names:
        model.set_submodule(name, LsqLinear.from_linear(model.get_submodule(name), cfg.bits, cfg.per_channel,
                                                        cfg.act_bits))
    return model


def pack_lsq(model: nn.Module, names: list[str]) -> nn.Module:
    """Swap each named :class:`LsqLinear` for its bit-packed :class:`LsqPackedLinear` (in place)."""
    for name in names:
        model.set_submodule(name, LsqPackedLinear.from_lsq(model.get_submodule(name)))
    return model


def _restore(model: nn.Module, cfg: LsqConfig, meta: dict[str, Any]) -> nn.Module:
    for layer in meta["layers"]:
        model.set_submodule(layer["name"], LsqPackedLinear(layer["in"], layer["out"], layer["bias"], cfg.bits,
                                                           cfg.per_channel, cfg.act_bits))
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
    summary="LSQ quantization-aware training of Linear weights (learned step), bit-packed file, float matmuls",
    restore=_restore,
    produces_int_weights=True,
)
def lsq_qat(model: nn.Module, cfg: LsqConfig, ctx: Any) -> StepOutput:
    model = copy.deepcopy(model).cpu()
    if cfg.from_scratch:
        reinit_weights(model, ctx.seed)
    names = quantizable_linears(model, cfg.skip_head)
    layers = _layer_meta(model, names)
    prepare_lsq(model, names, cfg)
    if cfg.act_bits is not None:
        # One batch sets every activation step (each LsqLinear initialises on its first input).
        with torch.no_grad():
            x, _ = next(iter(ctx.calib_loader(cfg.calib_images, batch_size=cfg.calib_images)))
            model.eval()(x)
    model = ctx.fit(model, desc="qat.lsq", **fit_overrides(cfg, ctx)).model
    pack_lsq(model, names)
    return StepOutput(model.eval(), {
        "layers": layers,
        "avg_bits": float(cfg.bits),  # bits per quantized Linear weight, as stored
        "quantized_weights": sum(layer["in"] * layer["out"] for layer in layers),
        "int_arithmetic": False,
    })
