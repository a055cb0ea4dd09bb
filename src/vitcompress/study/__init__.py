"""Studies: a recipe in, a run folder with results, artifacts and a report out."""

from __future__ import annotations

from .recipe import Experiment, Recipe, Step, bundled_recipes, load_recipe, parse_recipe
from .runner import Study, StudyResult, run_study

__all__ = ["Experiment", "Recipe", "Step", "Study", "StudyResult", "bundled_recipes", "load_recipe",
           "parse_recipe", "run_study"]
