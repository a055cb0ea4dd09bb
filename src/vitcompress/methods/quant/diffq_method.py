"""``qat.diffq``: DiffQ, differentiable quantization with pseudo quantization noise, exported bit-packed.

Défossez, Adi, Synnaeve, "Differentiable Model Compression via Pseudo Quantization
Noise" (TMLR 2022, arXiv:2104.09987), through the ``diffq`` package (``diffq.DiffQuantizer``);
equation numbers differ between the paper's versions, so the steps are named here:

* weights are grouped by ``group_size``; group ``g`` has a learned bit width
  ``b_g = min_bits + (max_bits - min_bits) * sigmoid(l_g)`` (the ``param="bits"``
  parametrisation of the package);
* pseudo quantization noise: in training each weight gets noise of the size of its
  quantization step, ``w + (max(w) - min(w)) / (2**b_g - 1) * U`` (``U`` uniform in
  [-1/2, 1/2], or the package's Gaussian of std 1/2), which is differentiable in
  both ``w`` and ``b_g``;
* the training objective adds ``penalty * M(b)``, the differentiable model size in MB;
* evaluation and export use true uniform quantization: ``b_g`` rounded, levels
  ``round((w - min) / (max - min) * (2**b_g - 1))`` with one (min, max) per tensor.

The weights of every ``nn.Linear`` and ``nn.Conv2d`` (a timm ViT's patch projection,
every conv of a ``vitc_small`` stem) are quantized, as in ``qat.lsq``: first each BatchNorm
that follows a conv is folded into it (:mod:`.convs`), and a layer whose weight count
``group_size`` does not divide stays float (listed in ``float_linears``/``float_convs``);
``convs: false`` quantizes the Linear weights only. The position embedding, class
token, norms and biases stay float (float16 in the study's file). Training runs through the shared loop
(``ctx.fit``): the bit logits are parameters of the quantized modules, so the
loop's AdamW trains them (1-D, hence without weight decay). The loop has one learning
rate, and a short fine-tune needs the bits to move much faster than the weights (the
package gives them their own Adam at 1e-3 over hundreds of epochs), so each logit is
stored divided by ``k = bits_lr / lr`` and multiplied by ``k`` when read: Adam's step
is invariant to gradient scale, so the logit then moves with a peak learning rate of
``bits_lr`` on the loop's warm-up + cosine schedule.

The artifact: each quantized layer becomes a :class:`DiffqPackedLinear` or
:class:`DiffqPackedConv2d` whose state holds the rounded bit width of every group
packed at the fewest bits that hold ``b_g - min_bits``, the levels of the groups of
each bit width packed at that width (:mod:`.packing`), the tensor's (min, max) and the
float bias; the safetensors file is the packed size. Their forward unpacks and
dequantizes on the fly and multiplies (or convolves) in float: ``int_arithmetic`` is
false for this row, and its CPU speed includes the unpacking.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...config import check
from ...errors import VitcompressError
from ...models.arch import SWAPPABLE_LINEARS, needs_swappable_linears
from ..registry import StepOutput, register_method
from .convs import fold_batchnorms, refold_structure
from .lsq import (
    Conv2dOp,
    LinearOp,
    fit_overrides,
    layer_geometry,
    quantizable_layers,
    reinit_weights,
)
from .packing import bits_for, pack_bits, packed_numel, unpack_bits

LOGIT_SUFFIX = "_diffq"


@dataclass(frozen=True)
class DiffqConfig:
    group_size: int = 16
    min_bits: int = 2
    max_bits: int = 8
    init_bits: float = 4.0
    # Loss weight of the quantized model size in MB. Scale it with the model: at equilibrium the
    # noise costs roughly 0.09 * penalty * (quantized weights in millions) of extra loss.
    penalty: float = 0.5
    noise: Literal["uniform", "gaussian"] = "uniform"
    bits_lr: float = 0.02  # peak learning rate of the bit logits (the weights use lr)
    skip_head: bool = False
    # Quantize the Conv2d weights too (patch projection or conv stem, BatchNorms folded in first);
    # false: Linear weights only, the convs and BatchNorms stay as they are.
    convs: bool = True
    epochs: int = 1
    lr: float | None = None  # None: the baseline's learning rate
    train_subset: int | None = None  # None: the baseline's
    from_scratch: bool = False  # re-initialise all weights first (the study trained DiffQ from scratch)

    def __post_init__(self) -> None:
        check(self.group_size >= 1, f"group_size must be >= 1, got {self.group_size}")
        check(1 <= self.min_bits < self.max_bits <= 15,
              f"need 1 <= min_bits < max_bits <= 15, got {self.min_bits} and {self.max_bits}")
        check(self.min_bits < self.init_bits < self.max_bits,
              f"init_bits must lie strictly between min_bits and max_bits, got {self.init_bits}")
        check(self.penalty >= 0, f"penalty must be >= 0, got {self.penalty}")
        check(0 < self.bits_lr < 10, f"bits_lr must be in (0, 10), got {self.bits_lr}")
        check(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        check(self.lr is None or 0 < self.lr < 10, f"lr must be in (0, 10) or null, got {self.lr}")
        check(self.train_subset is None or self.train_subset >= 1, "train_subset must be >= 1 or null")


# diffq is opt-in: CC BY-NC 4.0 (non-commercial), archived upstream; the study skips its rows without it.
MISSING_DIFFQ = ("diffq is not installed: it is CC BY-NC 4.0 (non-commercial) and opt-in; pip install "
                 "'vitcompress[diffq]' to run this row")


def _import_diffq() -> Any:
    try:
        import diffq
    except ImportError:
        raise VitcompressError(MISSING_DIFFQ) from None
    return diffq


def make_quantizer(model: nn.Module, cfg: DiffqConfig, layer_names: list[str], logit_scale: float = 1.0) -> Any:
    """A ``diffq.DiffQuantizer`` over the weights of ``layer_names`` only; logits stored divided by ``logit_scale``."""
    diffq = _import_diffq()

    # Defined here because diffq is imported only when this method runs.
    class ScaledLogitDiffQuantizer(diffq.DiffQuantizer):
        # 1 while the base class initialises (it checks init_bits through _get_bits), then logit_scale.
        logit_scale = 1.0

        def _get_bits(self, logit: torch.Tensor) -> torch.Tensor:
            return super()._get_bits(logit * self.logit_scale)

    keep = {f"{name}.weight" for name in layer_names}
    exclude = [name for name, _ in model.named_parameters() if name not in keep]
    quantizer = ScaledLogitDiffQuantizer(model, min_size=0.0, group_size=cfg.group_size, min_bits=cfg.min_bits,
                                         max_bits=cfg.max_bits, init_bits=cfg.init_bits, noise=cfg.noise,
                                         suffix=LOGIT_SUFFIX, exclude=exclude, detect_bound=False)
    quantizer.logit_scale = logit_scale
    with torch.no_grad():
        for logit in bit_logits(model):
            logit.div_(logit_scale)
    # The shared loop's optimizer already holds the logits (they are model parameters).
    quantizer.no_optimizer()
    return quantizer


def bit_logits(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if name.endswith(LOGIT_SUFFIX)]


def learned_bits(quantizer: Any, model: nn.Module) -> torch.Tensor:
    """The continuous bits of every group (before rounding), concatenated."""
    with torch.no_grad():
        return torch.cat([quantizer._get_bits(p).flatten() for p in bit_logits(model)] or [torch.zeros(0)])


class _DiffqPackedLayer(nn.Module):
    """The exported DiffQ layer: per-group bit widths and levels, bit-packed; dequantized on the fly; float arithmetic.

    The mixin (:class:`.lsq.LinearOp` or :class:`.lsq.Conv2dOp`) gives the weight's shape
    and the op. State: ``group_bits`` uint8, the ``n_groups`` values ``b_g - min_bits``
    packed at ``bits_width`` bits; ``levels_{b}bit`` uint8, the levels of the groups with
    ``b_g = b`` (in group order; groups of ``group_size`` consecutive weights in C order)
    packed at ``b`` bits; ``weight_range`` float32 ``(2,)`` = (min, max); ``bias`` float32 ``(out,)``.
    """

    def __init__(self, geometry: dict[str, Any], group_size: int, min_bits: int, bits_width: int,
                 groups_per_bits: dict[int, int]) -> None:
        super().__init__()
        self.weight_shape = self._set_geometry(geometry)
        self.group_size, self.min_bits, self.bits_width = group_size, min_bits, bits_width
        self.groups_per_bits = {int(b): int(n) for b, n in sorted(groups_per_bits.items()) if int(n) > 0}
        self.n_groups = self.weight_numel // group_size
        if sum(self.groups_per_bits.values()) != self.n_groups:
            raise VitcompressError(f"DiffQ layer meta lists {sum(self.groups_per_bits.values())} groups, "
                                   f"its shape has {self.n_groups}; the artifact is corrupt, re-create it")
        self.register_buffer("group_bits", torch.zeros(packed_numel(self.n_groups, bits_width), dtype=torch.uint8))
        for b, n in self.groups_per_bits.items():
            self.register_buffer(f"levels_{b}bit", torch.zeros(packed_numel(n * group_size, b), dtype=torch.uint8))
        self.register_buffer("weight_range", torch.zeros(2))
        self.bias = nn.Parameter(torch.zeros(self.weight_shape[0]), requires_grad=False) if geometry["bias"] else None

    @classmethod
    def from_levels(cls, layer: nn.Module, levels: torch.Tensor, weight_range: tuple[float, float],
                    bits: torch.Tensor, group_size: int, min_bits: int) -> _DiffqPackedLayer:
        """Pack diffq's quantized state of one layer's weight: ``levels`` (G, group_size), ``bits`` (G,)."""
        bits = bits.reshape(-1).to(torch.int64)
        counts = {int(b): int((bits == b).sum()) for b in torch.unique(bits)}
        width = bits_for(int(bits.max()) - min_bits)
        mod = cls(layer_geometry(layer), group_size, min_bits, width, counts)
        with torch.no_grad():
            mod.group_bits.copy_(pack_bits(bits - min_bits, width))
            for b in mod.groups_per_bits:
                getattr(mod, f"levels_{b}bit").copy_(pack_bits(levels[bits == b], b))
            mod.weight_range.copy_(torch.tensor(weight_range, dtype=torch.float32))
            if layer.bias is not None:
                mod.bias.copy_(layer.bias)
        return mod

    @property
    def weight_numel(self) -> int:
        """Weights this layer represents (its buffers hold them packed)."""
        return math.prod(self.weight_shape)

    def bits(self) -> torch.Tensor:
        return unpack_bits(self.group_bits, self.bits_width, self.n_groups, signed=False) + self.min_bits  # (G,)

    def levels(self, bits: torch.Tensor) -> torch.Tensor:
        """Integer levels (G, group_size) of every group, given the groups' widths ``bits`` (G,)."""
        order = torch.argsort(bits, stable=True)  # groups by width, in group order within a width
        sorted_levels = torch.cat([
            unpack_bits(getattr(self, f"levels_{b}bit"), b, n * self.group_size, signed=False).view(n, self.group_size)
            for b, n in self.groups_per_bits.items()
        ])  # (G, group_size), groups in `order`
        out = torch.empty_like(sorted_levels)
        out[order] = sorted_levels
        return out

    def dequantized_weight(self) -> torch.Tensor:
        bits = self.bits()
        # Same float ops as diffq.uniform.uniform_unquantize, so the values equal diffq's eval weights.
        mn, mx = self.weight_range.tolist()
        unit = 1 / (2 ** bits[:, None].float() - 1)  # (G, 1)
        w = self.levels(bits).float() * unit * (mx - mn) + mn  # (G, group_size)
        return w.view(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, self.dequantized_weight().to(x.dtype))

    def extra_repr(self) -> str:
        hist = ", ".join(f"{b}b:{n}" for b, n in self.groups_per_bits.items())
        return f"{self._geometry_repr()}, group_size={self.group_size}, groups by bits {{{hist}}} (packed)"


class DiffqPackedLinear(LinearOp, _DiffqPackedLayer):
    """A Linear exported from DiffQ: ``F.linear`` with the dequantized packed weight."""


class DiffqPackedConv2d(Conv2dOp, _DiffqPackedLayer):
    """A Conv2d exported from DiffQ: ``F.conv2d`` with the dequantized packed weight."""


_DIFFQ_PACKED: dict[str, type[_DiffqPackedLayer]] = {"linear": DiffqPackedLinear, "conv2d": DiffqPackedConv2d}


def _restore(model: nn.Module, cfg: DiffqConfig, meta: dict[str, Any]) -> nn.Module:
    refold_structure(model, meta.get("folded_bn", []))
    for layer in meta["layers"]:
        # Meta written before convs were quantized names no kind: those layers are all Linear.
        cls = _DIFFQ_PACKED[layer.get("kind", "linear")]
        model.set_submodule(layer["name"], cls(layer, cfg.group_size, cfg.min_bits, layer["bits_width"],
                                               {int(b): n for b, n in layer["groups_per_bits"].items()}))
    return model


def export_packed(model: nn.Module, quantizer: Any, cfg: DiffqConfig) -> tuple[nn.Module, dict[str, Any]]:
    """Replace each quantized layer by its packed DiffQ layer; detach the quantizer; return meta."""
    names = {id(mod): name for name, mod in model.named_modules()}
    state = quantizer.get_quantized_state(packed=False)
    # diffq lists the quantized state in the order of its quantized parameters (none are shared: detect_bound off).
    entries = [(names[id(qp.module)], q) for qp, q in zip(quantizer._qparams, state["quantized"], strict=True)]
    continuous = learned_bits(quantizer, model)
    quantizer.detach()  # removes the hooks and the logit parameters
    layers, hist, total_bits, total = [], {}, 0, 0
    for name, (levels, weight_range, bits) in entries:
        layer = model.get_submodule(name)
        cls = _DIFFQ_PACKED[layer_geometry(layer)["kind"]]
        packed = cls.from_levels(layer, levels, weight_range, bits, cfg.group_size, cfg.min_bits)
        model.set_submodule(name, packed)
        layers.append({"name": name, **layer_geometry(packed), "bits_width": packed.bits_width,
                       "groups_per_bits": {str(b): n for b, n in packed.groups_per_bits.items()}})
        for b, n in packed.groups_per_bits.items():
            hist[str(b)] = hist.get(str(b), 0) + n
            total_bits += b * n * cfg.group_size
        total += packed.weight_numel
    meta = {
        "layers": layers,
        "avg_bits": total_bits / max(1, total),  # learned bits per quantized weight (Linear and conv), as stored
        "learned_bits_mean": float(continuous.mean()) if continuous.numel() else None,  # before rounding
        "groups_per_bits": hist,
        "quantized_weights": total,
        "int_arithmetic": False,
    }
    return model, meta


@register_method(
    "qat.diffq",
    DiffqConfig,
    family="quantization",
    summary="DiffQ: pseudo-quantization-noise training with learned bits per group (diffq), bit-packed file",
    restore=_restore,
    produces_int_weights=True,
    supports=SWAPPABLE_LINEARS,
    requires=needs_swappable_linears,
    package=("diffq", MISSING_DIFFQ)
)
def diffq_qat(model: nn.Module, cfg: DiffqConfig, ctx: Any) -> StepOutput:
    model = copy.deepcopy(model).cpu()
    if cfg.from_scratch:
        reinit_weights(model, ctx.seed)
    folded = fold_batchnorms(model) if cfg.convs else []
    names = quantizable_layers(model, cfg.skip_head, cfg.convs)
    # Layers whose weight the group size does not divide stay float (diffq needs whole groups).
    skipped = [n for n in names if model.get_submodule(n).weight.numel() % cfg.group_size]
    names = [n for n in names if n not in skipped]
    overrides = fit_overrides(cfg, ctx)
    quantizer = make_quantizer(model, cfg, names, logit_scale=cfg.bits_lr / overrides.get("lr", ctx.baseline_train.lr))
    smoothing = ctx.baseline_train.label_smoothing

    def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        task = F.cross_entropy(m(x), y, label_smoothing=smoothing)
        return task + cfg.penalty * quantizer.model_size().to(task.device)

    model = ctx.fit(model, loss_fn=loss_fn, desc="qat.diffq", **overrides).model
    model, meta = export_packed(model, quantizer, cfg)
    meta["folded_bn"] = folded
    meta["float_linears"] = [n for n in skipped if isinstance(model.get_submodule(n), nn.Linear)]
    meta["float_convs"] = [n for n in skipped if isinstance(model.get_submodule(n), nn.Conv2d)]
    return StepOutput(model.eval(), meta)
