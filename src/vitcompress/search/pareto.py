"""Pareto fronts over accuracy (higher is better), size (lower) and CPU throughput (higher)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in one (all maximised)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_mask(points: Sequence[Sequence[float]]) -> list[bool]:
    """True for each point that no other point dominates (objectives maximised)."""
    return [not any(dominates(q, p) for j, q in enumerate(points) if j != i) for i, p in enumerate(points)]


def objectives(row: dict[str, Any]) -> tuple[float, float, float]:
    """(accuracy, -size, throughput): all maximised."""
    return (float(row["top1"]), -float(row["size_bytes"]), float(row["cpu_img_s"]))


def mark_pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set ``row["pareto"]`` on finished rows: on the accuracy x size x CPU-throughput front or not."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("top1") is not None]
    for row, on_front in zip(ok, pareto_mask([objectives(r) for r in ok])):
        row["pareto"] = on_front
    return rows
