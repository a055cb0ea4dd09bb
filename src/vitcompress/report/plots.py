"""Accuracy-versus-cost scatter plots of a study, one labelled point per finished experiment.

Uses matplotlib's object API with the Agg canvas directly rather than pyplot, so
making a plot never changes the process-wide backend or leaves figures open.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcompress.report.table import common_value, finite_number, is_ok, reference_row

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox

# A wider range than this is unreadable on a linear axis: the small points pile up at zero.
_LOG_RANGE = 10.0
_MAX_LABEL = 28


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


def _short(name: str) -> str:
    return name if len(name) <= _MAX_LABEL else name[: _MAX_LABEL - 1] + "…"


# Label positions tried around a point, best first: (dx, dy) in points, then alignment.
_CANDIDATES: tuple[tuple[float, float, str, str], ...] = (
    (7, 3, "left", "bottom"),
    (7, -3, "left", "top"),
    (-7, 3, "right", "bottom"),
    (-7, -3, "right", "top"),
    (0, 8, "center", "bottom"),
    (0, -8, "center", "top"),
    (7, 13, "left", "bottom"),
    (7, -13, "left", "top"),
    (-7, 13, "right", "bottom"),
    (-7, -13, "right", "top"),
)


def _overlap(a: Bbox, b: Bbox) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0.0) * max(height, 0.0)


def _distance(px: float, py: float, box: Bbox) -> float:
    dx = max(box.x0 - px, 0.0, px - box.x1)
    dy = max(box.y0 - py, 0.0, py - box.y1)
    return math.hypot(dx, dy)


def _place_labels(fig: Figure, ax: Axes, points: Sequence[tuple[float, float, Any]], reference: Any) -> None:
    """Name each point, choosing for each label the candidate spot that costs least.

    Greedy, in display pixels. A spot costs what it covers of markers, the
    legend and earlier labels, what leaves the axes, and being nearer another
    point than its own (a name next to the wrong point misleads more than an
    overlap). Points of compressed models often sit close together, and fixed
    offsets made their names unreadable.
    """
    from matplotlib.transforms import Bbox

    fig.canvas.draw()  # settles the layout and limits, so pixel positions are final
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    pixels = [tuple(ax.transData.transform((xv, yv))) for xv, yv, _ in points]
    taken = []
    for (px, py), (_, _, row) in zip(pixels, points, strict=True):
        radius = 9.0 if row is reference else 5.0
        taken.append(Bbox.from_extents(px - radius, py - radius, px + radius, py + radius))
    legend = ax.get_legend()
    if legend is not None:
        taken.append(legend.get_window_extent(renderer))

    # The reference first, so its label gets the best spot; then left to right.
    order = sorted(range(len(points)), key=lambda i: points[i][2] is not reference)
    for index in order:
        xv, yv, row = points[index]
        px, py = pixels[index]
        best, best_cost = None, math.inf
        for dx, dy, ha, va in _CANDIDATES:
            far = abs(dy) > 10
            label = ax.annotate(
                _short(str(row.get("name", "?"))),
                (xv, yv),
                xytext=(dx, dy),
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize=8,
                zorder=5,
                # A thin leader ties a label that sits further out to its point.
                arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.6} if far else None,
            )
            # Out of the layout: constrained layout must not shrink the axes around labels.
            label.set_in_layout(False)
            box = label.get_window_extent(renderer).padded(2)
            outside = box.width * box.height - _overlap(box, inside)
            own = _distance(px, py, box)
            nearest_other = min(
                (_distance(qx, qy, box) for i, (qx, qy) in enumerate(pixels) if i != index), default=math.inf
            )
            cost = sum(_overlap(box, other) for other in taken) + 4 * outside
            cost += 300 * max(0.0, own + 6 - nearest_other) + (1 if far else 0)
            if cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (label, box), cost
            else:
                label.remove()
            if cost == 0:
                break
        if best is not None:
            taken.append(best[1])


def _figure_accuracy_vs(rows: Sequence[Mapping[str, Any]], x: str) -> Figure:
    """Build the figure of :func:`plot_accuracy_vs` without saving it."""
    if x not in _AXES:
        raise ValueError(f"x must be one of {sorted(_AXES)}, got {x!r}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    value_of, x_label, phrase = _AXES[x]
    reference = reference_row(rows)
    points = []
    for row in rows:
        xv, yv = value_of(row), finite_number(row.get("top1"))
        if is_ok(row) and xv is not None and yv is not None:
            points.append((xv, yv, row))
    points.sort(key=lambda point: point[0])

    fig = Figure(figsize=(7.5, 4.8), dpi=130, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

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
        x_label += ", log scale"
    ax.set_xlabel(x_label)

    others = [point for point in points if point[2] is not reference]
    if others:
        ax.scatter(
            [p[0] for p in others],
            [p[1] for p in others],
            s=36,
            color="tab:blue",
            zorder=3,
            label="compressed",
        )
    for xv, yv, row in points:
        if row is reference:
            label = "baseline" if row.get("baseline") else "reference (first row)"
            ax.scatter([xv], [yv], s=160, marker="*", color="tab:red", zorder=4, label=label)
            ax.axhline(yv, color="tab:red", linestyle=":", linewidth=1, alpha=0.6, zorder=1)

    # Room for labels next to the outermost points.
    ax.margins(x=0.12, y=0.15)
    ax.legend(loc="best", fontsize=8)
    _place_labels(fig, ax, points, reference)
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
