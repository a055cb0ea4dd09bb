"""Which units to remove so that a fraction ``ratio`` of the model's parameters goes.

The study's pruning rate r is the fraction of parameters removed (its Size column:
327 -> 301 MB at r = 0.1), so the target is ``ratio * all parameters`` and every
unit costs the parameters it owns (``groups.py``).

Units are ranked by importance per parameter (score / unit cost): removing the
unit that buys the most parameters for the least importance first is the greedy
answer to "remove N parameters, lose the least importance" when the score
estimates a loss change (Taylor, KL, magnitude). Learned gates are no such
estimate: VTP hardens them at one threshold on the gate value, so for them
(``per="unit"``) a head or slot ranks by its mean gate and a channel by its gate.
Ties (e.g. the units of one KL chunk) are broken by weight magnitude per parameter.
Adjacent conv-stem channels share weights (``CoupledGroup.shared``): the budget counts
what a channel removes given the channels already gone, so the parameters removed are
exact; its ranking key divides by the channel's full cost.

* ``global`` ranking: one ranking across all layers (Torch-Pruning's global pruning).
* ``layer`` ranking: every layer first loses the same fraction of its prunable
  parameters, then any remainder is taken globally.

A floor, ``min_keep``, keeps at least that fraction of every layer's heads (or
head dims) and channels, and never fewer than one, so no layer is emptied.

Attention is pruned either by whole heads or by head dims. timm's Attention has
one ``head_dim`` for all heads (its fused qkv is reshaped to (3, heads,
head_dim)), so with head dims the same number of dims goes from every head of a
block: the removable unit is a *slot*, the j-th least important dim of every
head, ranked by their summed score.

``max_heads`` caps the heads a block keeps: its least important heads (by whole-head score) go
first, their parameters counted in the budget (and in the layer's share), and the rest of the
budget is taken as above among the heads kept. It exists for speed: on a CPU, attention's cost
grows with the number of heads far more than with their width (the softmax and the per-head
products; OpenVINO on vitc_small's 50 tokens, benchmarks/attention_heads.py), so four heads of
6 dims run about as slowly as four of 24, while two of 12 hold the same parameters.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Literal

import torch

from ...errors import VitcompressError
from .groups import CoupledGroup
from .importance import GroupScores

AttentionUnit = Literal["head", "dim"]


@dataclass(frozen=True)
class BlockPlan:
    """What a block keeps: head indices, each kept head's dims (equal counts), MLP channels."""

    heads: tuple[int, ...]
    dims: tuple[tuple[int, ...], ...]
    mlp: tuple[int, ...]


@dataclass(frozen=True)
class PrunePlan:
    """What a pruned ViT keeps: a :class:`BlockPlan` per block and, if its conv stem was pruned, the kept
    output channels of each prunable stem conv (``groups.stem_convs``), in stem order."""

    blocks: tuple[BlockPlan, ...]
    stem: tuple[tuple[int, ...], ...] = ()


@dataclass
class _Queue:
    """One layer's removable units, least important first, removed strictly in this order."""

    group: int
    unit: Literal["head", "slot", "channel"]
    keys: list[tuple[float, float]]  # (score per parameter, magnitude per parameter) of each unit in order
    cost: int
    items: list[tuple[int, ...]]  # what each entry removes: a head, a slot (its dim in every head) or a channel
    taken: int = 0
    shared: tuple[tuple[int, int], ...] = ()  # (queue index, parameters shared per unit pair), see CoupledGroup
    heads: tuple[int, ...] | None = None  # slots: the heads they run over (max_heads); None: every head
    forced: int = 0  # parameters removed before ranking (the heads max_heads drops)

    def next_cost(self, queues: list[_Queue]) -> int:
        """Parameters the next unit removes: its own, less those already gone with the units of a neighbour."""
        return self.cost - sum(queues[qi].taken * per_pair for qi, per_pair in self.shared)


def _order(score: torch.Tensor, tiebreak: torch.Tensor) -> list[int]:
    # Stable lexicographic sort: by score, then by magnitude.
    first = torch.argsort(tiebreak, stable=True)
    return first[torch.argsort(score[first], stable=True)].tolist()


def _queues(groups: list[CoupledGroup], scores: list[GroupScores], mags: list[GroupScores],
            attention: AttentionUnit | None, min_keep: float, per: Literal["parameter", "unit"],
            max_heads: int | None = None) -> list[_Queue]:
    queues = []
    for gi, (g, s, m) in enumerate(zip(groups, scores, mags, strict=True)):
        if g.kind == "attn" and attention is None:
            continue
        forced, kept_heads, pre_taken = 0, None, 0
        if g.kind == "attn" and attention == "head":
            assert s.heads is not None and m.heads is not None
            n, cost = g.shape[0], g.head_cost
            div = cost if per == "parameter" else g.shape[1]
            order = _order(s.heads, m.heads)
            keys = [(s.heads[i].item() / div, m.heads[i].item() / cost) for i in order]
            items = [(i,) for i in order]
            if max_heads is not None:
                pre_taken = max(0, n - max_heads)  # the least important heads, taken before the ranking
        elif g.kind == "attn":
            heads = list(range(g.shape[0]))
            if max_heads is not None and max_heads < g.shape[0]:
                hs = s.heads if s.heads is not None else s.units.sum(1)
                hm = m.heads if m.heads is not None else m.units.sum(1)
                heads = sorted(_order(hs, hm)[g.shape[0] - max_heads:])
                kept_heads = tuple(heads)
                forced = (g.shape[0] - max_heads) * g.head_cost
            n, cost = g.shape[1], g.unit_cost * len(heads)
            div = cost if per == "parameter" else len(heads)
            per_head = [_order(s.units[h], m.units[h]) for h in heads]
            items = [tuple(per_head[k][j] for k in range(len(heads))) for j in range(n)]
            # A slot's score is a sum of per-head j-th smallest scores, so it rises with j: the queue
            # order is the ranking order.
            keys = [(sum(s.units[h, d].item() for h, d in zip(heads, slot)) / div,
                     sum(m.units[h, d].item() for h, d in zip(heads, slot)) / cost) for slot in items]
        else:
            n, cost = g.shape[0], g.unit_cost
            div = cost if per == "parameter" else 1
            order = _order(s.units, m.units)
            keys = [(s.units[i].item() / div, m.units[i].item() / cost) for i in order]
            items = [(i,) for i in order]
        unit = "channel" if g.kind != "attn" else ("head" if attention == "head" else "slot")
        keep = max(1, math.ceil(min_keep * n))
        if pre_taken:
            keep = min(keep, n - pre_taken)  # max_heads wins over the floor (it keeps at least one head)
            forced = pre_taken * cost
        queues.append(_Queue(gi, unit, keys[: n - keep], cost, items[: n - keep], taken=pre_taken,
                             heads=kept_heads, forced=forced))
    at = {q.group: qi for qi, q in enumerate(queues)}
    for q in queues:
        q.shared = tuple((at[gi], per_pair) for gi, per_pair in groups[q.group].shared if gi in at)
    return queues


def _take(queues: list[_Queue], budget: int, limits: list[int] | None = None) -> int:
    """Remove units in global key order while they fit in ``budget`` parameters; return parameters removed."""
    heap = [(q.keys[q.taken], qi) for qi, q in enumerate(queues) if q.taken < len(q.keys)]
    heapq.heapify(heap)
    removed = 0
    while heap:
        _, qi = heapq.heappop(heap)
        q = queues[qi]
        cost = q.next_cost(queues)
        done = q.taken * q.cost + (q.forced if q.unit == "slot" else 0)
        over_layer = limits is not None and done + q.cost > limits[qi]
        if removed + cost > budget or over_layer:
            continue  # this layer's next unit does not fit; the layer stays where it is
        q.taken += 1
        removed += cost
        if q.taken < len(q.keys):
            heapq.heappush(heap, (q.keys[q.taken], qi))
    return removed


def plan_pruning(groups: list[CoupledGroup], scores: list[GroupScores], mags: list[GroupScores], *,
                 ratio: float, total_params: int, attention: AttentionUnit | None, min_keep: float,
                 ranking: Literal["global", "layer"] = "global",
                 per: Literal["parameter", "unit"] = "parameter",
                 max_heads: int | None = None) -> tuple[PrunePlan, int]:
    """The plan removing at most ``ratio * total_params`` parameters, and the parameters removed."""
    if max_heads is not None and max_heads < 1:
        raise VitcompressError(f"max_heads must be at least 1, got {max_heads}")
    queues = _queues(groups, scores, mags, attention, min_keep, per, max_heads)
    budget = int(round(ratio * total_params))
    forced = sum(q.forced for q in queues)
    if forced > budget:
        raise VitcompressError(f"max_heads={max_heads} alone removes {forced} parameters, more than ratio {ratio} "
                               f"asks ({budget}); raise ratio or max_heads")
    removable = forced + sum((len(q.keys) - (q.taken if q.unit == "head" else 0)) * q.cost for q in queues)
    removable -= sum(len(q.keys) * len(queues[o].keys) * per_pair for q in queues for o, per_pair in q.shared) // 2
    if removable < budget * 0.98:
        raise VitcompressError(
            f"ratio {ratio} asks for {budget} parameters but only {removable} of {total_params} are prunable with "
            f"min_keep={min_keep}{' and heads: false' if attention is None else ''}; lower ratio or min_keep"
        )
    removed = forced
    if ranking == "layer":
        share = budget / max(1, sum(groups[q.group].units * groups[q.group].unit_cost for q in queues))
        limits = [int(share * groups[q.group].units * groups[q.group].unit_cost) for q in queues]
        removed += _take(queues, budget - removed, limits)
    removed += _take(queues, budget - removed)
    return _plans(groups, queues), removed


def _plans(groups: list[CoupledGroup], queues: list[_Queue]) -> PrunePlan:
    by_group = {q.group: q for q in queues}
    stem = []
    for gi, g in enumerate(groups):
        if g.kind == "stem":
            dropped = {i for (i,) in (by_group[gi].items[: by_group[gi].taken] if gi in by_group else [])}
            stem.append(tuple(i for i in range(g.shape[0]) if i not in dropped))
    blocks = sorted({g.block for g in groups if g.kind != "stem"})
    plans = []
    for b in blocks:
        heads: tuple[int, ...] = ()
        dims: tuple[tuple[int, ...], ...] = ()
        mlp: tuple[int, ...] = ()
        for gi, g in enumerate(groups):
            if g.block != b or g.kind == "stem":
                continue
            gone = by_group[gi].items[: by_group[gi].taken] if gi in by_group else []
            if g.kind == "mlp":
                dropped = {i for (i,) in gone}
                mlp = tuple(i for i in range(g.shape[0]) if i not in dropped)
            elif gi in by_group and by_group[gi].unit == "head":
                dropped = {i for (i,) in gone}
                heads = tuple(h for h in range(g.shape[0]) if h not in dropped)
                dims = tuple(tuple(range(g.shape[1])) for _ in heads)
            else:
                q = by_group.get(gi)
                heads = q.heads if q is not None and q.heads is not None else tuple(range(g.shape[0]))
                cut = [set() for _ in heads]
                for slot in gone:
                    for k, d in enumerate(slot):
                        cut[k].add(d)
                dims = tuple(tuple(d for d in range(g.shape[1]) if d not in cut[k]) for k in range(len(heads)))
        plans.append(BlockPlan(heads, dims, mlp))
    return PrunePlan(tuple(plans), tuple(stem))

