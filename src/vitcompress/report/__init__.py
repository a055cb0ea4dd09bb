"""Reports of a study: a Markdown report, an HTML one, a CSV and plots, rendered from ``results.jsonl`` alone.

Nothing here imports torch, and matplotlib and rich are only imported when a
plot or a terminal table is made, so reading results stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vitcompress.report.html import render_html
from vitcompress.report.plots import plot_accuracy_vs
from vitcompress.report.table import (
    read_results,
    reference_row,
    render_markdown,
    render_terminal_table,
    write_csv,
)

__all__ = [
    "plot_accuracy_vs",
    "render_html",
    "read_results",
    "reference_row",
    "render_markdown",
    "render_terminal_table",
    "write_csv",
    "write_report",
]

# x of plot_accuracy_vs -> (file name under plots/, caption in report.md)
_PLOTS: dict[str, tuple[str, str]] = {
    "size_mb": ("accuracy_vs_size.png", "Top-1 accuracy vs size of the saved model"),
    "cpu_img_s": ("accuracy_vs_cpu_speed.png", "Top-1 accuracy vs CPU throughput"),
}


def write_report(
    run_dir: str | os.PathLike[str],
    rows: list[dict[str, Any]] | None = None,
    *,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``report.md``, ``report.html``, ``results.csv`` and ``plots/*.png`` into a study's run folder.

    Args:
        run_dir: the run folder; ``results.jsonl`` is read from it when ``rows`` is None.
        rows: result rows, if the caller already has them.
        meta: how the study was run, rendered in the report's first section.

    Returns:
        ``{"report": Path, "html": Path, "csv": Path, "plots": [Path, Path]}``.
    """
    run_dir = Path(run_dir)
    if rows is None:
        rows = read_results(run_dir / "results.jsonl")

    plot_paths, links = [], {}
    for x, (file_name, caption) in _PLOTS.items():
        plot_path = run_dir / "plots" / file_name
        plot_accuracy_vs(rows, x, plot_path)
        plot_paths.append(plot_path)
        links[caption] = plot_path.relative_to(run_dir).as_posix()  # relative, so the folder can move

    csv_path = run_dir / "results.csv"
    write_csv(rows, csv_path)

    recipe = (meta or {}).get("recipe")
    title = f"vitcompress study: {recipe}" if recipe else "vitcompress study"
    report_path = run_dir / "report.md"
    report_path.write_text(render_markdown(rows, title=title, meta=meta, plots=links), encoding="utf-8")
    html_path = run_dir / "report.html"
    html_path.write_text(render_html(rows, title=title, meta=meta), encoding="utf-8")
    return {"report": report_path, "html": html_path, "csv": csv_path, "plots": plot_paths}
