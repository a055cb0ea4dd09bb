"""Quantization family."""

from __future__ import annotations

from . import diffq_method, dynamic, fqvit, lsq, static  # noqa: F401
