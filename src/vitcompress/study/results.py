"""``results.jsonl``: one JSON object per finished experiment, appended so a crash loses nothing finished.

Each row is written with a single ``write`` on an ``O_APPEND`` descriptor and
fsynced before the study moves on. A kill in the middle of a write can leave at
most a truncated last line; it is cut off before the next append, and the
reader skips it, so a finished row is never lost and never appears corrupt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.jsonl"


def repair_tail(path: Path) -> bool:
    """Cut a truncated last line (no trailing newline) from ``path``; True if something was cut."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return True


def append_row(path: Path, row: dict[str, Any]) -> None:
    line = (json.dumps(row, sort_keys=False, allow_nan=False, default=str) + "\n").encode()
    repair_tail(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def load_rows(path: Path) -> list[dict[str, Any]]:
    from ..report import read_results

    if not path.exists():
        return []
    return read_results(path)
