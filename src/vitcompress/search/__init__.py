"""Search across compression techniques under budgets (size, CPU throughput, accuracy drop)."""

from __future__ import annotations

from .pareto import mark_pareto, pareto_mask
from .space import Budgets, SearchConfig, parse_search, suggest_steps

__all__ = ["Budgets", "SearchConfig", "mark_pareto", "pareto_mask", "parse_search", "suggest_steps"]
