"""Experiment tracking: a tiny study logged to TensorBoard and MLflow, read back by their own readers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import tiny_recipe_dict

from vitcompress.study import parse_recipe, run_study

pytestmark = pytest.mark.usefixtures("needs_fmnist")


def test_a_tiny_study_logged_to_tensorboard_and_mlflow_reads_back(tmp_path, monkeypatch) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    d = tiny_recipe_dict(tracking={"log_with": ["tensorboard", "mlflow"], "val_images": 64})
    d["experiments"].append({"name": "Pruned (r=0.2)", "steps": [{"prune.structured": {
        "ratio": 0.2, "importance": "magnitude", "finetune_epochs": 1, "finetune_subset": 128}}]})
    res = run_study(parse_recipe(d), tmp_path / "run", progress=False, log=lambda m: None)
    assert all(r["status"] == "ok" for r in res.rows)
    steps_per_epoch = 512 // 64  # train_subset 512, batch 64

    # TensorBoard: the event files, read by TensorBoard's own accumulator.
    runs = list((tmp_path / "run" / "tracking" / "tensorboard").iterdir())
    assert len(runs) == 1
    acc = event_accumulator.EventAccumulator(str(runs[0]), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    loss = acc.Scalars("train/baseline/loss")
    assert [e.step for e in loss] == list(range(1, 2 * steps_per_epoch + 1))  # 2 epochs, every step
    assert len(acc.Scalars("train/baseline/lr")) == 2 * steps_per_epoch
    assert [e.step for e in acc.Scalars("val/baseline/top1")] == [1, 2]
    assert all(0 <= e.value <= 100 for e in acc.Scalars("val/baseline/top1"))
    from vitcompress.track import metric_name

    pruned = metric_name("Pruned (r=0.2)")  # "Pruned _r_0.2_": what every tracker accepts in a name
    finetune = [t for t in tags if t.startswith(f"train/{pruned}/") and t.endswith("/loss")]
    assert len(finetune) == 1 and len(acc.Scalars(finetune[0])) == 128 // 64  # the fine-tune's own steps
    rows = {r["name"]: r for r in res.rows}
    top1 = acc.Scalars("row/Dynamic Quantization/top1")
    assert len(top1) == 1 and top1[0].value == pytest.approx(rows["Dynamic Quantization"]["top1"])
    assert {"row/Vanilla ViT/size_mb", "row/Vanilla ViT/cpu_img_s", f"row/{pruned}/cpu_speedup"} <= tags
    # The speed-ups logged are the report's CPU speed-up column, row by row.
    from vitcompress.report.table import main_cells, main_columns, reference_row, speed_reference

    reference = reference_row(res.rows)
    column = [h for h, _ in main_columns(speed_reference(reference))].index("CPU speed-up (×)")
    for name in ("Vanilla ViT", "Dynamic Quantization", "Pruned (r=0.2)"):
        shown = main_cells(rows[name], reference)[column]
        logged = acc.Scalars(f"row/{metric_name(name)}/cpu_speedup")[0].value
        assert f"{logged:.2f}×" == shown, (name, logged, shown)

    # MLflow: the runs, found by mlflow.search_runs in the run folder's store.
    mlflow.set_tracking_uri(f"sqlite:///{(tmp_path / 'run' / 'tracking' / 'mlflow.db').resolve()}")
    found = mlflow.search_runs(experiment_names=["tiny"])
    assert len(found) == 1
    run = found.iloc[0]
    assert run["params.baseline/model"] == "vitc_micro" and run["params.seed"] == "0"
    assert run["metrics.row/Vanilla ViT/top1"] == pytest.approx(rows["Vanilla ViT"]["top1"])
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(run["run_id"], "train/baseline/loss")
    assert sorted(m.step for m in history) == list(range(1, 2 * steps_per_epoch + 1))
    assert len(client.get_metric_history(run["run_id"], "val/baseline/top1")) == 2


def test_tracking_off_logs_nothing_and_imports_nothing(tmp_path) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path.parent.parent)!r})
        from conftest import tiny_recipe_dict
        from vitcompress.study import parse_recipe, run_study
        run_study(parse_recipe(tiny_recipe_dict()), {str(tmp_path / "run")!r}, progress=False, log=lambda m: None)
        loaded = [m for m in ("tensorboard", "mlflow", "wandb", "torch.utils.tensorboard") if m in sys.modules]
        print("LOADED", loaded)
    """)
    tests = __import__("pathlib").Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", script.replace(repr(str(tmp_path.parent.parent)), repr(str(tests)))],
                         capture_output=True, text=True, timeout=300)
    assert "LOADED []" in out.stdout, out.stdout + out.stderr[-1000:]
    assert not (tmp_path / "run" / "tracking").exists()
