"""``results.jsonl``: one JSON object per finished experiment, appended so a crash loses nothing finished.

Each row is written with a single ``write`` on an ``O_APPEND`` descriptor and
fsynced before the study moves on. A kill in the middle of a write can leave at
most a truncated last line; it is moved to ``results.jsonl.bad`` before the next
append, and the reader skips it, so a finished row is never lost and never
appears corrupt. Any other line that is not a row (edited, damaged) is set aside
the same way when a study starts (`repair_results`): kept, never deleted, and
its experiment runs again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.jsonl"


def _set_aside(path: Path, lines: list[bytes]) -> None:
    """Append damaged lines to ``<path>.bad``: out of the results, never deleted."""
    with open(path.with_name(path.name + ".bad"), "ab") as f:
        for line in lines:
            f.write(line.rstrip(b"\n") + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _rewrite(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def repair_tail(path: Path) -> bool:
    """Move a damaged last line (cut short by a kill, or not a row) into ``<path>.bad``; True if one was."""
    from ..report.table import parse_row

    if not path.exists() or path.stat().st_size == 0:
        return False
    data = path.read_bytes()
    body = data.rstrip(b"\n")
    start = body.rfind(b"\n") + 1
    last = body[start:]
    valid = not last.strip() or parse_row(last.decode("utf-8", "replace"))[0] is not None
    if valid:
        if not data.endswith(b"\n"):
            _rewrite(path, data + b"\n")  # a whole row that lost its newline: keep it
        return False
    _set_aside(path, [last])
    _rewrite(path, data[:start])
    return True


def repair_results(path: Path) -> list[tuple[int, str]]:
    """Set aside every line of ``path`` that is not a row into ``<path>.bad``; (line number, why) of each."""
    from ..report.table import parse_row

    if not path.exists():
        return []
    kept, bad, problems = [], [], []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        row, problem = parse_row(line.decode("utf-8", "replace"))
        if row is None:
            bad.append(line)
            problems.append((number, str(problem)))
        else:
            kept.append(line + b"\n")
    if bad:
        _set_aside(path, bad)
        _rewrite(path, b"".join(kept))
    return problems


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


def add_warning(row: dict[str, Any], text: str) -> None:
    """A sentence on how to read the row (too few test images, a degenerate calibration, an old speed): kept in
    ``row["warnings"]`` and printed under the report's table."""
    warnings = row.setdefault("warnings", [])
    if text not in warnings:
        warnings.append(text)
