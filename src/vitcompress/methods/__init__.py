"""Compression methods, one folder per family, each registered by name."""

from __future__ import annotations

from .registry import METHODS, MethodSpec, StepOutput, get_method, list_methods, parse_config, register_method

__all__ = ["METHODS", "MethodSpec", "StepOutput", "get_method", "list_methods", "parse_config", "register_method"]
