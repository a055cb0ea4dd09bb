"""End-to-end studies on a slice of real Fashion-MNIST: rows, resume, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_recipe_dict

from vitcompress.errors import VitcompressError
from vitcompress.report.table import read_results
from vitcompress.study import parse_recipe, run_study
from vitcompress.study.results import append_row, load_rows, repair_tail

pytestmark = pytest.mark.usefixtures("needs_fmnist")

ROW_KEYS = {"name", "method", "dataset", "model", "top1", "size_bytes", "params", "cpu_img_s", "cpu_img_s_b1",
            "gpu_img_s", "runtime", "int_arithmetic", "seconds"}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_study_writes_rows_artifacts_report_and_resumes(tmp_path, capsys) -> None:
    recipe = parse_recipe(tiny_recipe_dict())
    logs: list[str] = []
    res = run_study(recipe, tmp_path / "run", progress=False, log=logs.append)
    rows = _rows(tmp_path / "run")
    assert [r["name"] for r in rows] == ["Vanilla ViT", "Dynamic Quantization"]
    base, dyn = rows
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["status"] == "ok" and r["n_test"] == 256
        assert r["size_bytes"] == (tmp_path / "run" / r["artifact"]).stat().st_size
        assert r["cpu_img_s"] > 0
    assert base["top1"] > 20  # 2 short epochs on 512 images: well above chance (10%)
    assert base["int_arithmetic"] is False and dyn["int_arithmetic"] is True
    assert dyn["size_bytes"] < base["size_bytes"]
    assert abs(dyn["top1"] - base["top1"]) <= 5
    assert dyn["gpu_img_s"] is None  # no CUDA kernel for int8 dynamic Linear
    assert (tmp_path / "run" / "report.md").read_text().count("Dynamic Quantization") >= 1
    assert (tmp_path / "run" / "plots" / "accuracy_vs_size.png").stat().st_size > 1000
    assert res.report["report"].exists()
    # `vitcompress report` renders the same report from the run folder alone (title, command, Pareto marks).
    from vitcompress.cli import main

    before = {name: (tmp_path / "run" / name).read_text() for name in ("report.md", "results.csv")}
    assert "★" in before["report.md"] and "vitcompress study: " in before["report.md"]
    assert main(["report", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"report: {run / 'report.md'} and {run / 'report.html'} (plots in {run / 'plots'}/)")
    assert {name: (tmp_path / "run" / name).read_text() for name in before} == before
    # ... and from a copy without its artifacts, as committed under docs/results/.
    (tmp_path / "copy").mkdir()
    for name in ("results.jsonl", "run.json"):
        (tmp_path / "copy" / name).write_text((tmp_path / "run" / name).read_text())
    assert main(["report", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "report.md").read_text() == before["report.md"]

    # Resume: nothing re-runs, the artifacts are not rewritten.
    arts = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "artifacts").rglob("model.safetensors")}
    logs.clear()
    run_study(recipe, tmp_path / "run", progress=False, log=logs.append)
    assert len(_rows(tmp_path / "run")) == 2
    assert sum("already measured" in m for m in logs) == 2
    assert arts == {p: p.stat().st_mtime_ns for p in arts}

    # A new experiment in the recipe: only it runs, reusing the saved baseline.
    d = tiny_recipe_dict()
    d["experiments"].append({"name": "Per-tensor", "steps": [{"ptq.dynamic": {"per_channel": False}}]})
    logs.clear()
    run_study(parse_recipe(d), tmp_path / "run", progress=False, log=logs.append)
    assert [r["name"] for r in _rows(tmp_path / "run")] == ["Vanilla ViT", "Dynamic Quantization", "Per-tensor"]
    assert not any("training baseline" in m for m in logs)

    # A note added to the recipe reaches the finished row and the report without re-running it.
    d["experiments"][0]["note"] = "per-channel weight scales"
    logs.clear()
    run_study(parse_recipe(d), tmp_path / "run", progress=False, log=logs.append)
    assert sum("already measured" in m for m in logs) == 3
    assert {r["name"]: r.get("note") for r in _rows(tmp_path / "run")} == {
        "Vanilla ViT": None, "Dynamic Quantization": "per-channel weight scales", "Per-tensor": None}
    assert "- **Dynamic Quantization**: per-channel weight scales" in (tmp_path / "run" / "report.md").read_text()


def test_run_dir_of_another_baseline_is_refused(tmp_path) -> None:
    run_study(parse_recipe(tiny_recipe_dict(experiments=[])), tmp_path / "run", progress=False, log=lambda m: None)
    d = tiny_recipe_dict(experiments=[], seed=1)
    with pytest.raises(VitcompressError, match="--out NEW_DIR"):
        run_study(parse_recipe(d), tmp_path / "run", progress=False, log=lambda m: None)


def _ok_row(name: str) -> dict:
    return {"name": name, "status": "ok", "steps": [], "artifact": f"artifacts/{name}/model.safetensors",
            "top1": 50.0, "size_bytes": 10, "cpu_img_s": 1.0}


def test_truncated_last_row_is_repaired_before_the_next_append(tmp_path) -> None:
    path = tmp_path / "results.jsonl"
    append_row(path, _ok_row("a"))
    with open(path, "ab") as f:
        f.write(b'{"name": "b", "sta')  # killed mid-write
    with pytest.warns(RuntimeWarning):
        assert [r["name"] for r in load_rows(path)] == ["a"]
    assert repair_tail(path)
    append_row(path, _ok_row("c"))
    assert [json.loads(x)["name"] for x in path.read_text().splitlines()] == ["a", "c"]
    assert (tmp_path / "results.jsonl.bad").read_text() == '{"name": "b", "sta\n'  # kept, not deleted


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "vitcompress", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_mid_study_then_rerun_gives_every_row_once(tmp_path, seed) -> None:
    import random

    rng = random.Random(seed)
    d = tiny_recipe_dict()
    d["baseline"]["train"]["epochs"] = 3
    d["experiments"].append({"name": "Per-tensor", "steps": [{"ptq.dynamic": {"per_channel": False}}]})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(d))
    run = tmp_path / "run"
    args = ("study", str(recipe), "--out", str(run), "--no-progress")
    results = run / "results.jsonl"
    n_rows = lambda: results.read_text().count("\n") if results.exists() else 0  # noqa: E731
    # Kill points: during training (after its first checkpoint), during measurement or the results write
    # (after the first row), and at random moments in between.
    moments = [
        lambda: bool(list(run.glob("artifacts/*/work/train/train_state.pt"))),
        lambda: n_rows() >= 1,
    ]
    kills = 0
    for when in moments:
        p = _cli(*args)
        start = time.time()
        delay = rng.uniform(0.0, 3.0)  # a random extra moment past the trigger
        while time.time() - start < 300 and p.poll() is None and not when():
            time.sleep(0.02)
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        for line in (results.read_text().splitlines() if results.exists() else [])[:-1]:
            json.loads(line)  # every complete line is a whole row
    assert kills >= 1
    out = subprocess.run([sys.executable, "-m", "vitcompress", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = _rows(run)
    names = [r["name"] for r in rows]
    assert sorted(names) == sorted(["Vanilla ViT", "Dynamic Quantization", "Per-tensor"])
    assert all(r["status"] == "ok" for r in rows)


def test_same_recipe_and_seed_give_identical_accuracy_and_size(tmp_path) -> None:
    recipe = parse_recipe(tiny_recipe_dict())
    a = run_study(recipe, tmp_path / "a", progress=False, log=lambda m: None).rows
    b = run_study(recipe, tmp_path / "b", progress=False, log=lambda m: None).rows
    key = ("name", "top1", "size_bytes", "params", "macs")
    assert [tuple(r[k] for k in key) for r in a] == [tuple(r[k] for k in key) for r in b]
    for art_a, art_b in zip(sorted((tmp_path / "a").rglob("model.safetensors")),
                            sorted((tmp_path / "b").rglob("model.safetensors"))):
        assert art_a.read_bytes() == art_b.read_bytes()


def test_a_diverging_experiment_becomes_a_failed_row_and_the_study_goes_on(tmp_path, monkeypatch) -> None:
    """NaN in training (the real loop's check) and NaN weights out of a step: failed rows; the rest runs."""
    import copy
    import dataclasses

    import torch
    import torch.nn.functional as F

    from vitcompress.methods import get_method
    from vitcompress.methods.registry import METHODS, StepOutput
    from vitcompress.report import render_terminal_table

    def nan_training(model, cfg, ctx):  # a training step whose loss turns NaN at its first step
        result = ctx.fit(copy.deepcopy(model), loss_fn=lambda m, x, y: F.cross_entropy(m(x), y) * float("nan"),
                         epochs=1)
        return StepOutput(result.model, {})

    merge = get_method("tokens.merge")

    def nan_weights(model, cfg, ctx):  # a step that hands back NaN weights without training
        out = merge.apply(model, cfg, ctx)
        with torch.no_grad():
            out.model.head.weight.fill_(float("inf"))
        return out

    monkeypatch.setitem(METHODS, "train", dataclasses.replace(get_method("train"), apply=nan_training))
    monkeypatch.setitem(METHODS, "tokens.merge", dataclasses.replace(merge, apply=nan_weights))
    d = tiny_recipe_dict()
    d["experiments"] = [
        {"name": "Diverges", "steps": [{"train": {"student": "input"}}]},
        {"name": "Infinite head", "steps": [{"tokens.merge": {"r": 2}}]},
        *d["experiments"],
    ]
    logs: list[str] = []
    res = run_study(parse_recipe(d), tmp_path / "run", progress=False, log=logs.append)
    rows = {r["name"]: r for r in _rows(tmp_path / "run")}
    assert list(rows) == ["Vanilla ViT", "Diverges", "Infinite head", "Dynamic Quantization"]
    assert rows["Vanilla ViT"]["status"] == rows["Dynamic Quantization"]["status"] == "ok"
    diverged, inf = rows["Diverges"], rows["Infinite head"]
    assert diverged["status"] == inf["status"] == "failed"
    assert "loss became nan" in diverged["error"] and "learning rate" in diverged["error"]
    assert "non-finite" in inf["error"] and "tokens.merge" in inf["error"]
    assert all("\n" not in r["error"] for r in (diverged, inf))
    # Nothing broken is saved: a re-run tries the step again instead of loading it.
    assert len(list((tmp_path / "run" / "artifacts").glob("*/model.safetensors"))) == 2
    report = res.report["report"].read_text()
    assert "## Failed experiments" in report and "loss became nan" in report and "non-finite" in report
    assert sum("FAILED" in m for m in logs) == 2
    render_terminal_table(res.rows)  # the CLI's table renders failed rows too


def test_rows_with_non_finite_numbers_are_caught_before_the_results_file() -> None:
    from vitcompress.study.runner import _non_finite

    row = {"top1": 50.0, "cpu_img_s": float("nan"), "error": None, "runtimes": {"eager": {"p50": float("inf")}}}
    assert _non_finite(row) == ["cpu_img_s", "runtimes.eager.p50"]
    assert _non_finite({"top1": 1.0, "runtimes": {"eager": {"p50": 2.0}}}) == []


def test_speed_pass_anchors_on_the_baselines_fastest_runtime_when_it_ran_in_several(tmp_path) -> None:
    d = tiny_recipe_dict(experiments=[{"name": "Dynamic Quantization", "steps": [{"ptq.dynamic": {}}]}])
    d["measure"]["runtimes"] = ["torch-eager", "onnxruntime"]
    run_study(parse_recipe(d), tmp_path / "run", progress=False, log=lambda m: None)
    rows = {r["name"]: r for r in read_results(tmp_path / "run" / "results.jsonl")}
    base, row = rows["Vanilla ViT"], rows["Dynamic Quantization"]
    assert set(base["runtimes"]) == {"torch-eager-cpu", "onnxruntime-cpu"}
    anchor = base["timing"]["anchor"]
    assert anchor in base["runtimes"] and row["timing"]["anchor"] == anchor
    for r in (base, row):
        for entry in r["runtimes"].values():
            if "error" in entry:
                continue
            paired = entry["speedup_paired"]
            assert set(paired) == set(base["runtimes"])  # a speed-up against each of the baseline's runtimes
            assert all(0 < p["q25"] <= p["median"] <= p["q75"] for p in paired.values())
    assert base["runtimes"][anchor]["speedup_paired"][anchor] == {"q25": 1.0, "median": 1.0, "q75": 1.0}


def test_speed_pass_retimes_rows_interleaved_with_the_baseline(tmp_path) -> None:
    from vitcompress.report.table import (
        SpeedReference,
        main_cells,
        main_columns,
        same_round_reference,
        speed_reference,
    )
    from vitcompress.study.retime import needs_retime

    d = tiny_recipe_dict(experiments=[
        {"name": "Dynamic Quantization", "steps": [{"ptq.dynamic": {}}]},
        {"name": "Static int8", "steps": [{"ptq.static": {}}]},
    ])
    d["measure"]["interleave_group"] = 2  # each row in its own round with the baseline
    log: list[str] = []
    res = run_study(parse_recipe(d), tmp_path / "run", progress=False, log=log.append)
    assert sum("speed pass, group" in line for line in log) == 2
    rows = {r["name"]: r for r in read_results(tmp_path / "run" / "results.jsonl")}
    assert len(rows) == 3 and not needs_retime(list(rows.values()))
    base = rows["Vanilla ViT"]
    for name in ("Dynamic Quantization", "Static int8"):
        row = rows[name]
        timing = row["timing"]
        assert timing["mode"] == "interleaved" and set(timing["baseline_img_s"]) == set(base["runtimes"])
        assert timing["anchor"] == base["timing"]["anchor"] == "torch-eager-cpu"  # the baseline's reference
        assert row["cpu_img_s"] == row["runtimes"][row["runtime"]]["cpu_img_s"] > 0
        assert row["cpu_img_s_isolated"] > 0 and row["cpu_img_s"] != row["cpu_img_s_isolated"]
        # The report's speed-up divides by the baseline's speed from the row's own round.
        ref = same_round_reference(row, speed_reference(base))
        assert ref == SpeedReference(timing["baseline_img_s"]["torch-eager-cpu"], "torch-eager-cpu",
                                     ("torch-eager-cpu",), None)
        # ... as the median of the round-by-round ratios, with their quartiles beside it.
        paired = row["speedup_paired"]
        assert set(paired) == set(base["runtimes"]) and paired == row["runtimes"][row["runtime"]]["speedup_paired"]
        q25, median, q75 = (paired["torch-eager-cpu"][k] for k in ("q25", "median", "q75"))
        assert 0 < q25 <= median <= q75
        headers = [h for h, _ in main_columns(speed_reference(base))]
        assert main_cells(row, base)[headers.index("CPU speed-up (×)")] == f"{median:.2f}×"
    assert {rows[n]["timing"]["group"] for n in ("Dynamic Quantization", "Static int8")} == {0, 1}
    assert rows["Static int8"]["runtime"] == "onnxruntime-cpu"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Static int8" in report and len(res.rows) == 3
    assert "Speed-up IQR (×)" in report and "**Speed-up IQR (×)**" in report  # the column and its legend
    # A resumed run with nothing new keeps the numbers: no second speed pass.
    log.clear()
    run_study(parse_recipe(d), tmp_path / "run", progress=False, log=log.append)
    assert not any("speed pass" in line for line in log)
    assert read_results(tmp_path / "run" / "results.jsonl") == list(rows.values())


def test_progress_line_paces_the_time_left_on_the_rows_not_the_baseline(monkeypatch) -> None:
    from vitcompress.study import runner

    clock = iter([0.0, 0.0, 300.0, 310.0, 320.0])  # baseline trains 300 s, then rows of 10 s each
    monkeypatch.setattr(runner.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    progress = runner._Progress(4, lines.append)
    progress.start("Vanilla ViT", baseline=True)
    progress.start("row 1")
    progress.start("row 2")
    progress.start("row 3")
    assert lines[0] == "▶ [1/4] Vanilla ViT  (0m00s elapsed)"
    assert lines[1] == "▶ [2/4] row 1  (5m00s elapsed)"  # no pace yet: nothing after the baseline has finished
    # One row took 10 s; two experiments are left counting this one: ~20 s (the baseline's 300 s would say ~8 min).
    assert lines[2] == "▶ [3/4] row 2  (5m10s elapsed, ~0m20s left)"
    assert lines[3] == "▶ [4/4] row 3  (5m20s elapsed, ~0m10s left)"
