"""ViT int8 on this CPU, side by side in one run: vitcompress's int8 against PyTorch, ONNX Runtime and OpenVINO+NNCF.

Run by hand (the tests only run a tiny model):

    python benchmarks/cpu_int8.py --out runs/bench/cpu_int8.json
    python benchmarks/cpu_int8.py --models deit_tiny_patch16_224 --repeats 3 --out /tmp/tiny.json

For each model (default: vit_base_patch16_224, deit_small_patch16_224, deit_tiny_patch16_224; timm
weights when they can be fetched, else random init, as the JSON says), every deployment below is built
first, then all of them are timed in turn, repeat after repeat (see ``time_interleaved``), so that the
ratios between them come from the same rounds:

* ``eager-fp32``: the timm model in PyTorch eager;
* ``ov-fp32``, ``ov-bf16``: its ONNX export in OpenVINO with float inference precision f32 / bf16;
* ``torch-dynamic-int8``: vitcompress's ``ptq.dynamic`` (``torch.ao`` dynamic int8 Linear layers);
* ``torchao-dynamic-int8``: torchao's ``Int8DynamicActivationInt8WeightConfig`` (``quantize_``), the
  maintained successor of ``torch.ao`` dynamic quantization, in eager PyTorch and under
  ``torch.compile`` (``torchao-dynamic-int8-compiled``); whether integer kernels ran is read from the
  profiler (an int8 GEMM op among the ops that ran); needs ``pip install torchao``;
* ``ort-dynamic-int8``: ``onnxruntime.quantization.quantize_dynamic`` of the ONNX export in ONNX Runtime;
* ``ov-nncf-int8``: ``nncf.quantize`` (``model_type=TRANSFORMER``) of the ONNX export read by OpenVINO,
  compiled with OpenVINO's defaults (bf16 float parts where the CPU has bf16);
* ``ours-int8``: vitcompress's ``ptq.static`` / ``ptq.fqvit`` (``--ours``), exported as QDQ ONNX with
  *our* calibrated scales and run in ONNX Runtime and in OpenVINO (which executes QDQ in int8 with the
  given scales); the fastest of these is vitcompress's best int8 path;
* ``pruned-ours-int8``: ``prune.structured`` (magnitude importance, ``--prune-ratio`` of the parameters
  removed, no fine-tune: speed does not depend on it) followed by each ``ours-int8`` variant.

NNCF and ours calibrate on the same real Fashion-MNIST training images, resized to the model's input
and repeated to 3 channels. Reported per deployment: images/s at ``--batch`` (median of ``--repeats``
at ``--threads`` threads), batch-1 latency p50/p95, whether integer kernels ran (read from the
runtime's executed graph), and its logits on Fashion-MNIST test images against eager fp32 (mean
cosine similarity, top-1 agreement). Ratios: to ``ov-nncf-int8`` of the *unpruned* model (throughput,
and batch-1 latency as nncf p50 / p50, so > 1 is faster either way) and to the **int8 limit**: the
peak int8 GEMM rate of this CPU measured in the same run (``--gemm-shapes``, best of OpenVINO, ONNX
Runtime and ``torch._int_mm``) divided by the model's FLOPs per image (2 × MACs from torch's FLOP
counter). Prints Markdown tables; ``--out`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.data import ImageTensorDataset, load_split, make_loader
from vitcompress.errors import VitcompressError
from vitcompress.export.onnx import OnnxRunner, deployment_info, export_onnx, integer_ops_in_session
from vitcompress.measure import count_macs, environment, uses_integer_kernels
from vitcompress.measure.bench import latency_interleaved, natural_shape, time_interleaved
from vitcompress.measure.runtimes import deploy_openvino, installed
from vitcompress.methods import get_method, parse_config
from vitcompress.models import PRESETS, ModelSpec, create_model
from vitcompress.study.context import StepContext
from vitcompress.train import TrainConfig

ANCHOR_MODELS = ("vit_base_patch16_224", "deit_small_patch16_224", "deit_tiny_patch16_224")
PATHS = ("eager-fp32", "ov-fp32", "ov-bf16", "torch-dynamic-int8", "torchao-dynamic-int8", "ort-dynamic-int8",
         "ov-nncf-int8", "ours-int8", "pruned-ours-int8")
# Our int8 variants: name -> (method, config). All keep our scales in the QDQ export.
OURS: dict[str, tuple[str, dict[str, Any]]] = {
    "static": ("ptq.static", {}),
    "static-attn": ("ptq.static", {"quant_attn_matmul": True}),
    "static-qk": ("ptq.static", {"quant_attn_matmul": "qk"}),
    "fqvit": ("ptq.fqvit", {}),
}
NNCF = "ov-nncf-int8"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Deployment:
    name: str  # unique row name
    path: str  # one of PATHS
    runtime: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    int_arithmetic: bool
    variant: str | None = None
    flops: int | None = None  # per image, of the model this deployment runs
    info: dict[str, Any] = field(default_factory=dict)


def _ops_that_ran(fn: Callable[[torch.Tensor], Any], example: torch.Tensor) -> set[str]:
    """The names of the operators one call of ``fn`` ran, from the profiler (after a warm-up call, so a
    compiled function's kernels, not its compilation, are what is read)."""
    from torch.profiler import ProfilerActivity, profile

    fn(example)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(example)
    return {event.key for event in prof.key_averages()}


# ---- the int8 limit of this CPU -----------------------------------------------------------------------------
def _qdq_matmul_onnx(m: int, k: int, n: int, path: Path) -> Path:
    """A uint8-activation × int8-weight MatMul as QDQ ONNX: what an int8 runtime turns into one integer GEMM."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "w"),
             numpy_helper.from_array(np.full(n, 0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(128, np.uint8), "x_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "int8_gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _gemm_calls(m: int, k: int, n: int, threads: int, work: Path) -> tuple[dict[str, Callable[[], Any]],
                                                                          dict[str, bool]]:
    """One int8 GEMM of shape (M, K) × (K, N) per runtime, and whether the runtime really ran it in int8."""
    path = _qdq_matmul_onnx(m, k, n, work / f"gemm_{m}x{k}x{n}.onnx")
    x = torch.randn(m, k)
    calls: dict[str, Callable[[], Any]] = {}
    evidence: dict[str, bool] = {}
    try:
        ov = deploy_openvino(path, threads)
        calls["openvino"] = lambda: ov.fn(x)
        evidence["openvino"] = ov.int_arithmetic
    except Exception as exc:
        log(f"  int8 GEMM in OpenVINO unavailable: {type(exc).__name__}: {exc}")
    ort = OnnxRunner(path, threads)
    calls["onnxruntime"] = lambda: ort(x)
    evidence["onnxruntime"] = bool(integer_ops_in_session(path))
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8)
    calls["torch._int_mm"] = lambda: torch._int_mm(a, b)
    evidence["torch._int_mm"] = True
    return calls, evidence


def measure_int8_limit(shapes: list[tuple[int, int, int]], threads: int, args: argparse.Namespace,
                       work: Path) -> dict[str, Any]:
    """Peak int8 GEMM rate (GOP/s, 2·M·K·N per call) over ``shapes`` and the runtimes that have int8 GEMMs."""
    results = []
    for m, k, n in shapes:
        calls, evidence = _gemm_calls(m, k, n, threads, work)
        with torch.inference_mode():
            secs = time_interleaved(calls, warmup=args.warmup, repeats=args.repeats,
                                    min_repeat_seconds=args.min_repeat_seconds)
        for name, s in secs.items():
            gops = 2 * m * k * n / statistics.median(s) / 1e9
            results.append({"shape": [m, k, n], "runtime": name, "gops": gops, "int_arithmetic": evidence[name]})
            log(f"  int8 GEMM {m}x{k}x{n} on {name}: {gops:.0f} GOP/s")
    best = max((r for r in results if r["int_arithmetic"]), key=lambda r: r["gops"])
    return {"gemm_gops": best["gops"], "best": best, "measurements": results, "threads": threads}


# ---- data ---------------------------------------------------------------------------------------------------
def load_data(args: argparse.Namespace) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """(calibration images: a seeded slice of the training split, evaluation images: the test split's first N)."""
    train = load_split("fashion-mnist", "train", args.data_root)
    test = load_split("fashion-mnist", "test", args.data_root)
    g = torch.Generator().manual_seed(args.seed)
    calib = train.subset(torch.randperm(len(train), generator=g)[: args.calib_images])
    return calib, test.subset(torch.arange(min(args.eval_images, len(test))))


def batches(ds: ImageTensorDataset, img_size: int, in_chans: int, batch: int = 64) -> torch.Tensor:
    """The whole of ``ds`` as model inputs: resized, channels repeated, normalized."""
    return torch.cat([x for x, _ in make_loader(ds, batch, train=False, img_size=img_size, in_chans=in_chans)])


# ---- models and deployments ---------------------------------------------------------------------------------
def _hub_reachable(host: str = "huggingface.co") -> bool:
    import socket

    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def build_model(name: str, weights: str) -> tuple[nn.Module, ModelSpec, str]:
    size, chans, classes = natural_shape(name)
    spec = ModelSpec(name, num_classes=classes, img_size=size, in_chans=chans)
    torch.manual_seed(0)
    if weights == "auto" and name not in PRESETS and not _hub_reachable():
        # Offline, the hub client retries for most of a minute per file before it gives up.
        note = "random init (huggingface.co unreachable; --weights pretrained to try anyway)"
        log(f"  {note}")
        return create_model(spec).eval(), spec, note
    if weights != "random" and name not in PRESETS:
        try:
            return create_model(ModelSpec(**{**spec.to_dict(), "pretrained": True})).eval(), spec, "timm pretrained"
        except VitcompressError as exc:
            if weights == "pretrained":
                raise
            note = f"random init (timm weights unavailable: {exc})"
            log(f"  {note}")
            return create_model(spec).eval(), spec, note
    return create_model(spec).eval(), spec, "random init"


def _ctx(calib: ImageTensorDataset, spec: ModelSpec, work: Path, seed: int) -> StepContext:
    return StepContext(calib, spec.img_size, spec.in_chans, spec.num_classes, seed, work,
                       TrainConfig(mixed_precision="no"), calib_images=len(calib), progress=False, name="bench")


def _flops(model: nn.Module, x: torch.Tensor) -> int | None:
    macs = count_macs(model, x[:1])
    return 2 * macs if macs else None


def _ort(path: Path, model: nn.Module | None, threads: int) -> tuple[OnnxRunner, bool, dict[str, Any]]:
    runner = OnnxRunner(path, threads)
    if model is not None:
        info = deployment_info(model, path)
        return runner, info["int_arithmetic"], {"integer_ops": info["integer_ops"], "float_parts": info["float_parts"]}
    ops = integer_ops_in_session(path)
    return runner, bool(ops), {"integer_ops": {op: ops.count(op) for op in sorted(set(ops))}}


def _ov(source: Any, threads: int, precision: str | None = None) -> tuple[Callable, str, bool, dict[str, Any]]:
    dep = deploy_openvino(source, threads, precision)
    return dep.fn, dep.runtime, dep.int_arithmetic, dep.info


def _ours(model: nn.Module, variant: str, ctx: StepContext, example: torch.Tensor, work: Path, threads: int,
          path: str, flops: int | None) -> list[Deployment]:
    method, params = OURS[variant]
    q = get_method(method).apply(model, parse_config(method, params, "--ours"), ctx).model.eval()
    onnx_path = export_onnx(q, example[:2], work / f"{path}-{variant}.onnx")
    out = []
    runner, int_ok, info = _ort(onnx_path, q, threads)
    out.append(Deployment(f"{path} {variant} onnxruntime", path, "onnxruntime-cpu", runner, int_ok, variant, flops,
                          info))
    if installed("openvino"):  # without OpenVINO, ours runs in ONNX Runtime only
        ov_path = export_onnx(q, example[:2], work / f"{path}-{variant}-openvino.onnx", target="openvino")
        fn, runtime, int_ok, info = _ov(ov_path, threads)
        out.append(Deployment(f"{path} {variant} openvino", path, runtime, fn, int_ok, variant, flops, info))
    return out


def build_deployments(model: nn.Module, spec: ModelSpec, calib: ImageTensorDataset, calib_x: torch.Tensor,
                      example: torch.Tensor, args: argparse.Namespace, work: Path,
                      paths: list[str]) -> tuple[list[Deployment], dict[str, str], dict[str, Any]]:
    """Every deployment ``paths`` asks for; a path that fails is recorded with its error and skipped."""
    threads = args.threads
    ctx = _ctx(calib, spec, work / "ctx", args.seed)
    flops = _flops(model, example)
    deps: list[Deployment] = []
    errors: dict[str, str] = {}
    extra: dict[str, Any] = {}
    fp32_onnx: Path | None = None

    def fp32() -> Path:
        nonlocal fp32_onnx
        if fp32_onnx is None:
            log("  export fp32 ONNX")
            fp32_onnx = export_onnx(model, example[:2], work / "fp32.onnx")
        return fp32_onnx

    def attempt(path: str, build: Callable[[], list[Deployment]]) -> None:
        if path not in paths:
            return
        log(f"  build {path}")
        t = time.perf_counter()
        try:
            deps.extend(build())
        except Exception as exc:  # one path that cannot be built must not cost the others
            errors[path] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            log(f"  {path} failed: {errors[path]}")
        extra.setdefault("build_seconds", {})[path] = time.perf_counter() - t

    attempt("eager-fp32", lambda: [Deployment("eager-fp32", "eager-fp32", "torch-eager-cpu", model,
                                              False, flops=flops)])
    for path, precision in (("ov-fp32", "f32"), ("ov-bf16", "bf16")):
        def ov_float(path: str = path, precision: str = precision) -> list[Deployment]:
            fn, runtime, int_ok, info = _ov(fp32(), threads, precision)
            return [Deployment(path, path, runtime, fn, int_ok, flops=flops, info=info)]
        attempt(path, ov_float)

    def torch_dynamic() -> list[Deployment]:
        q = get_method("ptq.dynamic").apply(model, parse_config("ptq.dynamic", {}, "bench"), ctx).model.eval()
        return [Deployment("torch-dynamic-int8", "torch-dynamic-int8", "torch-eager-cpu", q,
                           uses_integer_kernels(q), flops=flops)]
    attempt("torch-dynamic-int8", torch_dynamic)

    def torchao_dynamic() -> list[Deployment]:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        q = copy.deepcopy(model).eval()
        quantize_(q, Int8DynamicActivationInt8WeightConfig())
        compiled = torch.compile(q)
        out = []
        for name, fn in (("torchao-dynamic-int8", q), ("torchao-dynamic-int8-compiled", compiled)):
            with torch.inference_mode():
                ops = _ops_that_ran(fn, example)
            int_ops = sorted(op for op in ops if any(tag in op for tag in ("_int_mm", "int8", "qlinear")))
            out.append(Deployment(name, "torchao-dynamic-int8", "torch-compile-cpu" if fn is compiled else
                                  "torch-eager-cpu", fn, bool(int_ops), flops=flops,
                                  info={"integer_ops": int_ops}))
        return out
    attempt("torchao-dynamic-int8", torchao_dynamic)

    def ort_dynamic() -> list[Deployment]:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # ONNX Runtime's advice before quantizing: its shape inference and graph optimization first.
        source, prepared = fp32(), work / "ort_prepared.onnx"
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(source), str(prepared))
            source = prepared
        except Exception as exc:
            log(f"  ONNX Runtime pre-processing failed, quantizing the export as is: {type(exc).__name__}: {exc}")
        out = work / "ort_dynamic.onnx"
        quantize_dynamic(source, out, weight_type=QuantType.QInt8)
        runner, int_ok, info = _ort(out, None, threads)
        return [Deployment("ort-dynamic-int8", "ort-dynamic-int8", "onnxruntime-cpu", runner, int_ok, flops=flops,
                           info={**info, "pre_processed": source == prepared})]
    attempt("ort-dynamic-int8", ort_dynamic)

    def nncf_int8() -> list[Deployment]:
        import nncf
        import openvino as ov

        items = [calib_x[i : i + 1].numpy() for i in range(len(calib_x))]
        quantized = nncf.quantize(ov.Core().read_model(str(fp32())), nncf.Dataset(items),
                                  model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))
        fn, runtime, int_ok, info = _ov(quantized, threads)
        return [Deployment(NNCF, NNCF, runtime, fn, int_ok, flops=flops,
                           info={**info, "nncf": nncf.__version__, "model_type": "TRANSFORMER",
                                 "subset_size": len(items)})]
    attempt(NNCF, nncf_int8)

    for variant in args.ours:
        attempt("ours-int8", lambda variant=variant: _ours(model, variant, ctx, example, work, threads,
                                                           "ours-int8", flops))
    if "pruned-ours-int8" in paths:
        log(f"  prune r={args.prune_ratio} (magnitude, no fine-tune)")
        cfg = parse_config("prune.structured", {"ratio": args.prune_ratio, "importance": "magnitude",
                                                "finetune_epochs": 0, "distill": False}, "--prune-ratio")
        step = get_method("prune.structured").apply(copy.deepcopy(model), cfg, ctx)
        pruned = step.model.eval()
        pruned_flops = _flops(pruned, example)
        extra["pruned"] = {"ratio": args.prune_ratio, "removed_fraction": step.meta["removed_fraction"],
                           "params_before": step.meta["params_before"], "params_after": step.meta["params_after"],
                           "flops": pruned_flops}
        for variant in args.ours:
            attempt("pruned-ours-int8", lambda variant=variant: _ours(pruned, variant, ctx, example, work, threads,
                                                                      "pruned-ours-int8", pruned_flops))
    extra["flops"] = flops
    return deps, errors, extra


# ---- measuring ----------------------------------------------------------------------------------------------
def _logits(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]).float() for i in range(0, len(x), batch)])


def measure(deps: list[Deployment], eval_x: torch.Tensor, batch_x: torch.Tensor, args: argparse.Namespace,
            peak_gops: float) -> list[dict[str, Any]]:
    with torch.inference_mode():
        ref = _logits(_reference_fn(deps), eval_x, args.batch)
        secs = time_interleaved({d.name: (lambda d=d: d.fn(batch_x)) for d in deps}, warmup=args.warmup,
                                repeats=args.repeats, min_repeat_seconds=args.min_repeat_seconds)
        lat = latency_interleaved({d.name: (lambda d=d: d.fn(batch_x[:1])) for d in deps}, args.latency_samples)
        rows = []
        for d in deps:
            out = _logits(d.fn, eval_x, args.batch)
            cos = F.cosine_similarity(out, ref, dim=-1)
            limit = peak_gops * 1e9 / d.flops if d.flops else None
            img_s = args.batch / statistics.median(secs[d.name])
            rows.append({
                "name": d.name, "path": d.path, "variant": d.variant, "runtime": d.runtime,
                "int_arithmetic": bool(d.int_arithmetic), "batch_size": args.batch, "img_s": img_s,
                "seconds_per_call": secs[d.name], **lat[d.name],
                "cosine_vs_fp32": float(cos.mean()), "cosine_vs_fp32_min": float(cos.min()),
                "top1_agreement_vs_fp32": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
                "flops": d.flops, "int8_limit_img_s": limit,
                "x_limit": img_s / limit if limit else None,
                # One image at the peak rate; a batch-1 GEMM cannot reach it, which is why it is a limit.
                "x_limit_latency": (1e3 * d.flops / (peak_gops * 1e9)) / lat[d.name]["latency_ms_p50"]
                if d.flops else None,
                "info": d.info,
            })
    return rows


def _reference_fn(deps: list[Deployment]) -> Callable[[torch.Tensor], torch.Tensor]:
    fp32 = next((d for d in deps if d.path == "eager-fp32"), None)
    if fp32 is None:
        raise VitcompressError("the eager-fp32 path is the reference for cosine similarity; keep it in --paths")
    return fp32.fn


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios to OpenVINO+NNCF int8 (> 1: faster), and which row is the fastest of its path."""
    nncf = next((r for r in rows if r["path"] == NNCF), None)
    for r in rows:
        r["x_nncf"] = r["img_s"] / nncf["img_s"] if nncf else None
        r["x_nncf_latency"] = nncf["latency_ms_p50"] / r["latency_ms_p50"] if nncf else None
    for path in {r["path"] for r in rows}:
        best = max((r for r in rows if r["path"] == path), key=lambda r: r["img_s"])
        for r in rows:
            if r["path"] == path:
                r["best_of_path"] = r is best


# ---- output -------------------------------------------------------------------------------------------------
def _f(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(result: dict[str, Any]) -> str:
    batch = result["config"]["batch"]
    paths = [p for p in PATHS if any(r["path"] == p for m in result["models"] for r in m["rows"])]
    lines = [f"Images/s at batch {batch}, median of {result['config']['repeats']}, "
             f"{result['config']['threads']} threads (best runtime of each path; ours: fastest variant)", "",
             "| model | " + " | ".join(paths) + " | int8 limit |", "|---|" + "---:|" * (len(paths) + 1)]
    for m in result["models"]:
        best = {r["path"]: r for r in m["rows"] if r["best_of_path"]}
        cells = [_f(best[p]["img_s"], ".1f") if p in best else "—" for p in paths]
        lines.append(f"| {m['model']} | " + " | ".join(cells) + f" | ≈ {_f(m['int8_limit_img_s'], '.0f')} |")
    lines += ["", f"int8 limit: peak int8 GEMM {result['int8_limit']['gemm_gops']:.0f} GOP/s "
              f"({result['int8_limit']['best']['runtime']}, shape {result['int8_limit']['best']['shape']}) / "
              "FLOPs per image. × NNCF: ratio to ov-nncf-int8 of the unpruned model (latency: nncf p50 / p50).", ""]
    lines += ["| model | deployment | runtime | int kernels | img/s | × NNCF | × limit | p50 ms (b1) | "
              "× NNCF (b1) | × limit (b1) | cosine vs fp32 | top-1 agree |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in result["models"]:
        for r in m["rows"]:
            star = " ★" if r["best_of_path"] and r["path"] in ("ours-int8", "pruned-ours-int8") else ""
            lines.append(
                f"| {m['model']} | {r['name']}{star} | {r['runtime']} | {'yes' if r['int_arithmetic'] else 'no'} | "
                f"{r['img_s']:.1f} | {_f(r['x_nncf'], '.2f')} | {_f(r['x_limit'], '.2f')} | "
                f"{r['latency_ms_p50']:.2f} | {_f(r['x_nncf_latency'], '.2f')} | {_f(r['x_limit_latency'], '.2f')} | "
                f"{r['cosine_vs_fp32']:.5f} | {r['top1_agreement_vs_fp32']:.3f} |")
        for path, error in m["errors"].items():
            lines.append(f"| {m['model']} | {path} (failed) | {error} | | | | | | | | | |")
    return "\n".join(lines)


def run_model(name: str, args: argparse.Namespace, calib_ds: ImageTensorDataset, eval_ds: ImageTensorDataset,
              peak_gops: float, work: Path) -> dict[str, Any]:
    log(f"== {name}")
    model, spec, weights = build_model(name, args.weights)
    calib_x = batches(calib_ds, spec.img_size, spec.in_chans)
    eval_x = batches(eval_ds, spec.img_size, spec.in_chans)
    reps = -(-args.batch // len(eval_x))
    batch_x = eval_x.repeat(reps, 1, 1, 1)[: args.batch].contiguous()
    deps, errors, extra = build_deployments(model, spec, calib_ds, calib_x, eval_x, args, work / name, args.paths)
    log(f"  timing {len(deps)} deployments, interleaved")
    rows = measure(deps, eval_x, batch_x, args, peak_gops)
    add_ratios(rows)
    flops = extra["flops"]
    return {"model": name, "weights": weights, "img_size": spec.img_size, "in_chans": spec.in_chans,
            "num_classes": spec.num_classes, "flops": flops,
            "int8_limit_img_s": peak_gops * 1e9 / flops if flops else None,
            "rows": rows, "errors": errors, **{k: v for k, v in extra.items() if k != "flops"}}


def _shapes(text: str) -> list[tuple[int, int, int]]:
    try:
        shapes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--gemm-shapes takes MxKxN[,MxKxN...], e.g. 3152x768x3072; got {text!r}")
    return shapes  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    import os

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(ANCHOR_MODELS), help="comma-separated timm names (default: the "
                   "issue's three anchors); presets like vitc_micro work for a smoke run")
    p.add_argument("--paths", default=",".join(PATHS), help=f"deployments to build (default all: {', '.join(PATHS)})")
    p.add_argument("--ours", default=",".join(OURS), help=f"our int8 variants (default all: {', '.join(OURS)})")
    p.add_argument("--batch", type=int, default=16, help="batch size of the throughput column (default 16)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads for every runtime (default: every core available)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats; the median is reported (default 7)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per deployment before timing (default 3)")
    p.add_argument("--min-repeat-seconds", type=float, default=0.3, help="each repeat lasts at least this long")
    p.add_argument("--latency-samples", type=int, default=20, help="batch-1 calls per deployment for p50/p95")
    p.add_argument("--calib-images", type=int, default=128, help="Fashion-MNIST training images to calibrate on")
    p.add_argument("--eval-images", type=int, default=64, help="Fashion-MNIST test images for cosine vs fp32")
    p.add_argument("--prune-ratio", type=float, default=0.2, help="fraction of parameters pruned (default 0.2)")
    p.add_argument("--weights", choices=("auto", "pretrained", "random"), default="auto",
                   help="auto: timm weights when they can be fetched, else random init (default)")
    p.add_argument("--gemm-shapes", default="3152x768x3072,2048x4096x4096",
                   help="MxKxN shapes of the int8 GEMMs that measure the int8 limit")
    p.add_argument("--data-root", default=None, help="folder holding Fashion-MNIST (default: the Debian location)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    args.ours = [s.strip() for s in args.ours.split(",") if s.strip()]
    bad = [x for x in args.paths if x not in PATHS] + [x for x in args.ours if x not in OURS]
    if bad or args.batch < 1 or args.repeats < 1 or args.threads < 1:
        p.error(f"unknown path or variant {bad[0]}" if bad else "--batch, --repeats and --threads must be >= 1")
    if "eager-fp32" not in args.paths:
        p.error("--paths must keep eager-fp32: it is the reference of the cosine similarity")
    shapes = _shapes(args.gemm_shapes)

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        calib_ds, eval_ds = load_data(args)
        with tempfile.TemporaryDirectory(prefix="vitcompress-cpu-int8-") as tmp:
            work = Path(tmp)
            log("== int8 limit of this CPU")
            limit = measure_int8_limit(shapes, args.threads, args, work)
            models = [run_model(name.strip(), args, calib_ds, eval_ds, limit["gemm_gops"], work)
                      for name in args.models.split(",") if name.strip()]
    except VitcompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "command": " ".join(["python", "benchmarks/cpu_int8.py", *(argv if argv is not None else sys.argv[1:])]),
        "calibration": f"{len(calib_ds)} Fashion-MNIST training images (seed {args.seed}), resized, 3 channels",
        "evaluation": f"first {len(eval_ds)} Fashion-MNIST test images, resized, 3 channels",
        "int8_limit": limit, "models": models, "seconds": time.perf_counter() - t0,
        "env": environment(args.threads),
    }
    print(markdown(result))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"json: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
