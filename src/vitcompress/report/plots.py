"""Accuracy-versus-cost scatter plots of a study: one numbered point per finished experiment, named in a key.

Uses matplotlib's object API with the Agg canvas directly rather than pyplot, so
making a plot never changes the process-wide backend or leaves figures open.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcompress.report.table import (
    BASELINE_COLOR,
    common_value,
    family_color,
    finite_number,
    is_ok,
    method_family,
    pareto_front_2d,
    reference_row,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox

# A wider range than this is unreadable on a linear axis: the small points pile up at zero.
_LOG_RANGE = 10.0


def _size_mb(row: Mapping[str, Any]) -> float | None:
    size = finite_number(row.get("size_bytes"))
    return None if size is None else size / 1e6


def _cpu_img_s(row: Mapping[str, Any]) -> float | None:
    return finite_number(row.get("cpu_img_s"))


# x -> (value of a row, axis label, title phrase)
_AXES: dict[str, tuple[Callable[[Mapping[str, Any]], float | None], str, str]] = {
    "size_mb": (_size_mb, "Size of the saved model file (MB)", "model size"),
    "cpu_img_s": (_cpu_img_s, "CPU throughput (images/s)", "CPU speed"),
}


def _overlap(a: Bbox, b: Bbox) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0.0) * max(height, 0.0)


# Where a point's number may go, nearest first: offsets in points around it (rings of 8 directions).
_RINGS = [(r * math.cos(a), r * math.sin(a)) for r in (6, 11, 17, 24, 32, 42, 54, 68, 84, 102, 122, 144)
          for a in (math.radians(d) for d in (30, 150, 210, 330, 90, 270, 0, 180, 60, 120, 240, 300))]


def _place_numbers(fig: Figure, ax: Axes, points: Sequence[tuple[float, float, Any]], numbers: Sequence[str],
                   reference: Any) -> None:
    """Put each point's number where it covers no marker, no other number and stays in the axes.

    Greedy, in display pixels, nearest free spot first; a number that lands away from its point gets a
    thin leader line. Numbers, not names: a name list (the key) beside the plot stays readable at 47
    rows, where names next to close points could not (the issue that asked for this saw them overlap).
    """
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig.canvas.draw()  # settles the layout and limits, so pixel positions are final
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    pixels = [tuple(ax.transData.transform((xv, yv))) for xv, yv, _ in points]
    markers = []
    for (px, py), (_, _, row) in zip(pixels, points, strict=True):
        radius = 8.0 if row is reference else 4.5
        markers.append(Bbox.from_extents(px - radius, py - radius, px + radius, py + radius))
    taken = list(markers)  # what a number must not cover: the markers, then the legend and the numbers placed
    legend = ax.get_legend()
    if legend is not None:
        taken.append(legend.get_window_extent(renderer))
    order = sorted(range(len(points)), key=lambda i: points[i][2] is not reference)
    for index in order:
        xv, yv, _ = points[index]
        best, best_cost = None, math.inf
        for dx, dy in _RINGS:
            label = ax.annotate(numbers[index], (xv, yv), xytext=(dx, dy), textcoords="offset points",
                                ha="center", va="center", fontsize=7, zorder=6,
                                arrowprops={"arrowstyle": "-", "color": "0.55", "linewidth": 0.5,
                                            "shrinkA": 0, "shrinkB": 3} if math.hypot(dx, dy) > 12 else None)
            label.set_in_layout(False)
            # The number's own box: an Annotation's extent would include its leader line, which may cross.
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer).padded(1.5)
            outside = box.width * box.height - _overlap(box, inside)
            cost = sum(_overlap(box, other) for other in taken) + 4 * outside
            if cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (label, box), cost
            else:
                label.remove()
            if cost == 0:
                break
        assert best is not None
        taken.append(best[1])


def _figure_accuracy_vs(rows: Sequence[Mapping[str, Any]], x: str) -> Figure:
    """Build the figure of :func:`plot_accuracy_vs` without saving it."""
    if x not in _AXES:
        raise ValueError(f"x must be one of {sorted(_AXES)}, got {x!r}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    value_of, x_label, phrase = _AXES[x]
    reference = reference_row(rows)
    numbered = [row for row in rows if is_ok(row)]  # the key's numbers follow the table's order
    points = []
    for number, row in enumerate(numbered, start=1):
        xv, yv = value_of(row), finite_number(row.get("top1"))
        if xv is not None and yv is not None:
            points.append((xv, yv, row, str(number)))

    per_column = 24
    columns = max(1, math.ceil(len(points) / per_column))
    # A key column as wide as its longest line (7.5 pt monospace: ~0.063 inch a character, and some room).
    key_width = max(2.5, 0.075 * (5 + max((len(str(p[2].get("name", ""))) for p in points), default=10)))
    fig = Figure(figsize=(7.5 + key_width * columns, max(4.8, 0.19 * min(len(points), per_column) + 1.2)),
                 dpi=130, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 2, width_ratios=[7.5, key_width * columns])
    ax, key = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    key.axis("off")

    if x == "cpu_img_s":
        batch, threads = common_value(rows, "batch_size"), common_value(rows, "threads")
        if batch is not None and threads is not None:
            x_label = f"CPU throughput (images/s, batch {batch}, {threads} threads)"
    dataset = common_value(rows, "dataset")
    ax.set_title(f"Top-1 accuracy vs {phrase}" + (f" ({dataset})" if dataset else ""))
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.grid(True, which="major", alpha=0.3)

    if not points:
        ax.set_xlabel(x_label)
        ax.text(0.5, 0.5, "no finished experiment has this measurement", transform=ax.transAxes, ha="center")
        return fig

    xs = [point[0] for point in points]
    if min(xs) > 0 and max(xs) / min(xs) > _LOG_RANGE:
        ax.set_xscale("log")
        # Plain numbers at 1-2-5 steps: "10^-1" alone says little about a 0.23 MB model.
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        x_label += ", log scale"
    ys = [point[1] for point in points]
    if min(ys) > 0 and max(ys) / min(ys) > _LOG_RANGE:
        ax.set_yscale("log")
    ax.set_xlabel(x_label)

    # The front of this plot's two axes: nothing both more accurate and smaller (faster) than these.
    front = pareto_front_2d([(p[0], p[1]) for p in points], smaller_x_is_better=x == "size_mb")
    fx = sorted((points[i][0], points[i][1]) for i in front)
    if len(fx) > 1:
        ax.plot([p[0] for p in fx], [p[1] for p in fx], drawstyle="steps-post" if x == "size_mb" else "steps-pre",
                color="0.35", linestyle="--", linewidth=0.9, zorder=2)
    for i, (xv, yv, row, _) in enumerate(points):
        if row is reference:
            ax.scatter([xv], [yv], s=170, marker="*", color=BASELINE_COLOR,
                       edgecolors="black" if i in front else "none", linewidths=0.8, zorder=4)
            ax.axhline(yv, color=BASELINE_COLOR, linestyle=":", linewidth=1, alpha=0.6, zorder=1)
        else:
            ax.scatter([xv], [yv], s=34, color=family_color(method_family(row)),
                       edgecolors="black" if i in front else "none", linewidths=1.0, zorder=3)
    families = []
    for _, _, row, _ in points:
        if row is not reference and method_family(row).split(" + ")[-1] not in families:
            families.append(method_family(row).split(" + ")[-1])
    handles = [Line2D([], [], marker="*", linestyle="", markersize=11, color=BASELINE_COLOR, label="baseline")]
    handles += [Line2D([], [], marker="o", linestyle="", color=family_color(f), label=f)
                for f in families]
    handles.append(Line2D([], [], color="0.35", linestyle="--", marker="o", markerfacecolor="white",
                          markeredgecolor="black", label="Pareto front (these two axes)"))
    ax.margins(x=0.08, y=0.12)
    ax.legend(handles=handles, loc="best", fontsize=7, framealpha=0.85)
    # The key: number, then the name in full, in the point's colour. Before the numbers are placed: the
    # layout must be final when they are.
    for k, (_, _, row, number) in enumerate(points):
        col, line = divmod(k, per_column)
        key.text(col / columns, 1 - (line + 0.5) / per_column, f"{number:>2}  {row.get('name', '?')}",
                 transform=key.transAxes, fontsize=7.5, va="center", ha="left",
                 color=BASELINE_COLOR if row is reference else family_color(method_family(row)), fontfamily="monospace")
    _place_numbers(fig, ax, [(p[0], p[1], p[2]) for p in points], [p[3] for p in points], reference)

    return fig


def plot_accuracy_vs(rows: list[dict[str, Any]], x: str, path: str | os.PathLike[str]) -> None:
    """Save a scatter of top-1 accuracy against ``x`` as a PNG at ``path``.

    Args:
        rows: result rows; failed rows and rows missing either value are left out.
        x: ``"size_mb"`` (bytes of the saved file / 1e6) or ``"cpu_img_s"``.
        path: where to write the image; parent folders are created.

    Raises:
        ValueError: ``x`` is not one of the two supported measurements.
    """
    fig = _figure_accuracy_vs(rows, x)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
