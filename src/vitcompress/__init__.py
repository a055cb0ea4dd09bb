"""vitcompress: compress Vision Transformers and measure what it buys, honestly."""

from __future__ import annotations

__version__ = "0.1.0"
