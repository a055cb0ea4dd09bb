"""The study's Figure 3: how many parameters sit at each importance score, pruned vs kept.

Reads the ``importance`` record a pruning step writes into its meta (see
``structured.importance_meta``): per group the unit kind, the parameters one unit
owns and every unit's score. The x axis is what the ranking in ``select.py``
compares (the score per parameter, or a learned gate's value; log scale), the y axis the number of parameters
in each bin, stacked by attention / MLP and kept / pruned, so the cut shows as
the boundary between the pruned and the kept colours.

Uses matplotlib's object API on an Agg canvas (no pyplot), so it never changes the
process-wide backend or leaves figures open.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .cut import parse_ranges

_SERIES = (  # (kind, pruned?) -> label, colour
    (("mlp", False), "MLP channels, kept", "#4c72b0"),
    (("mlp", True), "MLP channels, pruned", "#a6bddb"),
    (("attn", False), "attention, kept", "#dd8452"),
    (("attn", True), "attention, pruned", "#fdd0a2"),
    (("stem", False), "stem channels, kept", "#55a868"),
    (("stem", True), "stem channels, pruned", "#b5dfb0"),
)


def _importance(meta_or_scores: Mapping[str, Any]) -> Mapping[str, Any]:
    if "groups" in meta_or_scores:
        return meta_or_scores
    if "importance" in meta_or_scores:
        return meta_or_scores["importance"]
    raise ValueError("expected a pruning step's meta or its 'importance' record (with 'groups')")


def importance_points(meta_or_scores: Mapping[str, Any]) -> list[tuple[float, int, str, bool]]:
    """(ranking key, parameters, kind, pruned) for every unit: the score per parameter, or the gate value."""
    record = _importance(meta_or_scores)
    per_parameter = record.get("per", "parameter") == "parameter"
    points = []
    for g in record["groups"]:
        pruned = set(parse_ranges(g.get("pruned", "")))
        cost = int(g["params_per_unit"])
        for i, score in enumerate(g["scores"]):
            points.append((float(score) / cost if per_parameter else float(score), cost, g["kind"], i in pruned))
    return points


def importance_title(meta_or_scores: Mapping[str, Any]) -> str:
    """The figure's title: how many parameters the step removed, of how many."""
    if "params_before" in meta_or_scores and "params_after" in meta_or_scores:
        # The step's own count is exact; the units' costs count the weights two adjacent stem channels
        # share once for each (the histogram weighs each unit by all the parameters it owns).
        before, after = int(meta_or_scores["params_before"]), int(meta_or_scores["params_after"])
        return f"Parameters vs importance: {before - after:,} of {before:,} parameters removed"
    points = importance_points(meta_or_scores)
    pruned = sum(p[1] for p in points if p[3])
    total = sum(p[1] for p in points)
    return f"Parameters vs importance: {pruned:,} of {total:,} prunable parameters pruned"


def plot_importance(meta_or_scores: Mapping[str, Any], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write the parameters-vs-importance histogram to ``path`` (PNG, or any format matplotlib knows)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    record = _importance(meta_or_scores)
    points = importance_points(record)
    if not points:
        raise ValueError("the importance record holds no scores")
    positive = [p[0] for p in points if p[0] > 0]
    floor = min(positive) / 10 if positive else 1e-12  # zero scores (dead units) go to a bin of their own
    xs = [max(p[0], floor) for p in points]
    lo, hi = math.log10(min(xs)), math.log10(max(xs))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    bins = [10 ** (lo + (hi - lo) * i / 40) for i in range(41)]

    fig = Figure(figsize=(6.4, 4.0), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    data, weights, labels, colours = [], [], [], []
    for key, label, colour in _SERIES:
        sel = [(x, p[1]) for x, p in zip(xs, points) if (p[2], p[3]) == key]
        if sel:
            data.append([s[0] for s in sel])
            weights.append([s[1] for s in sel])
            labels.append(label)
            colours.append(colour)
    ax.hist(data, bins=bins, weights=weights, stacked=True, label=labels, color=colours)
    ax.set_xscale("log")
    per = "per parameter" if record.get("per", "parameter") == "parameter" else "per unit"
    ax.set_xlabel(f"importance score {per} ({record.get('criterion', '?')})")
    ax.set_ylabel("number of parameters")
    ax.set_title(title or importance_title(meta_or_scores), fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
