"""Typed configs from plain data: unknown keys and wrong types are one-line errors.

Every method config and every recipe section is a frozen dataclass; this module
turns the dicts that YAML gives into those dataclasses. We write this small
checker ourselves instead of pulling in pydantic: the rules we need (reject
unknown keys, check scalars, Literal choices and nested dataclasses, then let
``__post_init__`` check ranges) fit in a page, and the error text can name the
recipe path that is wrong (``experiments[2].steps[0].ptq.dynamic.bits``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import VitcompressError

T = TypeVar("T")
MAX_INT = 2**53  # integers a float holds exactly; a seed, a size or a count beyond it is a typo or an attack


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except VitcompressError as exc:
                errors.append(str(exc))
        raise VitcompressError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise VitcompressError(f"{where}: must be one of {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise VitcompressError(f"{where}: expected a list, got {value!r}")
        (item_tp, *rest) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise VitcompressError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise VitcompressError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:  # past what any setting needs, and past what torch and numpy take
                raise VitcompressError(f"{where}: {value} is out of range (at most {MAX_INT} in size)")
            return value
        raise VitcompressError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        # YAML reads 1e-3 as a string (YAML 1.1); accept numeric strings for floats only.
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise VitcompressError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # .inf and .nan parse as YAML floats; no setting takes them
            raise VitcompressError(f"{where}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise VitcompressError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"config type {tp!r} at {where} is not supported")  # a bug in a config class, not user input


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise VitcompressError(f"{where}: expected a mapping of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise VitcompressError(
            f"{where}: unknown key '{unknown[0]}'; allowed keys: {', '.join(sorted(fields)) or '(none)'}"
        )
    hints = get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise VitcompressError(f"{where}: missing required key '{missing[0]}'")
    try:
        return cls(**kwargs)
    except VitcompressError as exc:
        raise VitcompressError(f"{where}: {exc}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A config as plain JSON-able data (tuples become lists)."""
    return typing.cast(dict, _plain(dataclasses.asdict(obj)))


# Field metadata of an option added after results were cached with its default's behaviour: such a field
# is left out of cache keys while at its default, so adding it does not re-run finished studies.
LATE = {"late": True}


def key_dict(obj: Any) -> dict[str, Any]:
    """:func:`to_dict` less the :data:`LATE` fields at their defaults: what identifies a config's results."""
    out = to_dict(obj)
    for f in dataclasses.fields(obj):
        if f.metadata.get("late") and getattr(obj, f.name) == f.default:
            out.pop(f.name)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check(cond: bool, message: str) -> None:
    """For ``__post_init__`` range checks: raise a one-line config error unless ``cond``."""
    if not cond:
        raise VitcompressError(message)
