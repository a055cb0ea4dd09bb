"""``report.html``: the study's table and interactive plots in one self-contained file.

It opens from disk with no network: plotly's JavaScript is embedded (``plotly.offline.get_plotlyjs``),
the table sorts on a click of its headers with a few lines of plain JavaScript, and every value is
escaped. Hovering a point shows the row's name, its chain of steps and its numbers; the Pareto front
of each plot's two axes is drawn and its points ringed, as in the PNG plots.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

from vitcompress.report.table import (
    BASELINE_COLOR,
    DASH,
    _fmt,
    accuracy_se,
    family_color,
    filled_meta,
    finite_number,
    is_ok,
    main_cells,
    main_columns,
    meta_items,
    method_family,
    pareto_front_2d,
    reference_row,
    speed_reference,
)

__all__ = ["render_html"]

# (element id, x of a row, axis title, smaller x is better)
_PLOTS = (
    ("plot-size", lambda r: None if finite_number(r.get("size_bytes")) is None else r["size_bytes"] / 1e6,
     "Size of the saved model file (MB)", True),
    ("plot-speed", lambda r: finite_number(r.get("cpu_img_s")), "CPU throughput (images/s)", False),
)

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1400px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; }
table.rows { border-collapse: collapse; font-size: 13px; }
table.rows th, table.rows td { border-bottom: 1px solid #ddd; padding: 4px 6px; text-align: right; white-space: nowrap; }
table.rows th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; user-select: none;
  white-space: normal; max-width: 96px; vertical-align: bottom; }
table.rows th.left, table.rows td.left { text-align: left; }
table.rows tr.baseline td { font-weight: 600; }
table.rows th[aria-sort=ascending]::after { content: " \\25B2"; } table.rows th[aria-sort=descending]::after { content: " \\25BC"; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } .plot { width: 660px; height: 460px; }
.scroll { overflow-x: auto; max-width: 100%; }
ul.meta li, ul.notes li { margin: 2px 0; } code { background: #f4f4f4; padding: 0 3px; }
"""

# Click a header: sort by it (numbers as numbers, "—" last), again: the other way.
_SORT = """
document.querySelectorAll("table.rows").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.sort, y = b.cells[col].dataset.sort;
        var nx = parseFloat(x), ny = parseFloat(y);
        if (x === "" && y === "") return 0; if (x === "") return 1; if (y === "") return -1;
        if (!isNaN(nx) && !isNaN(ny)) return dir * (nx - ny);
        return dir * x.localeCompare(y);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _e(value: Any) -> str:
    return html.escape(" ".join(str(value).split()), quote=True)


def _sort_key(text: str) -> str:
    """The number in a cell ("1.23×", "-0.42", "25.8%") for sorting, else the text; "" for no value."""
    if text == DASH:
        return ""
    cleaned = text.replace("×", "").replace("%", "").replace("+", "").replace("★", "").strip()
    try:
        return repr(float(cleaned))
    except ValueError:
        return text


def _figure(rows: Sequence[Mapping[str, Any]], reference: Any, value_of: Any, x_title: str,
            smaller_x_is_better: bool) -> dict[str, Any]:
    """A plotly figure (as JSON-able dict): one trace per family, the baseline a star, the front a dashed line."""
    points = [(value_of(r), finite_number(r.get("top1")), r) for r in rows if is_ok(r)]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    front = set(pareto_front_2d([(p[0], p[1]) for p in points], smaller_x_is_better=smaller_x_is_better))
    traces: dict[str, dict[str, Any]] = {}
    for i, (x, y, row) in enumerate(points):
        family = "Baseline" if row is reference else method_family(row)
        trace = traces.setdefault(family, {
            "type": "scatter", "mode": "markers", "name": family, "x": [], "y": [], "text": [],
            "hovertemplate": "%{text}<extra></extra>",
            "marker": {"size": 16 if family == "Baseline" else 10,
                       "symbol": "star" if family == "Baseline" else "circle",
                       "color": BASELINE_COLOR if family == "Baseline" else family_color(family)}})
        steps = " → ".join(str(s.get("method")) for s in row.get("steps") or [] if isinstance(s, Mapping)) or "—"
        se = accuracy_se(row.get("top1"), row.get("n_test"))
        trace["x"].append(x)
        trace["y"].append(y)
        trace["text"].append("<br>".join([
            f"<b>{_e(row.get('name'))}</b>" + (" (Pareto front)" if i in front else ""),
            f"chain: {_e(steps)}", f"family: {_e(family)}",
            f"top-1: {y:.2f}%" + (f" ± {se:.2f}" if se is not None else ""),
            f"size: {_fmt(row.get('size_bytes'), 3, scale=1e6)} MB", f"CPU: {_fmt(row.get('cpu_img_s'), 1)} img/s",
            f"runtime: {_e(row.get('runtime') or DASH)}"]))
    data = list(traces.values())
    order = sorted(front, key=lambda i: points[i][0])
    if order:
        # The front as one trace of its own (a dashed step line through rings drawn over its points), so the
        # legend shows each family's plain marker and the front's ring once.
        data.append({"type": "scatter", "mode": "lines+markers" if len(order) > 1 else "markers",
                     "name": "Pareto front", "hoverinfo": "skip",
                     "x": [points[i][0] for i in order], "y": [points[i][1] for i in order],
                     "marker": {"symbol": "circle-open", "size": 14, "color": "black", "line": {"width": 2}},
                     "line": {"dash": "dash", "color": "#555", "width": 1,
                              "shape": "hv" if smaller_x_is_better else "vh"}})
    xs = [p[0] for p in points]
    log = bool(xs) and min(xs) > 0 and max(xs) / min(xs) > 10
    layout = {"xaxis": {"title": {"text": x_title + (", log scale" if log else "")}, "type": "log" if log else "linear"},
              "yaxis": {"title": {"text": "Top-1 accuracy (%)"}}, "margin": {"l": 60, "r": 10, "t": 30, "b": 50},
              "legend": {"font": {"size": 11}}, "hovermode": "closest"}
    return {"data": data, "layout": layout}


def render_html(rows: list[dict[str, Any]], *, title: str = "vitcompress study",
                meta: Mapping[str, Any] | None = None) -> str:
    """The report as one HTML page: meta, the sortable table, two interactive plots, notes and warnings."""
    from plotly.offline import get_plotlyjs

    reference = reference_row(rows)
    speed_ref = speed_reference(reference)
    finished = [r for r in rows if is_ok(r)]
    columns = main_columns(speed_ref, with_se=True)
    table = [main_cells(row, reference, speed_ref, with_se=True) for row in finished]
    # A column no row has a value in (the GPU's, on a CPU-only machine) is left out, and named, so the
    # columns that matter fit a screen.
    empty = [i for i in range(len(columns)) if table and all(cells[i] == DASH for cells in table)]
    keep = [i for i in range(len(columns)) if i not in empty]
    head = "".join(f'<th class="{"" if columns[i][1] else "left"}">{_e(columns[i][0])}</th>' for i in keep)
    body = []
    for row, cells in zip(finished, table):
        tds = "".join(f'<td class="{"" if columns[i][1] else "left"}" data-sort="{_e(_sort_key(cells[i]))}">'
                      f"{_e(cells[i])}</td>" for i in keep)
        body.append(f'<tr class="{"baseline" if row is reference else ""}">{tds}</tr>')
    left_out = (" Left out, as no row has a value: " + ", ".join(_e(columns[i][0]) for i in empty) + ".") if empty else ""
    figures = {pid: _figure(rows, reference, value_of, x_title, smaller)
               for pid, value_of, x_title, smaller in _PLOTS}
    sections = []
    for heading, key, wanted in (("Notes", "note", None), ("Warnings", "warnings", None),
                                 ("Failed experiments", "error", "failed"), ("Skipped experiments", "error", "skipped")):
        items = []
        for row in rows:
            value = row.get(key)
            if not value or (wanted is not None and row.get("status") != wanted) or (
                    wanted is None and key == "warnings" and not is_ok(row)):
                continue
            for text in value if isinstance(value, list) else [value]:
                items.append(f"<li><b>{_e(row.get('name'))}</b>: {_e(text)}</li>")
        if items:
            sections.append(f"<h2>{heading}</h2><ul class=\"notes\">{''.join(items)}</ul>")
    facts = "".join(f"<li><b>{_e(label)}</b>: {_e(text)}</li>"
                    for label, text in meta_items(filled_meta(meta, rows)) if text)
    plots = "".join(f'<div class="plot" id="{pid}"></div>' for pid in figures)
    script = "".join(f"Plotly.newPlot({json.dumps(pid)}, {json.dumps(fig['data'])}, {json.dumps(fig['layout'])}, "
                     '{"displaylogo": false, "responsive": true});' for pid, fig in figures.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_STYLE}</style>
<script>{get_plotlyjs()}</script></head>
<body><h1>{_e(title)}</h1>
<ul class="meta">{facts}</ul>
<h2>Results</h2><p>Click a column to sort. Accuracy on the test split; the CPU speed-up is against
{_e((reference or {}).get("name", DASH))} on {_e(speed_ref.runtime or DASH)}; size is the saved file's.{left_out}</p>
<div class="scroll"><table class="rows"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>
<h2>Accuracy against size and speed</h2><p>Hover a point for its row; ringed points are on the Pareto front of the
plot's two axes (dashed).</p><div class="plots">{plots}</div>
{''.join(sections)}
<script>{_SORT}{script}</script>
</body></html>
"""
