"""``vitcompress bench`` and the runtime facts it reports: JSON shape, finite numbers, int8 on the runtimes."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FMNIST, synthetic_train_set
from onnx_checks import assert_int8_initializers_are_ours

from vitcompress.artifact import load_artifact, save_artifact
from vitcompress.cli import main
from vitcompress.config import to_dict
from vitcompress.export.onnx import OnnxRunner, export_onnx, parity
from vitcompress.measure import count_macs
from vitcompress.measure.bench import BenchConfig, load_target, run_bench
from vitcompress.measure.runtimes import deploy
from vitcompress.methods import get_method
from vitcompress.methods.quant.static import StaticQuantConfig
from vitcompress.models import ModelSpec, create_model
from vitcompress.study.context import StepContext
from vitcompress.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
# Tiny and short: these check the plumbing and the numbers' sanity, not the speed.
FAST = ["--threads", "1", "--repeats", "2", "--warmup", "1", "--latency-samples", "3",
        "--min-repeat-seconds", "0", "--no-progress"]


@pytest.fixture(scope="module")
def static_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ptq.static vitc_micro saved the way the study saves it (model.safetensors + meta.json)."""
    torch.manual_seed(0)
    spec = ModelSpec("vitc_micro")
    model = create_model(spec).eval()
    work = tmp_path_factory.mktemp("static")
    ctx = StepContext(synthetic_train_set(), 28, 1, 10, 0, work / "work", TrainConfig(mixed_precision="no"),
                      calib_images=64, progress=False)
    cfg = StaticQuantConfig()
    out = get_method("ptq.static").apply(model, cfg, ctx)
    art = work / "artifacts" / "static"
    meta = {"model": spec.to_dict(), "steps": [{"method": "ptq.static", "config": to_dict(cfg), "meta": out.meta}],
            "seconds": 0.0, "macs": count_macs(model, torch.zeros(1, 1, 28, 28))}
    save_artifact(out.model, art, meta)
    return art


def _finite_numbers(value: Any) -> list[float]:
    """Every number in a JSON value, recursively."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    items = value.values() if isinstance(value, dict) else value
    return [n for item in items for n in _finite_numbers(item)]


def _check_result(result: dict[str, Any], batch_sizes: list[int]) -> None:
    for key in ("target", "kind", "model", "img_size", "in_chans", "num_classes", "params", "macs", "config",
                "runtimes", "skipped", "fastest", "env"):
        assert key in result, key
    assert all(math.isfinite(n) for n in _finite_numbers(result))
    ran = [e for e in result["runtimes"] if not e["error"]]
    assert ran
    for e in ran:
        assert e["latency_ms_p95"] >= e["latency_ms_p50"] > 0
        assert [b["batch_size"] for b in e["batches"]] == batch_sizes
        for b in e["batches"]:
            assert b["img_s"] > 0 and len(b["seconds_per_call"]) == result["config"]["repeats"]
            # images/s is the batch over the median seconds per call.
            assert b["img_s"] == pytest.approx(b["batch_size"] / np.median(b["seconds_per_call"]))
        assert set(e["parity"]) == {"top1_agreement", "max_abs_logit_err", "cosine"}
        assert isinstance(e["int_arithmetic"], bool)
    assert set(result["fastest"]) == {str(b) for b in batch_sizes}


def test_bench_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--runtimes", "--batch-sizes", "--threads", "--repeats", "--warmup", "--json", "--device",
                 "--checkpoint", "--img-size", "--in-chans", "--num-classes", "--no-progress"):
        assert flag in text


def test_bench_timm_preset_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    code = main(["bench", "vitc_micro", "--runtimes", "torch-eager,onnxruntime", "--batch-sizes", "1,4",
                 "--json", str(out), *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    assert "torch-eager-cpu" in printed and "onnxruntime-cpu" in printed and f"json: {out}" in printed
    result = json.loads(out.read_text())
    _check_result(result, [1, 4])
    assert result["kind"] == "timm" and (result["img_size"], result["in_chans"], result["num_classes"]) == (28, 1, 10)
    assert result["size_bytes"] is None and result["macs"] > 0
    by = {e["runtime"]: e for e in result["runtimes"]}
    assert set(by) == {"torch-eager-cpu", "onnxruntime-cpu"}
    # Eager is its own reference; a float ONNX export follows it to float rounding.
    eager = by["torch-eager-cpu"]["parity"]
    assert (eager["top1_agreement"], eager["max_abs_logit_err"]) == (1.0, 0.0)
    assert eager["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert by["onnxruntime-cpu"]["parity"]["max_abs_logit_err"] < 1e-4
    assert not by["onnxruntime-cpu"]["int_arithmetic"] and not by["torch-eager-cpu"]["int_arithmetic"]


def test_bench_timm_shape_flags() -> None:
    target = load_target("vitc_micro", img_size=56, in_chans=3, num_classes=5)
    assert (target.img_size, target.in_chans, target.num_classes) == (56, 3, 5)
    assert target.model(torch.zeros(2, 3, 56, 56)).shape == (2, 5)


def test_bench_artifact_runs_int8_on_onnxruntime(static_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", str(static_artifact), "--batch-sizes", "1,8", "--json", str(out), *FAST]) == 0
    result = json.loads(out.read_text())
    _check_result(result, [1, 8])
    assert result["kind"] == "artifact" and result["model"] == "vitc_micro + ptq.static"
    assert result["size_bytes"] == (static_artifact / "model.safetensors").stat().st_size
    # "auto" measures a QDQ model where it deploys: ONNX Runtime, with integer matmuls.
    (entry,) = result["runtimes"]
    assert entry["runtime"] == "onnxruntime-cpu" and entry["int_arithmetic"]
    assert entry["info"]["integer_ops"]["MatMulIntegerToFloat"] == 9  # every Linear of vitc_micro
    assert entry["parity"]["top1_agreement"] >= 0.9 and entry["parity"]["cosine"] >= 0.99


def test_loaded_int8_artifact_exports_int8_initializers(static_artifact: Path, tmp_path: Path) -> None:
    # tests/test_export.py checks this on a model in memory; here the model comes back from the saved files.
    model = load_artifact(static_artifact)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    path = export_onnx(model, x[:2], tmp_path / "q.onnx")
    assert len(assert_int8_initializers_are_ours(path, model)) == 9 + 1  # Linear layers and the patch projection
    par = parity(model, OnnxRunner(path, threads=1), x)
    with torch.no_grad():
        scale = float(model(x).abs().max())
    assert par["cosine"] >= 0.99 and par["max_abs_logit_err"] < 0.05 * scale


def test_bench_runtime_that_cannot_run_is_reported_and_others_go_on() -> None:
    from vitcompress.measure.bench import BenchTarget

    torch.manual_seed(0)
    model = create_model(ModelSpec("vitc_micro")).eval()
    dynamic = get_method("ptq.dynamic").apply(model, get_method("ptq.dynamic").config_cls(), None).model
    target = BenchTarget(dynamic, "vitc_micro + ptq.dynamic", "timm", "test", 28, 1, 10)
    cfg = BenchConfig(runtimes=("torch-eager", "onnxruntime"), batch_sizes=(2,), threads=1, repeats=1, warmup=0,
                      min_repeat_seconds=0.0, latency_samples=2)
    result = run_bench(target, cfg)
    eager, ort = result["runtimes"]
    assert eager["error"] is None and eager["int_arithmetic"]  # torch.ao dynamic int8 kernels
    # torch.ao's quantized modules do not export to ONNX: one line that says so and what to use instead.
    assert ort["error"].startswith("RuntimeError: PyTorch's int8 modules (ptq.dynamic) have no ONNX export")
    assert "ptq.static" in ort["error"] and "\n" not in ort["error"]
    assert result["fastest"] == {"2": "torch-eager-cpu"}


@pytest.mark.skipif(not HAS_OPENVINO, reason="OpenVINO not installed (pip install 'vitcompress[openvino]')")
def test_openvino_int_arithmetic_only_for_integer_layers(static_artifact: Path, tmp_path: Path) -> None:
    x = torch.randn(4, 1, 28, 28)
    torch.manual_seed(0)
    float_dep = deploy("openvino", create_model(ModelSpec("vitc_micro")).eval(), x, 1, tmp_path / "f")
    # A float model's execution graph holds u8 constants and reorders; they are no integer arithmetic.
    assert not float_dep.int_arithmetic and float_dep.info["integer_layers"] == {}
    q = load_artifact(static_artifact)
    q_dep = deploy("openvino", q, x, 1, tmp_path / "q")
    assert q_dep.int_arithmetic and q_dep.info["integer_layers"].get("FullyConnected") == 9
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(q_dep.fn(x), q(x), dim=-1)
    assert float(cos.min()) > 0.98  # our scales, executed by OpenVINO in int8 (bf16 float parts)


@pytest.mark.skipif(not HAS_OPENVINO, reason="OpenVINO not installed (pip install 'vitcompress[openvino]')")
def test_openvino_compiles_per_input_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vitcompress.measure import runtimes

    monkeypatch.setattr(runtimes, "STATIC_SHAPES", 2)
    torch.manual_seed(0)
    model = create_model(ModelSpec("vitc_micro")).eval()
    x = torch.randn(5, 1, 28, 28)
    dep = runtimes.deploy_openvino(runtimes._export(model, x, tmp_path), 1, precision="f32")
    import openvino as ov

    compiles = []
    original = ov.Core.compile_model
    monkeypatch.setattr(ov.Core, "compile_model", lambda self, *a, **k: compiles.append(1) or original(self, *a, **k))
    with torch.inference_mode():
        want = model(x)
        for batch in (5, 3, 5, 1, 3):  # shapes 5 and 3 get their own compilation; 1 runs on the dynamic one
            assert torch.allclose(dep.fn(x[:batch]), want[:batch], atol=1e-4)
    assert len(compiles) == 2


def test_cached_onnx_export_is_redone_when_the_code_that_wrote_it_changed(tmp_path: Path) -> None:
    from vitcompress.measure import runtimes

    model, x = create_model(ModelSpec("vitc_micro")).eval(), torch.randn(2, 1, 28, 28)
    path = runtimes._export(model, x, tmp_path)
    first = path.stat().st_mtime_ns
    assert runtimes._export(model, x, tmp_path) == path and path.stat().st_mtime_ns == first  # reused
    (tmp_path / "model.onnx.code").write_text("written-by-another-version\n")
    os.utime(path, ns=(first - 10**9, first - 10**9))
    runtimes._export(model, x, tmp_path)
    assert path.stat().st_mtime_ns > first - 10**9
    assert (tmp_path / "model.onnx.code").read_text().split()[0] == runtimes.code_fingerprint()


def test_cached_onnx_export_is_redone_for_another_model_in_the_same_folder(tmp_path: Path) -> None:
    # benchmarks/student_speed.py deployed new layouts into the folders of an earlier run's (l0, l1, ...)
    # and timed the earlier run's exports: the cache must know the model, not only the code.
    import onnxruntime as ort

    from vitcompress.measure import runtimes

    x = torch.randn(2, 1, 28, 28)
    torch.manual_seed(0)
    narrow = create_model(ModelSpec("vitc_micro")).eval()
    wide = create_model(ModelSpec("vitc_micro", kwargs={"embed_dim": 64})).eval()
    twin = create_model(ModelSpec("vitc_micro")).eval()  # same layout as `narrow`, other weights
    for model in (narrow, wide, twin):
        path = runtimes._export(model, x, tmp_path)
        got = ort.InferenceSession(str(path)).run(None, {"images": x.numpy()})[0]
        assert torch.allclose(torch.from_numpy(got), model(x), atol=1e-4)
    mtime = path.stat().st_mtime_ns
    assert runtimes._export(twin, x, tmp_path) == path and path.stat().st_mtime_ns == mtime  # same model: reused


def test_bench_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["bench", "vitc_micro", "--runtimes", "tensorrt"], "unknown runtime tensorrt"),
        (["bench", "vitc_micro", "--batch-sizes", "1,x"], "--batch-sizes takes comma-separated integers"),
        (["bench", "no_such_model_xyz"], "unknown model"),
        (["bench", str(tmp_path / "missing" / "art")], "no artifact folder"),
        (["bench", str(tmp_path)], "is not a vitcompress artifact"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_bench_cuda_is_skipped_cleanly_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: test_bench_on_cuda measures the GPU path instead")
    # Asked for CUDA only: a one-line error that says what to do.
    assert main(["bench", "vitc_micro", "--device", "cuda", *FAST]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu" in err and err.count("\n") == 1
    # Asked for CUDA where present: the CPU is measured and the skip is recorded with its reason.
    out = tmp_path / "auto.json"
    assert main(["bench", "vitc_micro", "--device", "auto", "--batch-sizes", "2", "--json", str(out), *FAST]) == 0
    result = json.loads(out.read_text())
    assert [s["device"] for s in result["skipped"]] == ["cuda"]
    assert "CUDA is not available" in result["skipped"][0]["reason"]
    assert {e["device"] for e in result["runtimes"]} == {"cpu"}
    assert "skipped cuda" in capsys.readouterr().out


def test_bench_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the GPU path runs only where torch.cuda.is_available()")
    cfg = BenchConfig(runtimes=("torch-eager", "onnxruntime"), batch_sizes=(1, 8), repeats=2, warmup=1,
                      latency_samples=3, min_repeat_seconds=0.0, device="cuda")
    result = run_bench(load_target("vitc_micro"), cfg)
    _check_result(result, [1, 8])
    by = {e["requested"]: e for e in result["runtimes"]}
    assert by["torch-eager"]["runtime"] == "torch-eager-cuda" and not by["torch-eager"]["int_arithmetic"]
    assert by["torch-eager"]["parity"]["cosine"] > 0.999
    assert "CPU only" in by["onnxruntime"]["error"]


# ---- benchmarks/cpu_int8.py ----------------------------------------------------------------------------------
CPU_INT8 = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_int8.py"


def test_cpu_int8_benchmark_help() -> None:
    done = subprocess.run([sys.executable, str(CPU_INT8), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--models", "--paths", "--ours", "--batch", "--threads", "--repeats", "--prune-ratio",
                 "--gemm-shapes", "--out"):
        assert flag in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="Fashion-MNIST not installed")
def test_cpu_int8_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "int8.json"
    paths = ["eager-fp32", "torch-dynamic-int8", "ort-dynamic-int8", "ours-int8", "pruned-ours-int8"]
    if HAS_OPENVINO:
        paths += ["ov-fp32", "ov-bf16"] + (["ov-nncf-int8"] if importlib.util.find_spec("nncf") else [])
    if importlib.util.find_spec("torchao"):  # the bench extra: torchao's dynamic int8, eager and compiled
        paths.append("torchao-dynamic-int8")
    cmd = [sys.executable, str(CPU_INT8), "--models", "vitc_micro", "--paths", ",".join(paths), "--ours", "static",
           "--batch", "4", "--repeats", "1", "--warmup", "1", "--latency-samples", "3", "--min-repeat-seconds", "0",
           "--threads", "1", "--calib-images", "32", "--eval-images", "16", "--gemm-shapes", "128x128x128",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| model | eager-fp32 |" in done.stdout and "| vitc_micro |" in done.stdout
    result = json.loads(out.read_text())
    assert result["int8_limit"]["gemm_gops"] > 0 and result["int8_limit"]["best"]["int_arithmetic"]
    (model,) = result["models"]
    assert model["weights"] == "random init" and model["errors"] == {}
    assert 0.15 < model["pruned"]["removed_fraction"] < 0.3
    rows = model["rows"]
    assert {r["path"] for r in rows} == set(paths)
    # ours and pruned-ours: one row per runtime, the fastest marked.
    assert sum(r["path"] == "ours-int8" for r in rows) == (2 if HAS_OPENVINO else 1)
    assert sum(r["best_of_path"] for r in rows if r["path"] == "ours-int8") == 1
    for r in rows:
        assert r["img_s"] > 0 and r["latency_ms_p50"] > 0 and math.isfinite(r["cosine_vs_fp32"]), r["name"]
        assert r["x_limit"] == pytest.approx(r["img_s"] / r["int8_limit_img_s"])
        if "int8" in r["path"]:
            assert r["int_arithmetic"], r["name"]
        else:
            assert not r["int_arithmetic"], r["name"]  # float deployments, OpenVINO bf16 included
        if r["path"] == "eager-fp32":
            assert r["cosine_vs_fp32"] == pytest.approx(1.0) and r["top1_agreement_vs_fp32"] == 1.0
        elif r["path"] != "pruned-ours-int8":  # pruned without fine-tune: a speed row, its logits move
            assert r["cosine_vs_fp32"] > 0.99, r["name"]
    if "ov-nncf-int8" in paths:
        nncf = next(r for r in rows if r["path"] == "ov-nncf-int8")
        assert nncf["x_nncf"] == pytest.approx(1.0)
        assert all(r["x_nncf"] == pytest.approx(r["img_s"] / nncf["img_s"]) for r in rows)


# ---- vitcompress export ---------------------------------------------------------------------------------------
def test_export_writes_onnx_and_openvino_ir_with_parity(static_artifact: Path, tmp_path: Path, capsys) -> None:
    formats = "onnx,openvino" if HAS_OPENVINO else "onnx"
    out = tmp_path / "export"
    assert main(["export", str(static_artifact), "--out", str(out), "--formats", formats, "--images", "32",
                 "--threads", "1"]) == 0
    summary = json.loads((out / "export.json").read_text())
    assert summary["inputs"] == "32 seeded random images (seed 0)"
    entries = {e["format"]: e for e in summary["exports"]}
    assert set(entries) == set(formats.split(","))
    onnx_entry = entries["onnx"]
    assert onnx_entry["files"] == [str(out / "model.onnx")] and onnx_entry["bytes"] == (out / "model.onnx").stat().st_size
    # the file keeps our int8 weights, and ONNX Runtime follows PyTorch on it
    assert_int8_initializers_are_ours(out / "model.onnx", load_artifact(static_artifact))
    assert onnx_entry["top1_agreement"] == 1.0 and onnx_entry["cosine"] > 0.999
    if HAS_OPENVINO:
        ir = entries["openvino"]
        assert (out / "model.xml").is_file() and (out / "model.bin").is_file()
        assert ir["bytes"] == (out / "model.xml").stat().st_size + (out / "model.bin").stat().st_size
        assert ir["runtime"].startswith("openvino-cpu") and ir["top1_agreement"] >= 0.95 and ir["cosine"] > 0.99
    assert "parity against PyTorch eager" in capsys.readouterr().out


def test_export_rejects_bad_input_in_one_line(static_artifact: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(static_artifact), "--out", str(tmp_path), "--formats", "tflite"]) == 2
    assert main(["export", str(static_artifact), "--out", str(tmp_path), "--images", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--formats takes" in err[0] and "--images must be at least 1" in err[1]


@pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed (apt install dataset-fashion-mnist)")
def test_export_parity_on_dataset_images(static_artifact: Path, tmp_path: Path) -> None:
    assert main(["export", str(static_artifact), "--out", str(tmp_path), "--formats", "onnx", "--data",
                 "fashion-mnist", "--images", "20", "--threads", "1"]) == 0
    summary = json.loads((tmp_path / "export.json").read_text())
    assert summary["inputs"] == "the first 20 fashion-mnist test images"


def test_timing_order_benchmark_quick_runs(tmp_path: Path) -> None:
    out = tmp_path / "order.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "timing_order.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--runtime", "onnxruntime", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["quick"] and res["runtime_label"] == "onnxruntime-cpu" and set(res["schemes"]) == {"fixed order",
                                                                                                  "shuffled"}
    for ratios in res["schemes"].values():
        assert ratios["copy 0"] == {"q25": 1.0, "median": 1.0, "q75": 1.0}  # copy 0 against itself, round by round
        assert ratios["copy 1"]["q25"] <= ratios["copy 1"]["median"] <= ratios["copy 1"]["q75"]
        assert ratios["copy 1"]["median"] > 0
    assert "fixed order: speed / copy 0" in proc.stdout

