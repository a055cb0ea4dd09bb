"""Pruning family: structured pruning that removes parameters for real, and token merging.

Three concerns, three modules: which dimensions are coupled (``groups``), how
important each unit is (``importance``), how a layer is cut (``cut``); ``select``
turns scores into a plan for a target ratio. The registered methods:
``prune.structured`` (``structured``), ``prune.gates`` (``gates``) and
``tokens.merge`` (``tome``). ``plot.plot_importance`` draws the study's Figure 3.
"""

from __future__ import annotations

from . import gates, structured, tome  # noqa: F401  (register the methods)
from .plot import plot_importance

__all__ = ["plot_importance"]
