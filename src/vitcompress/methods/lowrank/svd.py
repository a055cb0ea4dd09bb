"""``lowrank.svd``: truncated-SVD factorization of a ViT's Linear layers.

Eckart–Young: the best rank-k approximation of W (out × in) in Frobenius (and spectral) norm is
``U_k Σ_k V_kᵀ`` from its SVD, with squared error ``Σ_{i>k} σ_i²``. A factorized layer stores
``B = U_k Σ_k^½`` (out × k) and ``A = Σ_k^½ V_kᵀ`` (k × in) as two Linear layers (in → k without
bias, k → out with the original bias): ``k·(in + out) + out`` parameters instead of
``in·out + out``. Splitting Σ evenly keeps both factors at the same scale, which per-channel
int8 quantization afterwards prefers.

Unlike an attention approximation this shrinks the saved file: the artifact stores A and B.

Rank per layer, either
* ``energy``: the smallest k keeping that fraction of ``Σσ²`` (‖W_k‖²_F / ‖W‖²_F ≥ energy), or
* ``keep``: a global budget, the fraction of the targeted Linear layers' parameters kept. Ranks
  are allocated greedily across layers, one singular component at a time, by importance per
  parameter: ``σ_i² / ‖W‖²_F`` (the share of the layer's energy the component restores) divided by
  its cost ``in + out``, i.e. the fractional-knapsack order. Every layer keeps at least rank 1.

A layer is factorized only where that is smaller than the dense layer, ``k·(in + out) < in·out``;
otherwise it stays dense (in the budget it then costs ``in·out``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ...config import check
from ...errors import VitcompressError
from ...models.arch import SWAPPABLE_LINEARS, needs_swappable_linears
from ..registry import StepOutput, register_method
from ._common import check_finetune, finetune, one_thread

LayerKind = Literal["qkv", "proj", "fc1", "fc2", "head"]


class FactorizedLinear(nn.Module):
    """``nn.Linear(in, out)`` as ``up(down(x))``: in → rank (no bias), rank → out (with bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> FactorizedLinear:
        """The rank-``rank`` truncated SVD of ``linear`` (computed in float64)."""
        w = linear.weight.detach().double()  # (out, in)
        if not 1 <= rank <= min(w.shape):
            raise ValueError(f"rank must be in [1, {min(w.shape)}], got {rank}")
        with one_thread():
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
        dtype, device = linear.weight.dtype, linear.weight.device
        with torch.no_grad():
            layer.down.weight.copy_((root[:, None] * vh[:rank]).to(dtype))  # (rank, in)
            layer.up.weight.copy_((u[:, :rank] * root[None, :]).to(dtype))  # (out, rank)
            if linear.bias is not None:
                layer.up.bias.copy_(linear.bias.detach())
        return layer.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., rank) -> (..., out)
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def factorized_params(in_features: int, out_features: int, rank: int, bias: bool) -> int:
    return rank * (in_features + out_features) + (out_features if bias else 0)


def max_useful_rank(in_features: int, out_features: int) -> int:
    """The largest k with k·(in + out) < in·out: above it the factors outweigh the dense matrix."""
    return (in_features * out_features - 1) // (in_features + out_features)


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k with Σ_{i<k} σ_i² ≥ energy · Σ σ_i² (s sorted descending)."""
    e = s.double() ** 2
    frac = e.cumsum(0) / e.sum().clamp_min(1e-300)
    return min(int((frac < energy - 1e-12).sum().item()) + 1, len(s))


def budget_ranks(layers: dict[str, tuple[torch.Tensor, int, int]], weight_budget: int) -> dict[str, int | None]:
    """Ranks from a global weight budget; ``None`` means the layer stays dense.

    ``layers`` maps a name to (singular values descending, in, out). Greedy in the order of
    normalised energy per parameter; each layer's components are taken in order, and a layer
    whose next component does not fit is closed.
    """
    rank = {name: 1 for name in layers}  # rank 1 everywhere first
    # A layer too small for even rank 1 to pay (max_useful_rank 0) stays dense from the start.
    dense = {name for name, (_, i, o) in layers.items() if max_useful_rank(i, o) < 1}
    used = sum(i * o if name in dense else i + o for name, (_, i, o) in layers.items())
    if used > weight_budget:
        raise VitcompressError(
            f"lowrank.svd: keep is too small, rank 1 in every layer already needs {used} weights "
            f"(budget {weight_budget}); raise keep"
        )
    candidates = []
    for name, (s, i, o) in layers.items():
        e = s.double() ** 2
        share = e / e.sum().clamp_min(1e-300)
        for j in range(1, len(s)):
            candidates.append((float(share[j]) / (i + o), j, name))
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    closed: set[str] = set()
    for _, j, name in candidates:
        if name in closed or name in dense or rank[name] != j:
            continue
        _, i, o = layers[name]
        if j + 1 <= max_useful_rank(i, o):
            cost = i + o
        else:
            cost = i * o - rank[name] * (i + o)  # the rest of the layer at once: it becomes dense
        if used + cost > weight_budget:
            closed.add(name)
            continue
        used += cost
        if j + 1 <= max_useful_rank(i, o):
            rank[name] = j + 1
        else:
            dense.add(name)
    return {name: (None if name in dense else r) for name, r in rank.items()}


@dataclass(frozen=True)
class SVDConfig:
    """Rank by ``keep`` (global budget, default 0.5) or by ``energy`` (per layer); set one of them."""

    keep: float | None = 0.5
    energy: float | None = None
    layers: tuple[LayerKind, ...] = ("qkv", "proj", "fc1", "fc2")
    finetune_epochs: int = 0
    lr: float | None = None  # fine-tune learning rate; null: a third of the baseline's
    finetune_images: int | None = None  # fine-tune on this many training images (null: all)

    def __post_init__(self) -> None:
        check((self.keep is None) != (self.energy is None),
              "set exactly one of keep (global parameter budget) and energy (per-layer threshold); "
              "to use energy, also set keep: null")
        check(self.keep is None or 0 < self.keep < 1, f"keep must be in (0, 1), got {self.keep}")
        check(self.energy is None or 0 < self.energy <= 1, f"energy must be in (0, 1], got {self.energy}")
        check(len(self.layers) > 0, "layers must name at least one of qkv, proj, fc1, fc2, head")
        check_finetune(self)


def _targets(model: nn.Module, kinds: tuple[str, ...]) -> dict[str, nn.Linear]:
    found = {name: mod for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and name.rpartition(".")[2] in kinds}
    if not found:
        raise VitcompressError(f"lowrank.svd: the model has no Linear layers named {', '.join(kinds)}")
    return found


def choose_ranks(model: nn.Module, cfg: SVDConfig) -> dict[str, int | None]:
    """Rank per targeted Linear layer (``None``: stays dense)."""
    targets = _targets(model, cfg.layers)
    with one_thread():
        spectra = {name: (torch.linalg.svdvals(lin.weight.detach().double()), lin.in_features, lin.out_features)
                   for name, lin in targets.items()}
    if cfg.energy is not None:
        ranks: dict[str, int | None] = {}
        for name, (s, i, o) in spectra.items():
            k = energy_rank(s, cfg.energy)
            ranks[name] = k if k <= max_useful_rank(i, o) else None
        return ranks
    assert cfg.keep is not None
    total = sum(lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0) for lin in targets.values())
    biases = sum(lin.bias.numel() for lin in targets.values() if lin.bias is not None)
    return budget_ranks(spectra, int(cfg.keep * total) - biases)


def factorize(model: nn.Module, ranks: dict[str, int | None], *, from_weights: bool = True) -> nn.Module:
    """Replace each named Linear by a FactorizedLinear of its rank, in place (``None`` keeps it dense).

    ``from_weights=False`` only builds the shapes (restore: the tensors come from the artifact).
    """
    for name, rank in ranks.items():
        if rank is None:
            continue
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise VitcompressError(f"lowrank.svd: {name} is {type(linear).__name__}, not a Linear; "
                                   "the artifact does not match its model")
        if from_weights:
            new: nn.Module = FactorizedLinear.from_linear(linear, rank)
        else:
            new = FactorizedLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def _restore(model: nn.Module, cfg: SVDConfig, meta: dict[str, Any]) -> nn.Module:
    return factorize(model, meta["ranks"], from_weights=False)


@register_method(
    "lowrank.svd",
    SVDConfig,
    family="low-rank",
    summary="truncated-SVD factorization of Linear layers (rank by energy or a global parameter budget)",
    restore=_restore,
    supports=SWAPPABLE_LINEARS,
    requires=needs_swappable_linears,
)
def svd(model: nn.Module, cfg: SVDConfig, ctx: Any) -> StepOutput:
    model = copy.deepcopy(model)
    targets = _targets(model, cfg.layers)
    before = sum(p.numel() for lin in targets.values() for p in lin.parameters())
    ranks = choose_ranks(model, cfg)
    factorize(model, ranks)
    after = sum(p.numel() for name in targets for p in model.get_submodule(name).parameters())
    model = finetune(model, ctx, cfg, desc="svd")
    return StepOutput(model, {"ranks": ranks, "linear_params_before": before, "linear_params_after": after,
                              "kept": after / before, "dense_layers": sorted(n for n, r in ranks.items() if r is None)})
