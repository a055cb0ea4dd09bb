"""Tables of a study's results: read ``results.jsonl``, render Markdown, CSV and a terminal table.

The main table keeps the layout of the empirical study of ViT compression that
this project reproduces (``Model | Method | Accuracy | GPU Speed | CPU Speed |
Size(MB)``) and adds columns relative to the baseline row. The CPU speed-up
compares with the baseline on its *fastest float runtime*: eager PyTorch is slow
on CPUs (its Linear layers reach less than half of what oneDNN/OpenVINO reach),
so a ratio to eager flatters every method; that ratio is shown too, in its own
column, when the baseline was measured on both. Nothing here imports torch: a
report renders from the results file alone, in well under a second.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcompress.errors import VitcompressError

if TYPE_CHECKING:
    from rich.table import Table

DASH = "—"

# (header, right-aligned). Right alignment is for columns that hold numbers.
_MAIN_COLUMNS: tuple[tuple[str, bool], ...] = (
    ("Model", False),
    ("Method", False),
    ("Family", False),
    ("Accuracy (%)", True),
    ("GPU Speed (img/s)", True),
    ("CPU Speed (img/s)", True),
    ("Size (MB)", True),
    ("Δ Acc (pt)", True),
    ("CPU speed-up (×)", True),
    ("Size ratio", True),
    ("Runtime", False),
    ("Int arithmetic", False),
)
# Shown after "CPU speed-up (×)" when the baseline was measured in eager PyTorch and on a faster float runtime.
EAGER_COLUMN = "CPU speed-up vs eager (×)"
# The Markdown report's column after "Accuracy (%)": the binomial standard error of that accuracy.
SE_COLUMN = "± SE (pt)"
SPREAD_COLUMN = "Speed-up IQR (×)"

# Keys every CSV starts with, so the header is the same whatever rows a run produced.
_CSV_COLUMNS: tuple[str, ...] = (
    "name", "method", "model", "dataset", "baseline", "status", "error",
    "top1", "top5", "n_test", "size_bytes", "params", "macs",
    "cpu_img_s", "cpu_img_s_b1", "latency_ms_p50", "latency_ms_p95", "batch_size", "threads",
    "gpu_img_s", "runtime", "int_arithmetic", "float_parts", "seconds", "artifact", "steps",
)  # fmt: skip

_META_LABELS: dict[str, str] = {
    "recipe": "Recipe",
    "command": "Command",
    "dataset": "Dataset",
    "data": "Data",
    "classes": "Classes",
    "inputs": "Inputs (preprocessing)",
    "model": "Model",
    "hardware": "Hardware",
    "threads": "CPU threads",
    "batch_size": "Batch size",
    "torch": "PyTorch",
    "python": "Python",
    "date": "Date",
}


# --------------------------------------------------------------------------- reading


# What every row holds, and what a finished ("ok") row holds besides: a row without them cannot be shown,
# resumed or re-timed.
_REQUIRED = ("name", "status")
_REQUIRED_OK = ("steps", "artifact", "top1", "size_bytes", "cpu_img_s")


def row_problem(row: Any) -> str | None:
    """Why a results line cannot stand as a row (not an object, a required field missing), or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    missing = [key for key in _REQUIRED if key not in row]
    if not missing and row.get("status") == "ok":
        missing = [key for key in _REQUIRED_OK if row.get(key) is None]
    if missing:
        return f"a row without {', '.join(repr(k) for k in missing)}"
    if not isinstance(row["name"], str):
        return "its name is not a string"
    return None


def parse_row(line: str) -> tuple[dict[str, Any] | None, str | None]:
    """A results line as a row, or why it is not one."""
    try:
        row = json.loads(line)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return None, f"not valid JSON ({exc})"
    problem = row_problem(row)
    return (None, problem) if problem else (row, None)


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a study's ``results.jsonl``: one JSON object per line, one per experiment.

    A damaged *last* line (not JSON, or a row without the fields a row must hold) is what a run killed
    mid-write leaves behind, so it is skipped with a ``RuntimeWarning`` and the finished rows are still
    reported. A damaged line anywhere else means the file was changed some other way, and guessing past
    it could silently drop results, so it raises; running the study again sets such lines aside in
    ``results.jsonl.bad`` (see ``vitcompress.study.results.repair_results``) and re-runs their rows.

    When a name appears twice (an experiment re-run into the same folder) the
    later row wins, at the position of the first.

    Raises:
        VitcompressError: the file is missing, or a line other than the last is
            not a row (the message names the line number).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VitcompressError(
            f"no results file at {path}; run `vitcompress study` to create one, or pass the run folder"
        ) from None
    # Split on "\n" only: str.splitlines would also break on U+2028 and friends,
    # which json.dumps(ensure_ascii=False) leaves raw inside strings.
    lines = [(number, line) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
    by_name: dict[Any, dict[str, Any]] = {}
    for position, (number, line) in enumerate(lines):
        row, problem = parse_row(line)
        if row is None:
            if position == len(lines) - 1:
                warnings.warn(
                    f"{path}: skipped line {number}, which is incomplete (the run probably stopped while "
                    f"writing it): {problem}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            raise VitcompressError(
                f"{path} line {number} is not a valid row ({problem}); run the study again, which sets it aside "
                f"in {path.name}.bad and re-runs its experiment, or fix that line"
            )
        # Dict assignment keeps the key's first position, which is the order we want.
        by_name[row["name"]] = row
    return list(by_name.values())


# --------------------------------------------------------------------------- helpers shared with plots


def is_ok(row: Mapping[str, Any]) -> bool:
    """Whether an experiment finished and its measurements can be shown."""
    return row.get("status", "ok") == "ok"


def reference_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The row relative columns compare against, or ``None`` when there is none.

    The row flagged ``"baseline": true``; without a flag, the first finished row.
    A failed baseline gives ``None``: comparing against another row would
    silently change what "speed-up" means.
    """
    flagged = [row for row in rows if row.get("baseline")]
    if flagged:
        return flagged[0] if is_ok(flagged[0]) else None
    return next((row for row in rows if is_ok(row)), None)


@dataclass(frozen=True)
class SpeedReference:
    """What the speed-up columns divide by: the reference row's CPU speed on a named runtime."""

    img_s: float | None  # the reference's speed on its fastest float runtime (None: no reference)
    runtime: str | None  # that runtime, e.g. "openvino-cpu-bf16"
    measured_on: tuple[str, ...] = ()  # every float runtime the reference ran on
    eager_img_s: float | None = None  # the reference in eager PyTorch, when that is another number


def speed_reference(reference: Mapping[str, Any] | None) -> SpeedReference:
    """The reference row's speed on its fastest float runtime, and in eager PyTorch.

    Rows store each runtime's measurement under ``runtimes`` (runtime -> measures). Runtimes
    that ran integer kernels are not float; a row without compression steps (the baseline) is
    float on every runtime. A row without ``runtimes`` gives its own ``cpu_img_s`` and ``runtime``.
    """
    if reference is None:
        return SpeedReference(None, None)
    runtimes = reference.get("runtimes")
    float_speeds: dict[str, float] = {}
    if isinstance(runtimes, Mapping):
        uncompressed = not reference.get("steps")
        for name, measured in runtimes.items():
            if not isinstance(measured, Mapping) or measured.get("error"):
                continue
            speed = finite_number(measured.get("cpu_img_s"))
            if speed is not None and (uncompressed or not measured.get("int_arithmetic")):
                float_speeds[str(name)] = speed
    if not float_speeds:
        runtime = reference.get("runtime")
        return SpeedReference(finite_number(reference.get("cpu_img_s")), str(runtime) if runtime else None,
                              (str(runtime),) if runtime else ())
    best = max(float_speeds, key=lambda name: float_speeds[name])
    eager = next((speed for name, speed in float_speeds.items() if name.startswith("torch-eager")), None)
    return SpeedReference(float_speeds[best], best, tuple(float_speeds),
                          eager if eager is not None and not best.startswith("torch-eager") else None)


def same_round_reference(row: Mapping[str, Any], speed_ref: SpeedReference) -> SpeedReference:
    """The reference's speeds timed in the same interleaved round as ``row`` (the study's speed pass), if any."""
    timing = row.get("timing")
    base = timing.get("baseline_img_s") if isinstance(timing, Mapping) else None
    if not isinstance(base, Mapping) or speed_ref.runtime not in base:
        return speed_ref
    eager = next((finite_number(v) for k, v in base.items() if str(k).startswith("torch-eager")), None)
    return SpeedReference(finite_number(base[speed_ref.runtime]), speed_ref.runtime, speed_ref.measured_on,
                          eager if speed_ref.eager_img_s is not None else None)


def paired_speedup(row: Mapping[str, Any], runtime: str | None) -> tuple[float, float, float] | None:
    """(q25, median, q75) of the row's round-by-round speed-up over the baseline on ``runtime``, from the
    study's speed pass; ``None`` for rows timed otherwise."""
    paired = row.get("speedup_paired")
    stats = paired.get(runtime) if isinstance(paired, Mapping) and runtime else None
    if not isinstance(stats, Mapping):
        return None
    values = tuple(finite_number(stats.get(k)) for k in ("q25", "median", "q75"))
    return None if None in values else values  # type: ignore[return-value]


def main_columns(speed_ref: SpeedReference, *, with_se: bool = False) -> list[tuple[str, bool]]:
    """The main table's (header, right-aligned) columns; the eager ratio only when it differs; ``with_se``:
    the accuracy's standard error beside it."""
    columns = list(_MAIN_COLUMNS)
    if with_se:
        columns.insert([header for header, _ in columns].index("Accuracy (%)") + 1, (SE_COLUMN, True))
    if speed_ref.eager_img_s is not None:
        at = [header for header, _ in columns].index("CPU speed-up (×)") + 1
        columns.insert(at, (EAGER_COLUMN, True))
    return columns


def common_value(rows: Sequence[Mapping[str, Any]], key: str) -> Any:
    """The value of ``key`` shared by all finished rows that have it, else ``None``."""
    values = {json.dumps(row.get(key), sort_keys=True, default=str) for row in rows if is_ok(row)}
    values.discard("null")
    if len(values) != 1:
        return None
    return json.loads(values.pop())


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else ``None`` (null, NaN, text, bool)."""
    # bool is an int subclass; a True in a numeric column is a bug upstream, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(value: Any, decimals: int, scale: float = 1.0) -> str:
    number = finite_number(value)
    return DASH if number is None else f"{number / scale:.{decimals}f}"


def _ratio(value: Any, reference: Any) -> float | None:
    value, reference = finite_number(value), finite_number(reference)
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def _delta_points(top1: Any, reference_top1: Any) -> str:
    top1, reference_top1 = finite_number(top1), finite_number(reference_top1)
    if top1 is None or reference_top1 is None:
        return DASH
    text = f"{top1 - reference_top1:+.2f}"
    # A difference that rounds to zero should not read as a gain or a loss.
    return "0.00" if text in ("+0.00", "-0.00") else text


def _yes_no(value: Any) -> str:
    return DASH if value is None else ("yes" if value else "no")


def _times(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}×"


# A chain's steps -> the study's "Method" families (long for reports, short for the terminal), by name prefix.
_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("ptq.", "Quantization (PTQ)", "PTQ"),
    ("qat.", "Quantization (QAT)", "QAT"),
    ("distill", "Knowledge Distillation", "KD"),
    ("train", "Training (control)", "Train"),
    ("prune.", "Pruning", "Prune"),
    ("tokens.", "Pruning (token merging)", "Merge"),
    ("lowrank.", "Low-rank approximation", "Low-rank"),
)


def method_family(row: Mapping[str, Any], *, short: bool = False) -> str:
    """The study's "Method" family of a row's chain ("Pruning + Quantization (PTQ)"); "Baseline" without steps."""
    steps = row.get("steps") or []
    if row.get("baseline") or not steps:
        return "Baseline"
    names: list[str] = []
    for step in steps:
        method = str(step.get("method", "") if isinstance(step, Mapping) else step)
        family = next(((s if short else long) for prefix, long, s in _FAMILIES if method.startswith(prefix)), method)
        if family and family not in names:
            names.append(family)
    return ("+".join(names) if short else " + ".join(names)) or DASH


# Point colours by the study's method family, the same in the PNG and the HTML plots (the baseline: red).
BASELINE_COLOR = "#d62728"
FAMILY_COLORS: dict[str, str] = {
    "Quantization (PTQ)": "#1f77b4", "Quantization (QAT)": "#17becf", "Knowledge Distillation": "#2ca02c",
    "Training (control)": "#bcbd22", "Pruning": "#ff7f0e", "Pruning (token merging)": "#8c564b",
    "Low-rank approximation": "#9467bd",
}  # fmt: skip
OTHER_COLOR = "#7f7f7f"


def family_color(family: str) -> str:
    """The colour of a family; a chain ("Pruning + Quantization (PTQ)") takes its last step's."""
    return FAMILY_COLORS.get(family.split(" + ")[-1], OTHER_COLOR)


def pareto_front_2d(points: Sequence[tuple[float, float]], *, smaller_x_is_better: bool) -> list[int]:
    """Indices of the (x, accuracy) points no other point beats on both axes (higher accuracy, and smaller or
    larger x)."""
    from ..search.pareto import pareto_mask  # the study's front rule, on these two axes

    mask = pareto_mask([(-x if smaller_x_is_better else x, y) for x, y in points])
    return [i for i, on_front in enumerate(mask) if on_front]


def accuracy_se(top1: Any, n: Any) -> float | None:
    """The binomial standard error of a top-1 accuracy in percent measured on ``n`` images, in points."""
    p, count = finite_number(top1), finite_number(n)
    if p is None or count is None or count < 1:
        return None
    p = min(max(p / 100, 0.0), 1.0)
    return 100 * math.sqrt(p * (1 - p) / count)


def cpu_speedup(row: Mapping[str, Any], speed_ref: SpeedReference) -> float | None:
    """The row's CPU speed-up over the reference (``same_round_reference`` of ``speed_ref``): the speed pass's
    paired median where there is one, else the ratio of the speeds. The one rule the reports and trackers use."""
    paired = paired_speedup(row, speed_ref.runtime)
    return paired[1] if paired else _ratio(row.get("cpu_img_s"), speed_ref.img_s)


def main_cells(row: Mapping[str, Any], reference: Mapping[str, Any] | None,
                speed_ref: SpeedReference | None = None, *, with_se: bool = False) -> list[str]:
    """Plain-text cells of the main table, in ``main_columns(speed_ref, with_se=...)`` order."""
    ref = reference or {}
    speed_ref = same_round_reference(row, speed_ref or speed_reference(reference))
    speed_up = cpu_speedup(row, speed_ref)
    size_ratio = _ratio(row.get("size_bytes"), ref.get("size_bytes"))
    method = str(row.get("name", DASH)) + (" ★" if row.get("pareto") else "")
    eager_runtime = next((k for k in row.get("speedup_paired") or {} if str(k).startswith("torch-eager")), None)
    eager_paired = paired_speedup(row, eager_runtime)
    eager = ([_times(eager_paired[1] if eager_paired else _ratio(row.get("cpu_img_s"), speed_ref.eager_img_s))]
             if speed_ref.eager_img_s is not None else [])
    se = [_fmt(accuracy_se(row.get("top1"), row.get("n_test")), 2)] if with_se else []
    return [
        str(row.get("model") or DASH),
        method,
        method_family(row),
        _fmt(row.get("top1"), 2),
        *se,
        _fmt(row.get("gpu_img_s"), 1),
        _fmt(row.get("cpu_img_s"), 1),
        _fmt(row.get("size_bytes"), 2, scale=1e6),
        _delta_points(row.get("top1"), ref.get("top1")),
        _times(speed_up),
        *eager,
        DASH if size_ratio is None else f"{100 * size_ratio:.1f}%",
        str(row.get("runtime") or DASH),
        _yes_no(row.get("int_arithmetic")),
    ]


def _detail_columns(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, int, float]]:
    """(header, key, decimals, scale) of the Details table; top-5 only when measured."""
    columns = [
        ("Params (M)", "params", 3, 1e6),
        ("MACs (M)", "macs", 2, 1e6),
        ("CPU img/s (batch 1)", "cpu_img_s_b1", 1, 1.0),
        ("Latency p50 (ms)", "latency_ms_p50", 2, 1.0),
        ("Latency p95 (ms)", "latency_ms_p95", 2, 1.0),
        ("Top-5 (%)", "top5", 2, 1.0),
        ("Compute time (s)", "seconds", 1, 1.0),
    ]
    if not any(finite_number(row.get("top5")) is not None for row in rows):
        columns = [column for column in columns if column[1] != "top5"]
    return columns


# --------------------------------------------------------------------------- markdown


_CONTROL = dict.fromkeys(c for c in range(32) if c not in (9, 10, 13))  # NUL and the other C0 controls


def _md(text: Any) -> str:
    """Text from a recipe or a row (a name, an error) as inert Markdown: a raw "|" would end a table cell
    early and a newline the table; HTML would be rendered (``<img onerror=...>`` in a name); control
    characters such as NUL break viewers."""
    text = " ".join(str(text).translate(_CONTROL).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _md_table(headers: Sequence[str], right: Sequence[bool], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md(header) for header in headers) + " |"]
    lines.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
    lines += ["| " + " | ".join(_md(cell) for cell in cells) + " |" for cells in body]
    return lines


def filled_meta(meta: Mapping[str, Any] | None, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``meta`` plus what the rows themselves say about how they were measured."""
    filled = {key: value for key, value in (meta or {}).items() if value is not None}
    first_ok = next((row for row in rows if is_ok(row)), {})
    env = first_ok.get("env") if isinstance(first_ok.get("env"), Mapping) else {}
    hardware = env.get("cpu")
    if hardware and (env.get("cpu_capability") or env.get("cpu_isa")):
        isa = [env["cpu_capability"]] if env.get("cpu_capability") else []
        isa += [str(flag) for flag in env.get("cpu_isa") or ()]
        if "avx2" in isa and not any(str(flag).startswith("amx") for flag in isa):
            isa.append("no AMX")  # x86: say it, as int8 and bf16 speed-ups hinge on it
        hardware = f"{hardware} ({', '.join(isa)})"
    if hardware and env.get("gpu"):
        hardware = f"{hardware} + {env['gpu']}"
    fallbacks = {
        "dataset": common_value(rows, "dataset"),
        "hardware": hardware,
        "threads": common_value(rows, "threads"),
        "batch_size": common_value(rows, "batch_size"),
        "torch": env.get("torch"),
        "python": env.get("python"),
    }
    for key, value in fallbacks.items():
        if key not in filled and value is not None:
            filled[key] = value
    if filled.get("data") == filled.get("dataset"):
        filled.pop("data", None)  # a bundled dataset describes itself by its name: one line, not two
    return filled


def meta_items(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, text) of each fact about a run, in the reports' order (Markdown and HTML list the same)."""
    ordered = [key for key in _META_LABELS if key in meta] + [key for key in meta if key not in _META_LABELS]
    items = []
    for key in ordered:
        value = meta[key]
        if isinstance(value, (Mapping, list, tuple)):
            value = json.dumps(value, default=str)
        items.append((_META_LABELS.get(key, key.replace("_", " ").capitalize()), " ".join(str(value).split())))
    return items


def _meta_bullets(meta: Mapping[str, Any]) -> list[str]:
    return [f"- **{label}**: " + (f"`{text}`" if label == _META_LABELS["command"] else text)
            for label, text in meta_items(meta)]


def _how_measured(
    meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], reference: Mapping[str, Any] | None
) -> str:
    sentences = [
        "Each row is one experiment: the model after its compression steps, saved to a file, "
        "then measured by the same code on the same machine in the same run."
    ]
    dataset, n_test = meta.get("dataset"), common_value(rows, "n_test")
    if dataset is not None:
        images = f" ({n_test} images)" if n_test is not None else ""
        sentences.append(f"Accuracy is top-1 on the {dataset} test split{images}.")
    batch, threads = meta.get("batch_size"), meta.get("threads")
    if batch is not None and threads is not None:
        sentences.append(f"CPU speed is images per second at batch size {batch} with {threads} CPU threads.")
    flagged = [row for row in rows if row.get("baseline")]
    if reference is not None:
        sentences.append(f"Relative columns compare with **{_md(reference.get('name'))}**.")
        speed_ref = speed_reference(reference)
        sentences.append(_speed_reference_sentence(speed_ref))
        timings = [row.get("timing") for row in rows if is_ok(row) and not row.get("baseline")]
        if timings and all(isinstance(t, Mapping) and t.get("baseline_img_s") for t in timings):
            if all(paired_speedup(row, speed_ref.runtime) for row in rows if is_ok(row) and not row.get("baseline")):
                how = ("in a shuffled order each round with the baseline timed again between every two "
                       "deployments, and each speed-up is the median, over the rounds, of the row's speed over the "
                       "baseline's timed just before and after it (quartiles in the Details table; "
                       "`speedup_paired` in `results.jsonl`)")
            else:
                how = "and each speed-up divides by the baseline's speed from the row's own group (`timing` in " \
                      "`results.jsonl`)"
            sentences.append(f"Speeds come from the study's speed pass: every row re-timed interleaved with the "
                             f"baseline, in groups, {how}.")
    elif flagged:
        sentences.append("The baseline failed, so the relative columns are empty.")
    return " ".join(sentences)


def _speed_reference_sentence(speed_ref: SpeedReference) -> str:
    """Which of the reference's speeds the CPU speed-up divides by, in words."""
    if speed_ref.runtime is None:
        return "The CPU speed-up divides by the reference's CPU speed."
    runtime = f"**{_md(speed_ref.runtime)}**"
    if len(speed_ref.measured_on) > 1:
        others = ", ".join(_md(name) for name in speed_ref.measured_on if name != speed_ref.runtime)
        text = f"The CPU speed-up divides by its speed on {runtime}, the fastest float runtime it was measured on " \
               f"(also measured: {others})."
        if speed_ref.eager_img_s is not None:
            text += " The ratio to its eager PyTorch speed is in its own column, labelled as such."
        return text
    text = f"The CPU speed-up divides by its speed on {runtime}, the only runtime it was measured on."
    if speed_ref.runtime.startswith("torch-eager"):
        text += (" Eager PyTorch is slow on CPUs, which flatters every speed-up: set `measure.runtimes: [all]` "
                 "in the recipe to compare with the fastest float runtime.")
    return text


def _legend(has_pareto: bool, has_top5: bool, speed_ref: SpeedReference | None = None,
            has_spread: bool = False) -> list[str]:
    lines = [
        "- **Model**: the architecture the experiment started from.",
        "- **Method**: the experiment's name; its compression steps are in `results.csv` (column `steps`).",
        "- **Family**: the kind of compression its steps are, as the study groups them (a chain lists each).",
        "- **Accuracy (%)**: top-1 accuracy on the test split, in percent.",
        f"- **{SE_COLUMN}**: its binomial standard error, √(p(1−p)/n) in points for n test images: two rows "
        "closer than about twice this are not told apart by this test split.",
        "- **GPU Speed (img/s)**: images per second of the row's PyTorch model, eager and in its own "
        "precision, on the GPU named under Hardware, at the batch size above. A quantized row runs there as "
        "its float simulation (fake quantization), never in integer arithmetic; PyTorch's int8 modules have "
        "no CUDA kernels, so their rows show —, as does every row of a run without a GPU. It is never estimated.",
        "- **CPU Speed (img/s)**: images per second on the CPU, at the batch size and thread count above.",
        "- **Size (MB)**: bytes of the saved artifact file / 10⁶, measured from the file, "
        "not estimated from parameter counts.",
        "- **Δ Acc (pt)**: accuracy minus the baseline's, in percentage points.",
        "- **CPU speed-up (×)**: CPU speed / the baseline's CPU speed on its fastest float runtime"
        + (f" ({_md(speed_ref.runtime)})" if speed_ref is not None and speed_ref.runtime else "")
        + ". Each row's own CPU speed is that of its fastest runtime, so the ratio is what a method buys over "
        "the best deployment of the uncompressed model. Both are measured on the same "
        "machine in the same run, so the ratio is fair; absolute speeds do not carry over to other machines.",
        "- **Size ratio**: size / the baseline's size, as a percentage.",
        "- **Runtime**: what executed the model when it was measured.",
        "- **Int arithmetic**: yes means integer kernels really executed. Simulated (fake) quantization, "
        "and integer weights that are turned back into floats before every matmul, are no.",
        "- **Details**: Params and MACs (multiply-accumulates per image) in millions; CPU img/s at batch 1 "
        "and latency (median p50 and 95th percentile p95 of one image) show the single-request case; "
        "compute time is the wall-clock seconds the experiment took in this run.",
    ]
    if speed_ref is not None and speed_ref.eager_img_s is not None:
        lines.insert(
            [i for i, line in enumerate(lines) if line.startswith("- **CPU speed-up (×)**")][0] + 1,
            f"- **{EAGER_COLUMN}**: CPU speed / the baseline's speed in eager PyTorch on the CPU. Eager is not "
            "the fastest way to run the baseline here, so this ratio overstates what a method buys; it is shown "
            "to compare with studies that report against eager PyTorch.",
        )
    if has_spread:
        lines.append(
            f"- **{SPREAD_COLUMN}**: the speed pass times a row and the baseline in turn, round after round; "
            "the CPU speed-up is the median over the rounds of the row's ratio to the baseline timed around it, "
            "and this is its "
            "interquartile range. Two speed-ups whose ranges overlap are not told apart by this run."
        )
    if has_top5:
        lines.append(
            "- **Top-5 (%)**: top-5 accuracy, where the dataset has enough classes to make it useful."
        )
    if has_pareto:
        lines.append(
            "- **★**: on the Pareto front marked by the study: no other row is better on every "
            "measure at once."
        )
    return lines


def render_markdown(
    rows: list[dict[str, Any]],
    *,
    title: str = "vitcompress study",
    meta: dict[str, Any] | None = None,
    plots: Mapping[str, str] | None = None,
) -> str:
    """Render a study's rows as a Markdown report.

    Args:
        rows: result rows, as returned by :func:`read_results`.
        title: the report's first heading.
        meta: how the study was run (recipe, command, hardware, ...); keys it
            lacks are filled from the rows and their ``env`` where possible.
        plots: caption -> link (relative to the report) of images to embed.

    Returns:
        The report text, ending in a newline.
    """
    reference = reference_row(rows)
    speed_ref = speed_reference(reference)
    finished = [row for row in rows if is_ok(row)]
    failed = [row for row in rows if not is_ok(row)]
    filled = filled_meta(meta, rows)

    out = [f"# {_md(title)}", "", "## How this was measured", "", _how_measured(filled, rows, reference), ""]
    bullets = _meta_bullets(filled)
    if bullets:
        out += bullets + [""]

    out += ["## Results", ""]
    if finished:
        columns = main_columns(speed_ref, with_se=True)
        headers = [header for header, _ in columns]
        right = [r for _, r in columns]
        out += _md_table(headers, right, [main_cells(row, reference, speed_ref, with_se=True) for row in finished])
    else:
        out.append("_No experiment finished._")
    out.append("")

    noted = [row for row in rows if row.get("note")]
    if noted:
        out += ["## Notes", ""]
        out += [f"- **{_md(row.get('name', DASH))}**: {_md(' '.join(str(row['note']).split()))}" for row in noted]
        out.append("")

    warned = [row for row in finished if row.get("warnings")]
    if warned:
        out += ["## Warnings", ""]
        out += [f"- **{_md(row.get('name', DASH))}**: {_md(' '.join(str(text).split()))}"
                for row in warned for text in row["warnings"]]
        out.append("")

    skipped = [row for row in failed if row.get("status") == "skipped"]
    failed = [row for row in failed if row.get("status") != "skipped"]
    if failed:
        out += ["## Failed experiments", ""]
        for row in failed:
            status = row.get("status") or "failed"
            error = row.get("error") or "no error message recorded"
            prefix = "" if status == "failed" else f"{status}: "
            out.append(f"- **{_md(row.get('name', DASH))}**: {prefix}{_md(' '.join(str(error).split()))}")
        out.append("")
    if skipped:
        out += ["## Skipped experiments", ""]
        out += [f"- **{_md(row.get('name', DASH))}**: {_md(' '.join(str(row.get('error') or '').split()))}"
                for row in skipped]
        out.append("")

    columns = _detail_columns(finished)
    spreads = [paired_speedup(row, speed_ref.runtime) for row in finished]
    spread_column = any(spreads)
    if finished:
        out += ["## Details", ""]
        body = [
            [str(row.get("name", DASH))]
            + [_fmt(row.get(key), decimals, scale) for _, key, decimals, scale in columns]
            + ([DASH if spread is None else f"{spread[0]:.2f}–{spread[2]:.2f}"] if spread_column else [])
            for row, spread in zip(finished, spreads)
        ]
        headers = ["Method"] + [c[0] for c in columns] + ([SPREAD_COLUMN] if spread_column else [])
        out += _md_table(headers, [False] + [True] * (len(headers) - 1), body)
        out.append("")

    if plots:
        out += ["## Plots", ""]
        for caption, link in plots.items():
            out += [f"![{caption}]({link})", ""]

    has_top5 = any(column[1] == "top5" for column in columns)
    out += ["## Legend", ""] + _legend(any(row.get("pareto") for row in finished), has_top5, speed_ref,
                                       spread_column) + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------- csv


# A cell a spreadsheet would run as a formula (OWASP's CSV injection list) gets a leading quote.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    if isinstance(value, bool):
        return "true" if value else "false"  # the JSON spelling, like results.jsonl
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)  # str(float) round-trips exactly


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write every row, failed ones included, as CSV with one column per key.

    The standard keys come first in a fixed order; any others follow in order
    of first appearance. ``None`` is an empty cell; lists and dicts are JSON.
    """
    path = Path(path)
    columns = list(_CSV_COLUMNS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row.get(key)) for key in columns])


# --------------------------------------------------------------------------- terminal


_SHORT_RUNTIMES = (("torch-eager", "eager"), ("torch-compile", "compile"), ("onnxruntime", "ort"),
                   ("openvino", "ov"))


def _short_runtime(label: Any) -> str:
    """``openvino-cpu-bf16`` -> ``ov bf16``, ``torch-eager-cpu`` -> ``eager``: the terminal's runtime column."""
    text = str(label or DASH)
    for long, short in _SHORT_RUNTIMES:
        if text.startswith(long):
            rest = text[len(long):].removeprefix("-cpu").strip("-").replace("-", " ")
            return f"{short} {rest}".strip()
    return text


def render_terminal_table(rows: list[dict[str, Any]]) -> Table:
    """The main table for the CLI, compact enough for 120 columns without wrapping a method name: short headers
    (explained in the caption), the family's short name, the baseline's model in the title (the report has
    each row's), the GPU column only when a GPU speed exists. Failed and skipped experiments, notes and
    warnings go in the caption."""
    from rich.table import Table
    from rich.text import Text

    reference = reference_row(rows)
    speed_ref = speed_reference(reference)
    finished = [row for row in rows if is_ok(row)]
    model = (reference or {}).get("model") or common_value(finished, "model")
    gpu = any(finite_number(row.get("gpu_img_s")) is not None for row in finished)
    eager = speed_ref.eager_img_s is not None
    title = "vitcompress study" + (f" ({model})" if model else "")
    table = Table(title=title, box=None, pad_edge=False, collapse_padding=True, padding=(0, 1),
                  header_style="bold underline")
    columns = [("Method", False), ("Family", False), ("Acc%", True), ("Δpt", True), ("img/s", True),
               ("Speed", True)] + ([("×eager", True)] if eager else []) + (
              [("GPU/s", True)] if gpu else []) + [("MB", True), ("Size", True), ("Runtime", False),
                                                   ("Int", False)]
    for header, right in columns:
        table.add_column(header, justify="right" if right else "left", no_wrap=True)
    headers = [h for h, _ in main_columns(speed_ref)]
    for row in finished:
        cells = dict(zip(headers, main_cells(row, reference, speed_ref)))
        values = [cells["Method"], method_family(row, short=True),
                  cells["Accuracy (%)"], cells["Δ Acc (pt)"], cells["CPU Speed (img/s)"], cells["CPU speed-up (×)"]]
        values += [cells[EAGER_COLUMN]] if eager else []
        values += [cells["GPU Speed (img/s)"]] if gpu else []
        values += [cells["Size (MB)"], cells["Size ratio"], _short_runtime(row.get("runtime")),
                   cells["Int arithmetic"]]
        # Text(), not str: a "[" in a name would otherwise be read as rich markup.
        table.add_row(*(Text(v) for v in values), style="bold" if row is reference else None)
    caption = Text()
    if reference is not None and speed_ref.runtime:
        caption.append(f"CPU speed-up: vs {reference.get('name', DASH)} on {speed_ref.runtime}"
                       + (" (its fastest float runtime)" if len(speed_ref.measured_on) > 1 else "")
                       + ("; vs eager: the same ratio against its eager PyTorch speed" if eager else ""))
        caption.append("\nimg/s: CPU images/s; Speed: CPU speed-up; Δpt: accuracy change in points; Size: of the "
                       "baseline's file; Runtime: eager/compile = PyTorch, ort = ONNX Runtime, ov = OpenVINO; Int: "
                       "integer kernels ran; the report has the models and the rest")
    for row in rows:
        if row.get("note"):
            if caption:
                caption.append("\n")
            caption.append(f"{row.get('name', DASH)}: ", style="bold")
            caption.append(" ".join(str(row["note"]).split()))
    for row in (row for row in rows if is_ok(row)):
        for text in row.get("warnings") or ():
            if caption:
                caption.append("\n")
            caption.append(f"warning, {row.get('name', DASH)}: ", style="yellow")
            caption.append(" ".join(str(text).split()))
    for status, style in (("failed", "red"), ("skipped", "yellow")):
        these = [row for row in rows if not is_ok(row) and (row.get("status") == "skipped") == (status == "skipped")]
        if these:
            if caption:
                caption.append("\n")
            caption.append(f"{status.capitalize()}: ", style=style)
            caption.append("; ".join(f"{row.get('name', DASH)} ({row.get('error') or 'no message'})" for row in these))
    if caption:
        table.caption = caption
    return table
