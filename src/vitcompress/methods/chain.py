"""A chain of compression steps: what a recipe's ``steps:``, a search trial and a CLI ``--step`` parse into.

One parser for all of them, so a chain means the same wherever it is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import key_dict, to_dict
from ..errors import VitcompressError
from .registry import get_method, parse_config


@dataclass(frozen=True)
class Step:
    method: str
    config: Any

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "config": to_dict(self.config)}

    def key_dict(self) -> dict[str, Any]:
        """What identifies the step's result (``config.key_dict``): cache keys and finished rows compare this."""
        return {"method": self.method, "config": key_dict(self.config)}



def parse_steps(raw: Any, where: str) -> tuple[Step, ...]:
    """Steps from their written form: a list of ``{method: {settings}}`` (or bare method names); ``where``
    names the place in one-line errors. Refuses a step after one that produced integer weights."""
    if not isinstance(raw, list) or not raw:
        raise VitcompressError(f"{where}: steps must be a non-empty list like [{{ptq.dynamic: {{}}}}]")
    steps = []
    for i, item in enumerate(raw):
        w = f"{where}[{i}]"
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise VitcompressError(f"{w}: a step is one mapping 'method: {{settings}}', got {item!r}")
        (name, params), = item.items()
        if not isinstance(name, str):
            raise VitcompressError(f"{w}: method name must be a string, got {name!r}")
        steps.append(Step(name, parse_config(name, params, w)))
    for i in range(1, len(steps)):
        prev = get_method(steps[i - 1].method)
        if prev.produces_int_weights:
            raise VitcompressError(
                f"{where}[{i}]: '{steps[i].method}' cannot follow '{prev.name}', which produced integer weights; "
                "put quantization last"
            )
    return tuple(steps)
