"""How important each prunable unit is: Taylor (eq. 7), KL (eq. 8), weight magnitude, learned gate.

Every criterion returns, per coupled group (``groups.py``), a score for each unit
(attention (head, dim), MLP channel or conv-stem channel) and, for attention, a score
for each whole head. Higher means more important; the ranking in ``select.py`` removes the lowest.

* ``taylor`` - the study's eq. 7, the first-order Taylor estimate of the loss
  change when a group B is removed (Molchanov et al. 2019):
  ``s_B = (sum_{b in B} dL/dw_b * w_b)^2``, computed per calibration batch (L the
  mean cross-entropy of that batch) and summed over the batches. The square is
  taken per batch and per group, so a head's score is the square of the sum over
  all its dims, not the sum of its dims' scores.
* ``kl`` - the study's eq. 8 (Yu et al., ref [17]): the KL divergence between the
  model's output distribution with and without the candidate block, summed over the
  calibration images: ``s_B = sum_x KL(p(y|x) || p_{-B}(y|x))``. Candidates are whole
  heads and channel chunks (an MLP layer's channels, or each head's dims, sorted by
  weight magnitude and split into ``chunks`` runs); each unit of a chunk gets an
  equal share of the chunk's score. Removing a block is exact (gates at 0, see
  ``masks.py``), and only the blocks from the candidate's on are re-run.
* ``magnitude`` - the sum of squared weights a unit owns.
* ``gate`` - the absolute value of the unit's learned soft gate (``gates.py``).

Taylor and KL are sums over calibration batches. Under ``accelerate launch`` each
process scores its own share of the batches (``structured.calibration_batches``)
and the sums are added across processes, so every process ranks - and cuts - the
same units, with the scores one process would get from all the batches (up to
float64 summation order). Magnitude and gate scores read the weights and gates,
which data-parallel training keeps identical in every process: nothing to reduce.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ... import dist
from .groups import CoupledGroup, ParamSlice
from .masks import install_gates, installed_gates, remove_gates

Batch = tuple[torch.Tensor, torch.Tensor]
Criterion = Literal["taylor", "magnitude", "kl", "gate"]


@dataclass
class GroupScores:
    units: torch.Tensor  # group.shape: one score per (head, dim) or per channel
    heads: torch.Tensor | None = None  # (heads,) whole-head scores of an attention group


def _per_unit(t: torch.Tensor, s: ParamSlice, shape: tuple[int, ...]) -> torch.Tensor:
    """Sum ``t`` (shaped like the parameter) over everything but the units' axis, then over q/k/v repeats."""
    other = [d for d in range(t.dim()) if d != s.axis]
    v = t.sum(dim=other) if other else t
    v = v.reshape(s.view)
    lead = len(s.view) - len(shape)
    return v.sum(dim=tuple(range(lead))) if lead else v


def _with_heads(group: CoupledGroup, units: torch.Tensor) -> GroupScores:
    return GroupScores(units, units.sum(-1) if group.kind == "attn" else None)


def _device(model: nn.Module) -> torch.device:
    # Scoring a large ViT (the CIFAR recipes' ViT-B) is many forward passes: use the GPU when there is one.
    return torch.device("cuda") if torch.cuda.is_available() else next(model.parameters()).device


def taylor_importance(model: nn.Module, groups: list[CoupledGroup], batches: Iterable[Batch],
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                      ) -> list[GroupScores]:
    """Eq. 7 summed over ``batches``: ``sum_batches (sum_{b in B} dL/dw_b * w_b)^2`` per unit and per head."""
    device = _device(model)
    home = next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()  # eval: no dropout, so the scores are deterministic
    params = dict(model.named_parameters())
    units = [torch.zeros(g.shape, dtype=torch.float64, device=device) for g in groups]
    heads = [torch.zeros(g.shape[0], dtype=torch.float64, device=device) for g in groups]
    try:
        with torch.enable_grad():
            for x, y in batches:
                model.zero_grad(set_to_none=True)
                loss_fn(model(x.to(device)), y.to(device)).backward()
                for i, g in enumerate(groups):
                    c = sum(_per_unit((params[s.name].grad * params[s.name]).detach().double(), s, g.shape)
                            for s in g.slices)
                    units[i] += c**2
                    if g.kind == "attn":
                        heads[i] += c.sum(-1) ** 2
        dist.all_reduce_([*units, *(h for g, h in zip(groups, heads) if g.kind == "attn")], "sum")
    finally:
        model.zero_grad(set_to_none=True)
        model.to(home).train(was_training)
    return [GroupScores(u.cpu(), h.cpu() if g.kind == "attn" else None) for g, u, h in zip(groups, units, heads)]


@torch.no_grad()
def magnitude_importance(model: nn.Module, groups: list[CoupledGroup]) -> list[GroupScores]:
    """Sum of the squared weights (and biases) each unit owns."""
    params = dict(model.named_parameters())
    out = []
    for g in groups:
        units = sum(_per_unit(params[s.name].detach().double() ** 2, s, g.shape) for s in g.slices)
        out.append(_with_heads(g, units.cpu()))
    return out


@torch.no_grad()
def gate_importance(model: nn.Module, groups: list[CoupledGroup]) -> list[GroupScores]:
    """|gate| of each unit; a head scores the sum over its dims. Needs the gates installed (``masks.py``)."""
    return [_with_heads(g, gate.gate.detach().abs().double().cpu().reshape(g.shape))
            for g, gate in zip(groups, installed_gates(model, groups), strict=True)]


class _Tail:
    """Run a timm ViT from the input of block ``b`` to the logits, reusing cached block inputs."""

    def __init__(self, model: nn.Module, images: list[torch.Tensor]) -> None:
        self.model = model
        self.images = images
        self.block = -1
        self.inputs: list[torch.Tensor] = []
        self.split = all(hasattr(model, a) for a in ("norm", "forward_head"))

    def logits(self, block: int | None) -> list[torch.Tensor]:
        """Logits with the model's current gates, run from block ``block`` on (``None``: from the input)."""
        if not self.split or block is None:
            return [self.model(x) for x in self.images]
        if block != self.block:
            self._cache(block)
        rest = self.model.blocks[block:]
        return [self.model.forward_head(self.model.norm(rest(h))) for h in self.inputs]

    def _cache(self, block: int) -> None:
        captured: list[torch.Tensor] = []
        hook = self.model.blocks[block].register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
        try:
            for x in self.images:
                self.model(x)
        finally:
            hook.remove()
        self.block, self.inputs = block, captured


@torch.no_grad()
def kl_importance(model: nn.Module, groups: list[CoupledGroup], batches: Iterable[Batch], *, chunks: int = 16,
                  attention_unit: Literal["head", "dim"] = "head") -> list[GroupScores]:
    """Eq. 8: summed KL(full || without block) over the calibration images, per head and per channel chunk."""
    device = _device(model)
    home = next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    mags = magnitude_importance(model, groups)
    images = [x.to(device) for x, _ in batches]
    ref = [F.log_softmax(model(x).double(), -1) for x in images]
    gates = install_gates(model, groups)
    tail = _Tail(model, images)

    def kl_without(gate: torch.Tensor, index: tuple[torch.Tensor, ...] | torch.Tensor, block: int | None) -> float:
        gate[index] = 0.0
        total = sum(F.kl_div(F.log_softmax(z.double(), -1), r, log_target=True, reduction="sum").item()
                    for z, r in zip(tail.logits(block), ref))
        gate[index] = 1.0
        return float(total)

    all_units: list[torch.Tensor] = []
    all_heads: list[torch.Tensor | None] = []  # whole-head scores where heads are the candidates
    try:
        for g, gate_mod, mag in zip(groups, gates, mags, strict=True):
            gate = gate_mod.gate.data.view(g.shape)  # a view: writes reach the module's gate
            units = torch.zeros(g.shape, dtype=torch.float64)
            all_units.append(units)
            if g.kind == "attn" and attention_unit == "head":
                heads = torch.tensor([kl_without(gate, (torch.tensor(h),), g.block) for h in range(g.shape[0])],
                                     dtype=torch.float64)
                units[:] = heads[:, None] / g.shape[1]
                all_heads.append(heads)
                continue
            all_heads.append(None)
            # Channel chunks ordered by magnitude; for attention, the same magnitude ranks in every head.
            order = mag.units.argsort(dim=-1)  # (heads, head_dim) or (hidden,)
            for ranks in torch.arange(g.shape[-1]).chunk(min(chunks, g.shape[-1])):
                if g.kind == "attn":
                    rows = torch.arange(g.shape[0])[:, None].expand(-1, len(ranks))
                    index: tuple[torch.Tensor, ...] | torch.Tensor = (rows, order[:, ranks])
                else:
                    index = order[ranks]
                # A stem channel changes every block's input: run the whole model for it.
                start = None if g.kind == "stem" else g.block
                units[index] = kl_without(gate, index, start) / units[index].numel()
    finally:
        remove_gates(model, groups, fold=False)
        model.to(home).train(was_training)
    # Sums over images: add the processes' parts, then clip (KL >= 0; a tiny negative is rounding).
    dist.all_reduce_([*all_units, *(h for h in all_heads if h is not None)], "sum")
    out: list[GroupScores] = []
    for g, units, heads in zip(groups, all_units, all_heads, strict=True):
        units.clamp_(min=0.0)
        out.append(GroupScores(units, heads.clamp_(min=0.0)) if heads is not None else _with_heads(g, units))
    return out


def importance_scores(criterion: Criterion, model: nn.Module, groups: list[CoupledGroup],
                      batches: list[Batch], *, chunks: int = 16,
                      attention_unit: Literal["head", "dim"] = "head") -> list[GroupScores]:
    """Dispatch by name (``gate`` needs the gates installed on ``model``)."""
    if criterion == "taylor":
        return taylor_importance(model, groups, batches)
    if criterion == "magnitude":
        return magnitude_importance(model, groups)
    if criterion == "kl":
        return kl_importance(model, groups, batches, chunks=chunks, attention_unit=attention_unit)
    if criterion == "gate":
        return gate_importance(model, groups)
    raise ValueError(f"unknown importance criterion {criterion!r}")
