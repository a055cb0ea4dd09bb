"""Tests of the report package: reading results, Markdown/CSV/terminal tables and plots."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from vitcompress.errors import VitcompressError
from vitcompress.report import (
    read_results,
    render_markdown,
    render_terminal_table,
    write_csv,
    write_report,
)
from vitcompress.report.plots import _figure_accuracy_vs
from vitcompress.report.table import EAGER_COLUMN, speed_reference

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(name: str, **values: Any) -> dict[str, Any]:
    """A result row with every key present, as the study writes it."""
    row: dict[str, Any] = {
        "name": name, "method": "baseline", "steps": [], "dataset": "fashion-mnist", "model": "vit_quick",
        "baseline": False, "status": "ok", "error": None,
        "top1": 87.31, "top5": None, "n_test": 10000,
        "size_bytes": 800_000, "params": 201_234, "macs": 12_345_678,
        "cpu_img_s": 2500.0, "cpu_img_s_b1": 410.2, "latency_ms_p50": 2.4, "latency_ms_p95": 2.9,
        "batch_size": 16, "threads": 2, "gpu_img_s": None, "runtime": "torch-eager-cpu",
        "int_arithmetic": False, "float_parts": None, "seconds": 95.2,
        "artifact": f"artifacts/{name}/model.safetensors",
        "env": {"cpu": "Test CPU 9000", "torch": "2.14.1"},
    }  # fmt: skip
    row.update(values)
    return row


@pytest.fixture
def rows() -> list[dict[str, Any]]:
    return [
        _row("Vanilla ViT", baseline=True),
        _row(
            "Int8 | dynamic",
            method="quant",
            steps=["int8_dynamic"],
            top1=86.89,
            size_bytes=400_000,
            cpu_img_s=5000.0,
            runtime="torch-dynamic-int8",
            int_arithmetic=True,
        ),
        _row("Pruned 50%", method="prune", top1=85.0, size_bytes=208_800, cpu_img_s=3750.0, seconds=120.5),
        _row(
            "TensorRT int8",
            method="quant",
            status="failed",
            error="no GPU: TensorRT needs CUDA",
            top1=None,
            size_bytes=None,
            cpu_img_s=None,
            runtime=None,
            int_arithmetic=None,
        ),
    ]


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _section(markdown: str, heading: str) -> str:
    """The text of one ``## heading`` section."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", markdown, flags=re.M | re.S)
    assert match, f"no section {heading!r} in:\n{markdown}"
    return match.group(1)


def _table(section: str) -> dict[str, dict[str, str]]:
    """Parse the first Markdown table of a section into {Method: {header: cell}}."""
    split = re.compile(r"(?<!\\)\|")
    lines = [line for line in section.splitlines() if line.startswith("|")]
    headers = [cell.strip() for cell in split.split(lines[0])[1:-1]]
    assert set(lines[1]) <= set("|-:"), "second line must be the alignment row"
    table = {}
    for line in lines[2:]:
        cells = dict(zip(headers, (cell.strip() for cell in split.split(line)[1:-1]), strict=True))
        table[cells["Method"]] = cells
    return table


# --------------------------------------------------------------------------- read_results


def test_read_results_skips_truncated_last_line_with_warning(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "results.jsonl",
        [json.dumps(_row("a")), json.dumps(_row("b", top1=50.0)), '{"name": "x", "top1": 8'],
    )
    with pytest.warns(RuntimeWarning, match="line 3"):
        result = read_results(path)
    assert [row["name"] for row in result] == ["a", "b"]
    assert result[1]["top1"] == 50.0
    assert result[0]["env"]["torch"] == "2.14.1"


def test_read_results_corrupt_middle_line_raises_with_line_number(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "results.jsonl", [json.dumps(_row("a")), "{not json", json.dumps(_row("b"))]
    )
    with pytest.raises(VitcompressError, match="line 2"):
        read_results(path)


def test_read_results_duplicate_name_later_row_wins_in_first_position(tmp_path: Path) -> None:
    lines = [
        json.dumps(_row("a", top1=10.0)),
        "",
        json.dumps(_row("b")),
        json.dumps(_row("a", top1=20.0)),
        "",
    ]
    result = read_results(_write_jsonl(tmp_path / "results.jsonl", lines))
    assert [row["name"] for row in result] == ["a", "b"]
    assert result[0]["top1"] == 20.0


def test_read_results_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(VitcompressError, match="no results file"):
        read_results(tmp_path / "results.jsonl")


# --------------------------------------------------------------------------- render_markdown


def test_markdown_main_table_relative_columns(rows: list[dict[str, Any]]) -> None:
    table = _table(_section(render_markdown(rows), "Results"))
    base, int8, pruned = table["Vanilla ViT"], table["Int8 \\| dynamic"], table["Pruned 50%"]

    assert base["Size ratio"] == "100.0%"
    assert base["Δ Acc (pt)"] == "0.00"
    assert base["CPU speed-up (×)"] == "1.00×"
    assert int8["Size ratio"] == "50.0%"
    assert int8["Δ Acc (pt)"] == "-0.42"
    assert int8["CPU speed-up (×)"] == "2.00×"
    assert int8["Int arithmetic"] == "yes" and base["Int arithmetic"] == "no"
    assert int8["Runtime"] == "torch-dynamic-int8"
    assert pruned["Size ratio"] == "26.1%"
    assert pruned["Δ Acc (pt)"] == "-2.31"
    assert pruned["CPU speed-up (×)"] == "1.50×"

    assert base["Model"] == "vit_quick"
    assert base["Accuracy (%)"] == "87.31"
    assert base["GPU Speed (img/s)"] == "—"
    assert base["CPU Speed (img/s)"] == "2500.0"
    assert base["Size (MB)"] == "0.80" and pruned["Size (MB)"] == "0.21"


def test_markdown_failed_row_listed_with_error_not_in_table(rows: list[dict[str, Any]]) -> None:
    markdown = render_markdown(rows)
    assert "TensorRT int8" not in _section(markdown, "Results")
    assert "TensorRT int8" not in _section(markdown, "Details")
    failed = _section(markdown, "Failed experiments")
    assert "- **TensorRT int8**: no GPU: TensorRT needs CUDA" in failed


def test_markdown_escapes_pipe_in_names(rows: list[dict[str, Any]]) -> None:
    markdown = render_markdown(rows)
    assert "Int8 \\| dynamic" in markdown
    assert "Int8 | dynamic" not in markdown
    # Every table line still has exactly one cell per header.
    table_lines = [line for line in _section(markdown, "Results").splitlines() if line.startswith("|")]
    assert {len(re.split(r"(?<!\\)\|", line)) for line in table_lines} == {15}  # 13 columns: ± SE and Family too


def test_markdown_meta_and_env_fallback(rows: list[dict[str, Any]]) -> None:
    meta = {"recipe": "quick", "command": "vitcompress study quick", "date": "2025-01-02"}
    how = _section(render_markdown(rows, title="My study", meta=meta), "How this was measured")
    assert "- **Recipe**: quick" in how
    assert "- **Command**: `vitcompress study quick`" in how
    assert "- **Hardware**: Test CPU 9000" in how  # from the first ok row's env
    assert "- **PyTorch**: 2.14.1" in how
    assert "- **Dataset**: fashion-mnist" in how
    assert "batch size 16 with 2 CPU threads" in how
    assert "(10000 images)" in how
    assert "compare with **Vanilla ViT**" in how
    # meta beats env when both say something.
    how = _section(render_markdown(rows, meta={"hardware": "Given CPU"}), "How this was measured")
    assert "- **Hardware**: Given CPU" in how and "Test CPU 9000" not in how
    # The instruction sets the kernels pick between are named, AMX's absence on x86 included.
    for isa, shown in ((["avx2", "avx512f", "avx512_vnni"], "Test CPU 9000 (AVX512, avx2, avx512f, avx512_vnni, no AMX)"),
                       (["avx2", "amx_tile", "amx_int8"], "Test CPU 9000 (AVX512, avx2, amx_tile, amx_int8)"),
                       (["asimd", "i8mm"], "Test CPU 9000 (AVX512, asimd, i8mm)")):
        described = [dict(row, env=dict(row["env"], cpu_capability="AVX512", cpu_isa=isa)) for row in rows]
        assert f"- **Hardware**: {shown}" in _section(render_markdown(described), "How this was measured")


def test_markdown_details_table_and_optional_top5(rows: list[dict[str, Any]]) -> None:
    details = _table(_section(render_markdown(rows), "Details"))
    assert "Top-5 (%)" not in details["Vanilla ViT"]
    assert details["Vanilla ViT"]["Params (M)"] == "0.201"
    assert details["Vanilla ViT"]["MACs (M)"] == "12.35"
    assert details["Vanilla ViT"]["CPU img/s (batch 1)"] == "410.2"
    assert details["Vanilla ViT"]["Latency p50 (ms)"] == "2.40"
    assert details["Vanilla ViT"]["Latency p95 (ms)"] == "2.90"
    assert details["Pruned 50%"]["Compute time (s)"] == "120.5"

    rows[0]["top5"] = 99.5
    details = _table(_section(render_markdown(rows), "Details"))
    assert details["Vanilla ViT"]["Top-5 (%)"] == "99.50"
    assert details["Pruned 50%"]["Top-5 (%)"] == "—"


def test_markdown_reference_without_flag_and_failed_baseline(rows: list[dict[str, Any]]) -> None:
    # No flagged baseline: the first ok row is the reference.
    unflagged = [dict(row, baseline=False) for row in rows[1:]]
    table = _table(_section(render_markdown(unflagged), "Results"))
    assert table["Int8 \\| dynamic"]["Size ratio"] == "100.0%"
    assert table["Pruned 50%"]["CPU speed-up (×)"] == "0.75×"

    # A failed baseline: relative columns are empty rather than relative to another row.
    rows[0].update(status="failed", error="out of memory", top1=None, size_bytes=None, cpu_img_s=None)
    markdown = render_markdown(rows)
    table = _table(_section(markdown, "Results"))
    for cells in table.values():
        assert cells["Δ Acc (pt)"] == cells["CPU speed-up (×)"] == cells["Size ratio"] == "—"
    assert "baseline failed" in _section(markdown, "How this was measured")


def test_markdown_pareto_star_and_legend(rows: list[dict[str, Any]]) -> None:
    assert "★" not in render_markdown(rows)
    rows[1]["pareto"] = True
    markdown = render_markdown(rows)
    assert "Int8 \\| dynamic ★" in _table(_section(markdown, "Results"))
    assert "- **★**" in _section(markdown, "Legend")


def test_markdown_legend_explains_columns(rows: list[dict[str, Any]]) -> None:
    legend = _section(render_markdown(rows), "Legend")
    assert "bytes of the saved artifact file" in legend
    assert "same machine in the same run" in legend
    assert "integer kernels really executed" in legend


def _multi_runtime_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The baseline measured in eager PyTorch (50 img/s) and on OpenVINO bf16 (100 img/s), as the study stores it."""
    rows[0].update(cpu_img_s=100.0, runtime="openvino-cpu-bf16", runtimes={
        "torch-eager-cpu": {"cpu_img_s": 50.0, "int_arithmetic": False},
        "openvino-cpu-bf16": {"cpu_img_s": 100.0, "int_arithmetic": False},
        "onnxruntime": {"error": "RuntimeError: no session"},
    })
    rows[1].update(cpu_img_s=200.0)
    return rows


def test_speed_up_uses_the_baselines_fastest_float_runtime(rows: list[dict[str, Any]]) -> None:
    markdown = render_markdown(_multi_runtime_rows(rows))
    table = _table(_section(markdown, "Results"))
    base, int8 = table["Vanilla ViT"], table["Int8 \\| dynamic"]
    assert base["CPU speed-up (×)"] == "1.00×" and base[EAGER_COLUMN] == "2.00×"
    assert int8["CPU speed-up (×)"] == "2.00×" and int8[EAGER_COLUMN] == "4.00×"
    assert table["Pruned 50%"]["CPU speed-up (×)"] == "37.50×"  # 3750 / 100
    # The reference is named where the numbers are explained.
    how = _section(markdown, "How this was measured")
    assert "on **openvino-cpu-bf16**, the fastest float runtime" in how and "torch-eager-cpu" in how
    legend = _section(markdown, "Legend")
    assert "fastest float runtime (openvino-cpu-bf16)" in legend
    assert f"- **{EAGER_COLUMN}**: CPU speed / the baseline's speed in eager PyTorch" in legend
    headers = [line for line in _section(markdown, "Results").splitlines() if line.startswith("|")][0]
    assert headers.index("CPU speed-up (×)") < headers.index(EAGER_COLUMN) < headers.index("Size ratio")


def test_speed_up_reference_with_eager_only_has_no_eager_column(rows: list[dict[str, Any]]) -> None:
    rows[0]["runtimes"] = {"torch-eager-cpu": {"cpu_img_s": 2500.0, "int_arithmetic": False}}
    markdown = render_markdown(rows)
    table = _table(_section(markdown, "Results"))
    assert EAGER_COLUMN not in table["Vanilla ViT"]
    assert table["Int8 \\| dynamic"]["CPU speed-up (×)"] == "2.00×"
    how = _section(markdown, "How this was measured")
    assert "on **torch-eager-cpu**, the only runtime it was measured on" in how
    assert "measure.runtimes: [all]" in how


def test_speed_reference_counts_only_float_runtimes() -> None:
    # A compressed reference row: its integer runtime is not a float speed.
    row = {"steps": ["ptq.static"], "cpu_img_s": 300.0, "runtime": "onnxruntime-cpu", "runtimes": {
        "onnxruntime-cpu": {"cpu_img_s": 300.0, "int_arithmetic": True},
        "torch-eager-cpu": {"cpu_img_s": 80.0, "int_arithmetic": False},
        "torch-compile-cpu": {"cpu_img_s": 120.0, "int_arithmetic": False},
    }}
    ref = speed_reference(row)
    assert (ref.img_s, ref.runtime, ref.eager_img_s) == (120.0, "torch-compile-cpu", 80.0)
    assert set(ref.measured_on) == {"torch-eager-cpu", "torch-compile-cpu"}
    # A row without steps is float whatever a runtime claimed (old rows marked OpenVINO's u8 reorders as int).
    row = {"steps": [], "cpu_img_s": 100.0, "runtimes": {
        "openvino-cpu-bf16": {"cpu_img_s": 100.0, "int_arithmetic": True},
        "torch-eager-cpu": {"cpu_img_s": 40.0, "int_arithmetic": False}}}
    assert speed_reference(row).runtime == "openvino-cpu-bf16"
    # Rows written before runtimes existed: their own speed and runtime; no reference at all: nothing.
    assert speed_reference({"cpu_img_s": 10.0, "runtime": "torch-eager-cpu"}).img_s == 10.0
    assert speed_reference(None).img_s is None


# --------------------------------------------------------------------------- csv and terminal


def test_write_csv_round_trips_values(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    rows[0]["extra_key"] = "kept"
    path = tmp_path / "out" / "results.csv"
    write_csv(rows, path)
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        read = list(reader)
        header = reader.fieldnames or []
    for key in (
        "name",
        "method",
        "top1",
        "size_bytes",
        "cpu_img_s",
        "gpu_img_s",
        "runtime",
        "int_arithmetic",
    ):
        assert key in header
    assert header[-1] == "extra_key"
    assert [row["name"] for row in read] == [row["name"] for row in rows]
    for original, back in zip(rows[:3], read[:3], strict=True):
        assert float(back["top1"]) == original["top1"]
        assert int(back["size_bytes"]) == original["size_bytes"]
    assert read[1]["int_arithmetic"] == "true" and read[0]["int_arithmetic"] == "false"
    assert read[0]["gpu_img_s"] == ""
    assert json.loads(read[1]["steps"]) == ["int8_dynamic"]
    assert read[3]["status"] == "failed" and read[3]["error"] == "no GPU: TensorRT needs CUDA"


def test_notes_are_listed_under_the_table_in_markdown_and_terminal(rows: list[dict[str, Any]]) -> None:
    rows[2]["note"] = "one epoch on 10k images:\n a smoke row"
    markdown = render_markdown(rows)
    assert _section(markdown, "Notes").strip() == "- **Pruned 50%**: one epoch on 10k images: a smoke row"
    assert "one epoch" not in _section(markdown, "Results")
    assert "Pruned 50%: one epoch on 10k images: a smoke row" in str(render_terminal_table(rows).caption)
    del rows[2]["note"]
    assert "## Notes" not in render_markdown(rows)


def test_render_terminal_table_has_main_columns_and_ok_rows(rows: list[dict[str, Any]]) -> None:
    table = render_terminal_table(rows)
    headers = [str(column.header) for column in table.columns]
    # No GPU column without a GPU speed; the model (shared by every row) in the title.
    assert headers == ["Method", "Family", "Acc%", "Δpt", "img/s", "Speed", "MB", "Size", "Runtime", "Int"]
    assert str(table.title) == "vitcompress study (vit_quick)"
    assert table.row_count == 3
    methods = [str(cell) for cell in table.columns[0].cells]
    assert methods == ["Vanilla ViT", "Int8 | dynamic", "Pruned 50%"]
    assert [str(c) for c in table.columns[1].cells] == ["Baseline", "int8_dynamic", "Baseline"]  # unknown: as named
    assert [str(cell) for cell in table.columns[headers.index("Size")].cells][1] == "50.0%"
    assert "TensorRT int8" in str(table.caption)
    assert "CPU speed-up: vs Vanilla ViT on torch-eager-cpu" in str(table.caption)
    rows[1]["gpu_img_s"] = 1234.5
    assert "GPU/s" in [str(c.header) for c in render_terminal_table(rows).columns]


def test_terminal_table_fits_120_columns_without_wrapping_a_method_name() -> None:
    """The committed quick study (14 rows) and fashion-mnist study (40 rows), at 120 columns."""
    from rich.console import Console

    root = Path(__file__).resolve().parents[1] / "docs" / "results"
    for study in ("quick", "fashion-mnist"):
        rows = read_results(root / study / "results.jsonl")
        console = Console(width=120, record=True, file=io.StringIO())
        console.print(render_terminal_table(rows))
        lines = console.export_text().splitlines()
        assert max(len(line) for line in lines) <= 120, study
        body = "\n".join(lines)
        assert "…" not in body  # nothing cut short
        for row in rows:
            if row.get("status", "ok") == "ok":
                assert row["name"] in body, (study, row["name"])  # on one line: not wrapped


def test_method_family_names_the_chain() -> None:
    from vitcompress.report.table import method_family

    assert method_family({"baseline": True, "steps": []}) == "Baseline"
    row = {"steps": [{"method": "prune.structured"}, {"method": "ptq.static"}]}
    assert method_family(row) == "Pruning + Quantization (PTQ)" and method_family(row, short=True) == "Prune+PTQ"
    assert method_family({"steps": [{"method": "distill"}, {"method": "ptq.dynamic"}]}) == \
        "Knowledge Distillation + Quantization (PTQ)"


def test_render_terminal_table_names_the_speed_reference(rows: list[dict[str, Any]]) -> None:
    table = render_terminal_table(_multi_runtime_rows(rows))
    headers = [str(column.header) for column in table.columns]
    assert "×eager" in headers  # EAGER_COLUMN, shortened
    assert [str(c) for c in table.columns[headers.index("×eager")].cells][1] == "4.00×"
    assert "vs Vanilla ViT on openvino-cpu-bf16 (its fastest float runtime)" in str(table.caption)


# --------------------------------------------------------------------------- plots and write_report


def test_plot_uses_log_axis_only_for_wide_ranges(rows: list[dict[str, Any]]) -> None:
    assert _figure_accuracy_vs(rows, "size_mb").axes[0].get_xscale() == "linear"
    rows[2]["size_bytes"] = 40_000  # 20x smaller than the baseline
    ax = _figure_accuracy_vs(rows, "size_mb").axes[0]
    assert ax.get_xscale() == "log"
    assert "MB" in ax.get_xlabel() and "%" in ax.get_ylabel()
    fig = _figure_accuracy_vs(rows, "size_mb")
    numbers = {text.get_text() for text in fig.axes[0].texts}
    key = {text.get_text() for text in fig.axes[1].texts}
    assert numbers == {"1", "2", "3"}  # failed row has no point
    assert key == {" 1  Vanilla ViT", " 2  Int8 | dynamic", " 3  Pruned 50%"}
    with pytest.raises(ValueError, match="size_mb"):
        _figure_accuracy_vs(rows, "gpu")


def test_write_report_writes_all_files(rows: list[dict[str, Any]], tmp_path: Path) -> None:
    (tmp_path / "results.jsonl").write_text(
        "\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8"
    )
    paths = write_report(tmp_path, meta={"recipe": "quick"})

    assert paths["report"] == tmp_path / "report.md"
    assert paths["csv"] == tmp_path / "results.csv"
    assert paths["plots"] == [
        tmp_path / "plots" / "accuracy_vs_size.png",
        tmp_path / "plots" / "accuracy_vs_cpu_speed.png",
    ]
    for plot in paths["plots"]:
        data = plot.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 1024
    report = paths["report"].read_text(encoding="utf-8")
    assert report.startswith("# vitcompress study: quick\n")
    assert "](plots/accuracy_vs_size.png)" in report
    assert "](plots/accuracy_vs_cpu_speed.png)" in report
    with paths["csv"].open(encoding="utf-8", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4


@pytest.mark.parametrize("n", [14, 47])
def test_plot_numbers_never_overlap_at_14_or_47_rows(n: int) -> None:
    """Crowded studies: points in tight clusters (the quick demo has 14 rows, the fashion-mnist study 47)."""
    import random

    rng = random.Random(n)
    rows = [_row("Vanilla ViT", baseline=True, top1=90.0, size_bytes=2_000_000, cpu_img_s=3000.0)]
    centres = [(0.5e6, 89.5, 3000.0), (2.0e6, 89.9, 3300.0), (1.0e6, 86.0, 6000.0)]
    for i in range(n - 1):
        size, acc, speed = centres[i % len(centres)]
        rows.append(_row(f"Experiment number {i} with a long name", method="x", steps=[{"method": "ptq.static"}],
                         top1=acc + rng.uniform(-0.15, 0.15), size_bytes=size * rng.uniform(0.97, 1.03),
                         cpu_img_s=speed * rng.uniform(0.97, 1.03)))
    for x in ("size_mb", "cpu_img_s"):
        fig = _figure_accuracy_vs(rows, x)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax, key = fig.axes[:2]
        from matplotlib.text import Text

        boxes = []
        for t in ax.texts:  # the numbers, not their leader lines
            t.update_positions(renderer)
            boxes.append(Text.get_window_extent(t, renderer))
        assert len(boxes) == n
        inside = ax.get_window_extent(renderer)
        for i, a in enumerate(boxes):
            assert inside.x0 - 1 <= a.x0 and a.x1 <= inside.x1 + 1 and inside.y0 - 1 <= a.y0 and a.y1 <= inside.y1 + 1
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), (x, a, b)
        names = [t.get_text() for t in key.texts]
        assert len(names) == n and all(any(r["name"] in k for k in names) for r in rows)
