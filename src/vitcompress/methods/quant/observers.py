"""Calibrators: from observed activations to a clip range, then to a scale and zero point.

FQ-ViT (Lin et al., 2021, §4.2 and Table 2) compares four ways of picking the
range of a per-tensor activation quantizer, all available here by name:

* ``minmax``: the smallest and largest value seen;
* ``ema``: exponential moving averages of each batch's min and max
  (``r ← r + σ (r_batch − r)``);
* ``percentile``: the ``p`` and ``100 − p`` percentiles (default 99.99), which
  drops the rare extremes;
* ``omse``: shrink the min/max range by a factor ``1 − 0.01 i`` (i < 90) and keep
  the factor whose quantize→dequantize round trip has the smallest mean squared
  error on the observed values (OMSE, Choukroun et al., 2019).

:class:`PowerOfTwoObserver` gives the Power-of-Two Factor of FQ-ViT §3.2: one
shared scale ``s`` and zero point for a LayerNorm input plus a per-channel
``α_c ∈ {0..K}`` such that channel ``c`` is quantized with scale ``2^α_c · s``:
``x_q = clip(round(x / (2^α_c s)) + zp, 0, 2^b − 1)``, where ``s`` is the
min/max scale divided by ``2^K`` and ``α_c`` minimizes the channel's
quantization MSE.

Observers keep an exact running min/max and, where the rule needs the values
themselves (percentile, OMSE, PTF), a uniform random sample of them (bottom-k
of random keys, so every value seen has the same chance to be kept and memory
stays bounded).

Across processes (``accelerate launch``, each process calibrating on its own
batches, :func:`vitcompress.dist.shard`), every observer hands its ``state()``
to the others and ``merge`` combines them into what one process would have
observed on all the batches, exactly: min/max by min and max; EMA by replaying
the per-batch ranges in batch order; samples by keeping the bottom k of the
union, where a value's key depends only on the seed, the global batch index
and its position in the batch, so the union's bottom k is the sample one
process would have kept.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from ...errors import VitcompressError

CalibratorName = Literal["minmax", "ema", "percentile", "omse"]
CALIBRATORS: tuple[str, ...] = ("minmax", "ema", "percentile", "omse")

_EPS = 1e-8


def qparams_asymmetric(lo: float, hi: float, qmin: int, qmax: int) -> tuple[float, int]:
    """Scale and zero point mapping ``[lo, hi]`` (widened to hold 0) onto ``[qmin, qmax]``.

    Zero must be exactly representable: padding and ReLU-like zeros then cost
    no error, and ONNX's QuantizeLinear needs an integer zero point.
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / (qmax - qmin), _EPS)
    zero_point = int(min(max(qmin - round(lo / scale), qmin), qmax))
    return scale, zero_point


def fake_quant_reference(x: torch.Tensor, scale: float | torch.Tensor, zero_point: int | torch.Tensor,
                         qmin: int, qmax: int) -> torch.Tensor:
    """Quantize then dequantize (ONNX QuantizeLinear/DequantizeLinear semantics: round half to even)."""
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


class _Sample:
    """A bounded uniform random sample of the rows of everything fed to ``add``.

    Each row gets a random key; the ``k`` rows with the smallest keys are kept,
    which is a uniform sample without replacement over all rows ever seen. The
    keys of batch ``b`` come from a generator seeded by ``(seed, b)``: the same
    rows get the same keys whichever process sees the batch, and bottom-k of a
    union is bottom-k of the parts' bottom-k, so samples merge exactly. Keys are
    float64 so that ties (which would make the kept order depend on arrival) do
    not occur in practice.
    """

    def __init__(self, k: int, seed: int = 0) -> None:
        self.k = k
        self.seed = seed
        self.keys = torch.empty(0, dtype=torch.float64)
        self.rows: torch.Tensor | None = None

    def add(self, rows: torch.Tensor, batch: int) -> None:
        rows = rows.detach().float().cpu()
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + batch) % 2**63)
        self._keep(rows, torch.rand(rows.shape[0], generator=gen, dtype=torch.float64))

    def _keep(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        if self.rows is not None:
            rows = torch.cat([self.rows, rows])
            keys = torch.cat([self.keys, keys])
        if rows.shape[0] > self.k:
            keep = torch.topk(keys, self.k, largest=False).indices  # sorted by key
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys

    def state(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.rows is None else (self.rows, self.keys)

    def merge(self, states: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Become the sample of all processes' rows (``states`` in rank order, this process's included)."""
        self.rows, self.keys = None, torch.empty(0, dtype=torch.float64)
        parts = [s for s in states if s is not None]
        if parts:
            # Rank order is batch order (contiguous shards): below k rows, the one-process order too.
            self._keep(torch.cat([r for r, _ in parts]), torch.cat([k for _, k in parts]))

    def values(self) -> torch.Tensor:
        if self.rows is None:
            raise VitcompressError("a quantizer saw no calibration data; give the calibration a non-empty loader")
        return self.rows


class Observer:
    """Watches activations during calibration and proposes a clip range."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf
        # Global index of the next batch; calibration sets it to this process's first batch.
        self.batch = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        self.batch += 1

    def state(self) -> dict[str, Any]:
        """What :meth:`merge` needs from this process (picklable)."""
        return {"lo": self.lo, "hi": self.hi}

    def merge(self, states: list[dict[str, Any]]) -> None:
        """Combine every process's :meth:`state` (rank order, this one's included) into all-batch statistics."""
        self.lo = min(s["lo"] for s in states)
        self.hi = max(s["hi"] for s in states)

    def clip_range(self, qmin: int, qmax: int) -> tuple[float, float]:
        self._check()
        return self.lo, self.hi

    def qparams(self, qmin: int, qmax: int) -> tuple[float, int]:
        lo, hi = self.clip_range(qmin, qmax)
        return qparams_asymmetric(lo, hi, qmin, qmax)

    def _check(self) -> None:
        if not math.isfinite(self.lo) or not math.isfinite(self.hi):
            raise VitcompressError("a quantizer saw no (or non-finite) calibration data; check the calibration images")


class MinMaxObserver(Observer):
    """The whole observed range."""


class EmaObserver(Observer):
    """Moving averages of the per-batch min and max.

    FQ-ViT uses σ = 0.01 over its calibration batches; with the few batches a
    small calibration set gives here, σ = 0.1 lets later batches count. The
    per-batch ranges are kept (two floats a batch) and averaged at the end, so
    processes that each saw some of the batches can replay them in batch order.
    """

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__()
        self.sigma = sigma
        self.ranges: list[tuple[float, float]] = []

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        self.ranges.append((float(x.min()), float(x.max())))

    def state(self) -> dict[str, Any]:
        return super().state() | {"ranges": self.ranges}

    def merge(self, states: list[dict[str, Any]]) -> None:
        super().merge(states)
        self.ranges = [r for s in states for r in s["ranges"]]

    def clip_range(self, qmin: int, qmax: int) -> tuple[float, float]:
        self._check()
        ema_lo, ema_hi = self.ranges[0]
        for lo, hi in self.ranges[1:]:
            ema_lo += self.sigma * (lo - ema_lo)
            ema_hi += self.sigma * (hi - ema_hi)
        return ema_lo, ema_hi


class _SampledObserver(Observer):
    def __init__(self, max_samples: int = 1 << 17, seed: int = 0) -> None:
        super().__init__()
        self.sample = _Sample(max_samples, seed)

    def update(self, x: torch.Tensor) -> None:
        self.sample.add(x.detach().reshape(-1, 1), self.batch)
        super().update(x)

    def state(self) -> dict[str, Any]:
        return super().state() | {"sample": self.sample.state()}

    def merge(self, states: list[dict[str, Any]]) -> None:
        super().merge(states)
        self.sample.merge([s["sample"] for s in states])


class PercentileObserver(_SampledObserver):
    """The ``100 − p`` and ``p`` percentiles of the observed values."""

    def __init__(self, percentile: float = 99.99, **kw: int) -> None:
        super().__init__(**kw)
        if not 50.0 < percentile <= 100.0:
            raise VitcompressError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def clip_range(self, qmin: int, qmax: int) -> tuple[float, float]:
        self._check()
        v = self.sample.values().reshape(-1)
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0])
        lo, hi = torch.quantile(v, q).tolist()
        return lo, hi


class OmseObserver(_SampledObserver):
    """The shrunken min/max range with the least quantization MSE (FQ-ViT's OMSE, 90 candidates)."""

    steps = 90

    def clip_range(self, qmin: int, qmax: int) -> tuple[float, float]:
        self._check()
        v = self.sample.values().reshape(-1)
        best, best_err = (self.lo, self.hi), math.inf
        for i in range(self.steps):
            r = 1.0 - 0.01 * i
            scale, zp = qparams_asymmetric(self.lo * r, self.hi * r, qmin, qmax)
            err = float((fake_quant_reference(v, scale, zp, qmin, qmax) - v).pow(2).mean())
            if err < best_err:
                best, best_err = (self.lo * r, self.hi * r), err
        return best


def make_observer(name: str, *, percentile: float = 99.99, seed: int = 0) -> Observer:
    """An observer by calibrator name (``minmax``, ``ema``, ``percentile``, ``omse``)."""
    if name == "minmax":
        return MinMaxObserver()
    if name == "ema":
        return EmaObserver()
    if name == "percentile":
        return PercentileObserver(percentile, seed=seed)
    if name == "omse":
        return OmseObserver(seed=seed)
    raise VitcompressError(f"unknown calibrator {name!r}; choose one of {', '.join(CALIBRATORS)}")


class PowerOfTwoObserver:
    """Per-channel min/max and a sample of tokens of a ``(..., C)`` activation, for PTF (FQ-ViT §3.2)."""

    def __init__(self, channels: int, max_rows: int = 4096, seed: int = 0) -> None:
        self.channels = channels
        self.lo = torch.full((channels,), math.inf)
        self.hi = torch.full((channels,), -math.inf)
        self.sample = _Sample(max_rows, seed)
        self.batch = 0  # as in Observer

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.channels).float().cpu()  # (tokens, C)
        self.lo = torch.minimum(self.lo, rows.min(0).values)
        self.hi = torch.maximum(self.hi, rows.max(0).values)
        self.sample.add(rows, self.batch)
        self.batch += 1

    def state(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "sample": self.sample.state()}

    def merge(self, states: list[dict[str, Any]]) -> None:
        self.lo = torch.stack([s["lo"] for s in states]).amin(0)
        self.hi = torch.stack([s["hi"] for s in states]).amax(0)
        self.sample.merge([s["sample"] for s in states])

    def ptf_params(self, qmax: int, k: int) -> tuple[float, int, torch.Tensor]:
        """``(s, zp, α)``: base scale, shared zero point, per-channel power-of-two exponents in ``0..k``.

        The largest factor ``2^k s`` is the plain min/max scale over all channels,
        so every channel fits at some ``α_c ≤ k``; channels with a small range
        take a small ``α_c`` and keep ``k`` more bits of resolution.
        """
        if not torch.isfinite(self.lo).all():
            raise VitcompressError("a PTF quantizer saw no calibration data; give the calibration a non-empty loader")
        top_scale, zp = qparams_asymmetric(float(self.lo.min()), float(self.hi.max()), 0, qmax)
        base = top_scale / 2**k
        rows = self.sample.values()  # (tokens, C)
        errs = torch.stack([
            (fake_quant_reference(rows, base * 2**a, zp, 0, qmax) - rows).pow(2).mean(0) for a in range(k + 1)
        ])  # (k + 1, C)
        # Ties go to the larger factor: equal error, and the channel's extremes stay unclipped.
        alpha = (k - errs.flip(0).argmin(0)).to(torch.int8)
        return base, zp, alpha


def quantize_weight_per_channel(w: torch.Tensor, bits: int, method: Literal["minmax", "omse"] = "minmax",
                                scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel integers in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` stored as int8, and scales.

    ``omse`` shrinks each row's max |w| by ``1 − 0.01 i`` (i < 50) and keeps the
    factor with the least squared error per row; it matters at 4 and 6 bits.
    The scales are rounded to ``scale_dtype`` *before* the integers are computed,
    so integers and stored scales agree exactly.
    """
    if not 2 <= bits <= 8:
        raise VitcompressError(f"weight bits must be in 2..8 (int8 storage), got {bits}")
    qmax = 2 ** (bits - 1) - 1
    w = w.detach().float()
    w2 = w.reshape(w.shape[0], -1)
    amax = w2.abs().amax(1).clamp_min(_EPS)  # (out,)
    if method == "omse":
        best_err = torch.full_like(amax, math.inf)
        best = amax.clone()
        for i in range(50):
            cand = amax * (1.0 - 0.01 * i)
            s = (cand / qmax)[:, None]
            err = (torch.clamp(torch.round(w2 / s), -qmax, qmax) * s - w2).pow(2).sum(1)
            better = err < best_err
            best = torch.where(better, cand, best)
            best_err = torch.where(better, err, best_err)
        amax = best
    elif method != "minmax":
        raise VitcompressError(f"unknown weight calibrator {method!r}; choose minmax or omse")
    tiny = torch.finfo(scale_dtype).smallest_normal
    scale = (amax / qmax).clamp_min(tiny).to(scale_dtype)
    q = torch.clamp(torch.round(w2 / scale.float()[:, None]), -qmax, qmax).to(torch.int8).reshape(w.shape)
    return q, scale
