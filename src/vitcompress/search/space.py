"""The search space: chain templates whose settings may be distributions.

In a recipe's ``search`` section, a chain is written like an experiment's
``steps``; any setting may instead be a distribution, one of::

    {int: [low, high]}      {float: [low, high]}      {log_float: [low, high]}      {choice: [a, b, ...]}

Each template is validated at parse time with every distribution at its low end
(or first choice) and at its high end (or last choice), so a search cannot
propose a chain that the recipe rules reject.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import check, from_dict
from ..errors import VitcompressError

_DIST_KEYS = ("int", "float", "log_float", "choice")


@dataclass(frozen=True)
class Budgets:
    max_size_mb: float | None = None  # bytes of the saved file / 1e6
    min_cpu_img_s: float | None = None  # measured at the study's batch size and threads
    max_acc_drop: float | None = None  # points below the baseline, on the validation split
    # The same budgets relative to the baseline measured in the same search run: its file's bytes, and its
    # throughput on its fastest runtime among the recipe's measure.runtimes (for a float model, its fastest
    # float runtime); a candidate's throughput is likewise on its own fastest runtime.
    max_size_ratio: float | None = None  # e.g. 0.15: at most 15% of the baseline's file
    min_speedup: float | None = None  # e.g. 2.0: at least twice the baseline's images/s

    def __post_init__(self) -> None:
        check(self.max_size_mb is None or self.max_size_mb > 0, "budgets.max_size_mb must be > 0")
        check(self.min_cpu_img_s is None or self.min_cpu_img_s > 0, "budgets.min_cpu_img_s must be > 0")
        check(self.max_acc_drop is None or self.max_acc_drop >= 0, "budgets.max_acc_drop must be >= 0")
        check(self.max_size_ratio is None or self.max_size_ratio > 0, "budgets.max_size_ratio must be > 0")
        check(self.min_speedup is None or self.min_speedup > 0, "budgets.min_speedup must be > 0")

    def limits(self, base: dict[str, Any]) -> tuple[float | None, float | None]:
        """The tighter of the absolute and the relative limits: (max size in bytes, min images/s)."""
        sizes = [v for v in (self.max_size_mb and self.max_size_mb * 1e6,
                             self.max_size_ratio and self.max_size_ratio * base["size_bytes"]) if v]
        speeds = [v for v in (self.min_cpu_img_s, self.min_speedup and self.min_speedup * base["cpu_img_s"]) if v]
        return (min(sizes) if sizes else None), (max(speeds) if speeds else None)


@dataclass(frozen=True)
class SearchConfig:
    chains: list[Any]
    trials: int = 20
    val_images: int = 5000  # carved from the training split; the test split is never seen while searching
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    budgets: Budgets = field(default_factory=Budgets)
    # After the search, train the chosen chain again from a baseline trained on the whole training split
    # (validation images included) and measure both on the test split, as a study (run folder `refit/`).
    refit: bool = False

    def __post_init__(self) -> None:
        check(self.trials >= 1, "search.trials must be >= 1")
        check(self.val_images >= 10, "search.val_images must be >= 10")
        check(isinstance(self.chains, list) and len(self.chains) >= 1, "search.chains must be a non-empty list")


def is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _DIST_KEYS


def _check_distribution(value: dict[str, Any], where: str) -> None:
    (kind, arg), = value.items()
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise VitcompressError(f"{where}: choice needs a non-empty list")
        return
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               for v in arg) and arg[0] <= arg[1]):
        raise VitcompressError(f"{where}: {kind} needs [low, high] with low <= high, got {arg!r}")
    if kind == "int" and not all(isinstance(v, int) for v in arg):
        raise VitcompressError(f"{where}: int bounds must be integers, got {arg!r}")
    if kind == "log_float" and arg[0] <= 0:
        raise VitcompressError(f"{where}: log_float needs low > 0")


def _end(value: dict[str, Any], high: bool) -> Any:
    (kind, arg), = value.items()
    return arg[-1] if high else arg[0]


def _fill(chain: list[Any], pick: Any) -> list[dict[str, Any]]:
    """A concrete step list from a template; ``pick(name, dist)`` chooses each distributed value."""
    out = []
    for j, step in enumerate(chain):
        if isinstance(step, str):
            step = {step: {}}
        if not isinstance(step, dict) or len(step) != 1:
            raise VitcompressError(f"search chain step {j}: a step is one mapping 'method: {{settings}}'")
        (method, params), = step.items()
        params = copy.deepcopy(params) or {}
        if not isinstance(params, dict):
            raise VitcompressError(f"search chain step {j} ({method}): settings must be a mapping")
        for key, value in params.items():
            if is_distribution(value):
                params[key] = pick(f"s{j}.{method}.{key}", value)
        out.append({method: params})
    return out


def parse_search(data: Any, where: str) -> SearchConfig:
    from ..methods import parse_steps

    cfg = from_dict(SearchConfig, data, where)
    for i, chain in enumerate(cfg.chains):
        w = f"{where}.chains[{i}]"
        if not isinstance(chain, list) or not chain:
            raise VitcompressError(f"{w}: a chain is a non-empty list of steps")

        def checked(name: str, dist: dict[str, Any], w: str = w) -> Any:
            _check_distribution(dist, f"{w}.{name}")
            return None

        _fill(chain, checked)
        for high in (False, True):
            parse_steps(_fill(chain, lambda n, d, high=high: _end(d, high)), w)
    return cfg


def suggest_steps(trial: Any, cfg: SearchConfig) -> list[dict[str, Any]]:
    """The concrete steps an optuna trial proposes."""
    idx = trial.suggest_categorical("chain", list(range(len(cfg.chains))))

    def pick(name: str, dist: dict[str, Any]) -> Any:
        (kind, arg), = dist.items()
        key = f"c{idx}.{name}"
        if kind == "int":
            return trial.suggest_int(key, arg[0], arg[1])
        if kind == "float":
            return trial.suggest_float(key, float(arg[0]), float(arg[1]))
        if kind == "log_float":
            return trial.suggest_float(key, float(arg[0]), float(arg[1]), log=True)
        return arg[trial.suggest_categorical(key, list(range(len(arg))))]

    return _fill(cfg.chains[idx], pick)
