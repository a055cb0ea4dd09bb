"""Knowledge distillation family: ``distill`` (soft, hard, DeiT token) and its control ``train``."""

from __future__ import annotations

from . import control, method, students  # noqa: F401  (registers the methods and the student models)
