"""Quantization family."""

from __future__ import annotations

from . import dynamic  # noqa: F401
