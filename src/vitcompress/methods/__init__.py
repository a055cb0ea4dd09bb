"""Compression methods, one folder per family, each registered by name."""

from __future__ import annotations

from .chain import Step, parse_steps
from .registry import (
    METHODS,
    MethodSpec,
    StepOutput,
    get_method,
    list_methods,
    load_builtin_methods,
    parse_config,
    register_method,
)

__all__ = ["METHODS", "MethodSpec", "Step", "StepOutput", "get_method", "list_methods", "load_builtin_methods",
           "parse_config", "parse_steps", "register_method"]
