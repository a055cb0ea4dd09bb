"""The method registry: a name maps to a frozen config class and a handler.

A handler takes a model and returns a model (``apply``). Methods that change
the model's structure (quantized modules, pruned shapes, swapped attention)
also give a ``restore`` that rebuilds that structure on a freshly created model
from the step's JSON ``meta``, without data, so a saved artifact (plain tensors
in safetensors) can be loaded without pickling modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from ..config import from_dict
from ..errors import VitcompressError

if TYPE_CHECKING:
    from ..study.context import StepContext


@dataclass
class StepOutput:
    """What a method hands back: the new model and JSON-able facts needed to restore it."""

    model: nn.Module
    meta: dict[str, Any] = field(default_factory=dict)


ApplyFn = Callable[[nn.Module, Any, "StepContext"], StepOutput]
RestoreFn = Callable[[nn.Module, Any, dict[str, Any]], nn.Module]
# (model, the step's config, one input's (C, H, W) or None) -> why the method cannot run on it, or None.
# The model may live on the meta device (``vitcompress validate`` builds none for real).
RequiresFn = Callable[[nn.Module, Any, "tuple[int, ...] | None"], "str | None"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str
    summary: str
    config_cls: type
    apply: ApplyFn
    restore: RestoreFn | None
    # True when the output holds integer weights: no training or structural step may follow it.
    produces_int_weights: bool = False
    supports: str = "any model"  # the architectures it runs on, in words (`vitcompress list`)
    requires: RequiresFn | None = None
    # An optional package the method needs (import name, and the extra that installs it with why it is
    # optional); a study records a row whose step lacks it as skipped, with how to install it.
    package: tuple[str, str] | None = None

    def missing_package(self) -> str | None:
        """How to install the optional package this method needs, when it is not installed; else None."""
        import importlib.util

        if self.package is None or importlib.util.find_spec(self.package[0]) is not None:
            return None
        return self.package[1]

    def problem(self, model: nn.Module, config: Any, example_shape: tuple[int, ...] | None = None) -> str | None:
        """Why this method cannot run on ``model`` with ``config``, or None."""
        return None if self.requires is None else self.requires(model, config, example_shape)


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    config_cls: type,
    *,
    family: str,
    summary: str,
    restore: RestoreFn | None = None,
    produces_int_weights: bool = False,
    supports: str = "any model",
    requires: RequiresFn | None = None,
    package: tuple[str, str] | None = None,
) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator: register ``apply`` under ``name`` (e.g. ``ptq.dynamic``); ``requires`` says, for a model
    and a config, why the method cannot run on it (``supports`` says the same in words)."""

    def deco(apply: ApplyFn) -> ApplyFn:
        if name in METHODS:
            raise RuntimeError(f"method {name} registered twice")
        METHODS[name] = MethodSpec(name, family, summary, config_cls, apply, restore, produces_int_weights,
                                   supports, requires, package)
        return apply

    return deco


def get_method(name: str) -> MethodSpec:
    load_builtin_methods()
    if name not in METHODS:
        raise VitcompressError(f"unknown method '{name}'; known methods: {', '.join(sorted(METHODS))} (see `vitcompress list`)")
    return METHODS[name]


def parse_config(name: str, params: Any, where: str) -> Any:
    """The typed config of method ``name`` from recipe data."""
    return from_dict(get_method(name).config_cls, params, f"{where}.{name}")


def list_methods() -> list[MethodSpec]:
    load_builtin_methods()
    return sorted(METHODS.values(), key=lambda m: (m.family, m.name))


def load_builtin_methods() -> None:
    """Register the built-in method families (and the model presets they bring). Importing the families
    registers them; done lazily so the registry module stays import-light."""
    from . import distill, lowrank, prune, quant  # noqa: F401
