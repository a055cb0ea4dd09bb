"""``vitcompress bench``: one model on every runtime and batch size, timed the measurement package's way.

For each runtime × batch size the result holds images/s (median of repeats, each
repeat looping long enough to be timed), and for each runtime the batch-1 latency
percentiles, whether integer kernels ran (read from what the runtime executes, see
:mod:`.runtimes`), and its parity with PyTorch eager on the same inputs (top-1
agreement, max |logit difference|, mean cosine similarity of the logit vectors).

The target is a saved artifact folder (``run_dir/artifacts/<key>``) or a timm
model name (random init unless a checkpoint is given). Inputs are seeded random
images: speed does not depend on pixel values, and parity compares two runtimes
on the same inputs, not accuracy.
"""

from __future__ import annotations

import math
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check
from ..errors import VitcompressError
from . import Threads, _percentile, _repeat_to, _time_calls, available_cores

if TYPE_CHECKING:
    from rich.table import Table

Device = Literal["cpu", "cuda", "auto"]


@dataclass(frozen=True)
class BenchConfig:
    runtimes: tuple[str, ...] = ("auto",)  # "auto", "all" or names from runtimes.RUNTIMES
    batch_sizes: tuple[int, ...] = (1, 16)
    threads: int | None = None  # None: every core this process may use
    warmup: int = 3
    repeats: int = 7
    min_repeat_seconds: float = 0.2
    latency_samples: int = 50
    parity_images: int = 16
    device: Device = "cpu"  # "auto": the CPU, and CUDA too when a GPU is present
    seed: int = 0

    def __post_init__(self) -> None:
        from .runtimes import CHOICES

        bad = [r for r in self.runtimes if r not in CHOICES]
        check(bool(self.runtimes) and not bad,
              f"bench: unknown runtime {bad[0] if bad else '(none)'}; choose from {', '.join(CHOICES)}")
        check(bool(self.batch_sizes) and all(b >= 1 for b in self.batch_sizes), "bench: batch sizes must be >= 1")
        check(self.threads is None or self.threads >= 1, "bench: threads must be >= 1")
        check(self.repeats >= 1 and self.warmup >= 0, "bench: repeats must be >= 1 and warmup >= 0")
        check(0 <= self.min_repeat_seconds < 3600, "bench: min_repeat_seconds must be in [0, 3600)")
        check(self.latency_samples >= 2, "bench: latency_samples must be >= 2")
        check(self.parity_images >= 1, "bench: parity_images must be >= 1")
        check(self.device in ("cpu", "cuda", "auto"), f"bench: device must be cpu, cuda or auto, got {self.device!r}")

    def resolved_threads(self) -> int:
        return self.threads or available_cores()


@dataclass
class BenchTarget:
    """A model to benchmark and what the JSON says about where it came from."""

    model: nn.Module
    label: str  # e.g. "vitc_micro + ptq.static"
    kind: Literal["artifact", "timm", "hf"]
    source: str  # the folder or the model name, as given
    img_size: int
    in_chans: int
    num_classes: int
    macs: int | None = None
    size_bytes: int | None = None  # the artifact's weights file, measured from the file
    onnx_dir: Path | None = None  # a folder where the study already exported this artifact to ONNX
    preprocess: dict[str, Any] | None = None  # its input recipe (``Preprocess.to_dict``), where known
    classes: list[str] | None = None  # the class names its head predicts, where known


# ---- timing (the measurement package's loop, one batch size at a time) --------------------------------------
def throughput(fn: Callable[[torch.Tensor], Any], batch: torch.Tensor, *, warmup: int, repeats: int,
               min_repeat_seconds: float, sync: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Images/s of ``fn`` on ``batch``: the median over ``repeats`` of seconds per call."""
    per_call = _time_calls(lambda: fn(batch), warmup, repeats, min_repeat_seconds, sync)
    median = statistics.median(per_call)
    return {"batch_size": len(batch), "img_s": len(batch) / median, "ms_per_batch": 1e3 * median,
            "seconds_per_call": per_call}


def latency(fn: Callable[[torch.Tensor], Any], one: torch.Tensor, samples: int, *, warmup: int = 2,
            sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Milliseconds of single calls on ``one`` (one image): p50 and p95 over ``samples`` calls."""
    for _ in range(warmup):
        fn(one)
    sync()
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        fn(one)
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return {"latency_ms_p50": 1e3 * _percentile(times, 50), "latency_ms_p95": 1e3 * _percentile(times, 95)}


def _loops_per_repeat(calls: Mapping[str, Callable[[], Any]], warmup: int, min_repeat_seconds: float) -> dict[str, int]:
    """Warm each callable up, then size its repeat: enough calls to last ``min_repeat_seconds``."""
    inner = {}
    for name, fn in calls.items():
        for _ in range(warmup):
            fn()
        t = time.perf_counter()
        fn()
        inner[name] = max(1, int(min_repeat_seconds / max(time.perf_counter() - t, 1e-6)))
    return inner


def _timed(fn: Callable[[], Any], loops: int) -> float:
    t = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - t) / loops


def time_interleaved(calls: Mapping[str, Callable[[], Any]], *, warmup: int, repeats: int,
                     min_repeat_seconds: float, seed: int | None = 0) -> dict[str, list[float]]:
    """Seconds per call of each callable (one number per repeat), the callables timed in turn, repeat after repeat.

    For ratios between deployments on a machine other jobs may share: a burst of load then slows
    every deployment in that round, not only the one running at the time. Otherwise the measurement
    package's recipe: warm-up calls, then each repeat loops until it lasts ``min_repeat_seconds``.

    Each round visits the callables in a fresh random order (``seed``; ``None`` keeps the given
    order), so that no deployment is always first or always after the same neighbour. One ad-hoc
    run with a fixed order had a copy of the baseline timed 7th run 1.06x as fast as the copy timed
    1st; ``benchmarks/timing_order.py`` could not reproduce that (within 2% in both schemes), so
    the shuffle is a precaution, not a measured correction.
    """
    inner = _loops_per_repeat(calls, warmup, min_repeat_seconds)
    out: dict[str, list[float]] = {name: [] for name in calls}
    rng = random.Random(seed)
    order = list(calls)
    for _ in range(repeats):
        if seed is not None:
            rng.shuffle(order)
        for name in order:
            out[name].append(_timed(calls[name], inner[name]))
    return out


def time_anchored(calls: Mapping[str, Callable[[], Any]], anchor: str, *, warmup: int, repeats: int,
                  min_repeat_seconds: float, seed: int | None = 0) -> tuple[dict[str, list[float]],
                                                                             dict[str, list[float]]]:
    """As :func:`time_interleaved`, with ``anchor`` (the baseline) timed again before and after every other call.

    Returns ``(seconds, anchor_seconds)``: per callable, its seconds per call in each round, as
    :func:`time_interleaved` gives them (the anchor's list holds every anchor repeat); and, per
    callable other than the anchor, the anchor's seconds right around each of its repeats (the mean
    of the repeat just before and the one just after). A ratio to those is paired over a fraction of
    a second, where a ratio to the anchor's repeat elsewhere in the round is paired over the whole
    round: with the study's speed pass at 24 deployments a round (about 5 s on 2 cores), two models of
    identical shapes in one round measured 2.53x and 2.07x the baseline (fashion-mnist maxheads/).
    The price is about twice the timing.
    """
    if anchor not in calls:
        raise ValueError(f"anchor {anchor!r} is not one of the calls")
    inner = _loops_per_repeat(calls, warmup, min_repeat_seconds)
    out: dict[str, list[float]] = {name: [] for name in calls}
    around: dict[str, list[float]] = {name: [] for name in calls if name != anchor}
    rng = random.Random(seed)
    order = [name for name in calls if name != anchor]
    for _ in range(repeats):
        if seed is not None:
            rng.shuffle(order)
        before = _timed(calls[anchor], inner[anchor])
        out[anchor].append(before)
        for name in order:
            out[name].append(_timed(calls[name], inner[name]))
            after = _timed(calls[anchor], inner[anchor])
            out[anchor].append(after)
            around[name].append((before + after) / 2)
            before = after
    return out, around


def paired_ratios(reference: Sequence[float], other: Sequence[float]) -> dict[str, float]:
    """How many times faster ``other`` ran than ``reference``, round by round (seconds from :func:`time_interleaved`).

    The ratio is taken within each round, where both ran under the same load, and summarised by its
    median and quartiles: a spread a reader can hold the speed-up against.
    """
    ratios = sorted(r / o for r, o in zip(reference, other, strict=True))
    return {"q25": _percentile(ratios, 25), "median": _percentile(ratios, 50), "q75": _percentile(ratios, 75)}


def latency_interleaved(calls: Mapping[str, Callable[[], Any]], samples: int) -> dict[str, dict[str, float]]:
    """p50/p95 milliseconds of single calls, the callables called in turn ``samples`` times (after one warm-up)."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(samples):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: {"latency_ms_p50": 1e3 * _percentile(sorted(v), 50),
                   "latency_ms_p95": 1e3 * _percentile(sorted(v), 95)} for name, v in times.items()}


def logit_parity(reference: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """How closely ``out`` follows ``reference`` (logits of the same images).

    Computed in float64: in float32 the cosine of a logit vector with itself can come out 1 - 6e-8.
    """
    reference, out = reference.double().cpu(), out.double().cpu()
    return {
        "top1_agreement": float((reference.argmax(-1) == out.argmax(-1)).float().mean()),
        "max_abs_logit_err": float((reference - out).abs().max()),
        "cosine": float(F.cosine_similarity(reference, out, dim=-1).mean()),
    }


# ---- targets ------------------------------------------------------------------------------------------------
def natural_shape(name: str) -> tuple[int, int, int]:
    """(img_size, in_chans, num_classes) a model name is built for: the preset's, or timm's pretrained config."""
    import timm

    from ..models import PRESETS

    if name in PRESETS:
        arch = PRESETS[name][0]
        return int(arch["img_size"]), int(arch.get("in_chans", 1)), int(arch.get("num_classes", 10))
    cfg = timm.models.get_pretrained_cfg(name)
    chans, size = (cfg.input_size[0], cfg.input_size[-1]) if cfg is not None else (3, 224)
    return int(size), int(chans), int(getattr(cfg, "num_classes", None) or 1000)


def load_target(target: str, *, checkpoint: str | None = None, img_size: int | None = None,
                in_chans: int | None = None, num_classes: int | None = None) -> BenchTarget:
    """An artifact folder (holding ``meta.json``), or any model a recipe can name (a timm name, a transformers
    model folder or hub id, ``hf-hub:org/name``), ready to benchmark."""
    from ..artifact import META_FILE, load_artifact, read_meta, size_on_disk, verify_artifact
    from ..models import checkpoint_head_classes, load_model, model_kind, unknown_model_error

    path = Path(target).expanduser()
    if path.is_dir() and (path / META_FILE).is_file():
        given = [flag for flag, v in (("--checkpoint", checkpoint), ("--img-size", img_size),
                                      ("--in-chans", in_chans), ("--num-classes", num_classes)) if v is not None]
        if given:
            raise VitcompressError(f"{', '.join(given)} apply to a model name; an artifact's shape and "
                                   f"weights come from its {META_FILE}")
        verify_artifact(path)  # a damaged or edited file is named before anything reads it
        meta = read_meta(path)
        model = load_artifact(path, verify=False)
        spec = meta["model"]
        steps = [st["method"] for st in meta.get("steps", [])]
        onnx_dir = path / "deploy"
        return BenchTarget(model, " + ".join([spec["name"], *steps]), "artifact", str(path), int(spec["img_size"]),
                           int(spec["in_chans"]), int(spec["num_classes"]), meta.get("macs"), size_on_disk(path),
                           onnx_dir if (onnx_dir / "model.onnx").is_file() else None, meta.get("preprocess"),
                           meta.get("classes"))
    kind = model_kind(target)
    if kind is None:
        if path.is_dir():
            raise VitcompressError(f"{target} is not a vitcompress artifact (no {META_FILE}) nor a transformers "
                                   "model folder (no config.json); pass run_dir/artifacts/<key> or a model folder")
        if "/" in target and not target.startswith("hf-hub:"):
            raise VitcompressError(f"no artifact folder {target}; pass run_dir/artifacts/<key>, a transformers "
                                   "model folder, or a model name")
        raise unknown_model_error(target)
    if kind == "hf":
        if checkpoint is not None:
            raise VitcompressError("--checkpoint applies to a timm model name; a transformers model's weights "
                                   "come from its folder")
        loaded = load_model(target, num_classes=num_classes or _hf_classes(target), img_size=img_size,
                            in_chans=in_chans)
    else:
        size, chans, classes = natural_shape(target) if kind != "timm-hub" else (224, 3, 1000)
        if checkpoint is not None and num_classes is None:
            classes = checkpoint_head_classes(checkpoint) or classes
        loaded = load_model(target, num_classes=num_classes or classes, img_size=img_size or size,
                            in_chans=in_chans or chans, checkpoint=checkpoint, pretrained=kind == "timm-hub")
    spec = loaded.spec
    return BenchTarget(loaded.model.eval(), target, "hf" if kind == "hf" else "timm", target, spec.img_size,
                       spec.in_chans, spec.num_classes, onnx_dir=None,
                       preprocess=loaded.preprocess.to_dict() if loaded.preprocess is not None else None,
                       classes=list(loaded.classes) if loaded.classes else None)


def _hf_classes(name: str) -> int:
    """The class count of a transformers checkpoint's head (from its config)."""
    from ..models.hf import read_hf_config, resolve_hf

    cfg = read_hf_config(resolve_hf(name))
    labels = cfg.get("id2label")
    return int(len(labels) if isinstance(labels, dict) and labels else cfg.get("num_labels", 2))


# ---- the benchmark ------------------------------------------------------------------------------------------
def _plan(cfg: BenchConfig, model: nn.Module) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(device, runtime) pairs to measure, and what was skipped with the reason."""
    from .runtimes import CUDA_RUNTIMES, cuda_unavailable_reason, resolve

    devices = ["cpu"] if cfg.device == "cpu" else ["cuda"] if cfg.device == "cuda" else ["cpu", "cuda"]
    reason = cuda_unavailable_reason()
    if cfg.device == "cuda" and reason:
        raise VitcompressError(f"{reason}; run with --device cpu (or --device auto to use CUDA when present)")
    plan: list[tuple[str, str]] = []
    skipped: list[dict[str, str]] = []
    for device in devices:
        if device == "cuda" and reason:
            skipped.append({"device": "cuda", "reason": reason})
            continue
        if device == "cpu":
            plan += [("cpu", r) for r in resolve(cfg.runtimes, model)]
        else:
            # On CUDA "auto" means PyTorch eager and "all" both PyTorch runtimes; ONNX Runtime and OpenVINO
            # named explicitly stay in the plan and report that they run on the CPU only.
            names = [r for name in cfg.runtimes
                     for r in (("torch-eager",) if name == "auto" else CUDA_RUNTIMES if name == "all" else (name,))]
            plan += [("cuda", r) for r in dict.fromkeys(names)]
    return plan, skipped


def _measure_one(dep: Any, x: torch.Tensor, reference: torch.Tensor, cfg: BenchConfig) -> dict[str, Any]:
    sync = torch.cuda.synchronize if dep.device == "cuda" else (lambda: None)
    images = x.to(dep.device)
    out = dep.fn(images[: len(reference)])
    batches = [throughput(dep.fn, _repeat_to(images, b), warmup=cfg.warmup, repeats=cfg.repeats,
                          min_repeat_seconds=cfg.min_repeat_seconds, sync=sync) for b in cfg.batch_sizes]
    return {
        "runtime": dep.runtime, "device": dep.device, "int_arithmetic": bool(dep.int_arithmetic),
        "float_parts": dep.float_parts, "info": dep.info,
        "parity": logit_parity(reference, out),
        **latency(dep.fn, images[:1], cfg.latency_samples, sync=sync),
        "batches": batches,
    }


def run_bench(target: BenchTarget, cfg: BenchConfig, *, progress: bool = False) -> dict[str, Any]:
    """Measure ``target`` on every runtime and batch size ``cfg`` names; a JSON-able result.

    A runtime that cannot run the model gets an ``error`` entry and the others go on; when none
    runs, raises :class:`VitcompressError` naming why.
    """
    from tqdm.auto import tqdm

    from . import count_params, environment
    from .runtimes import deploy

    threads = cfg.resolved_threads()
    model = target.model.cpu().eval()
    plan, skipped = _plan(cfg, model)
    g = torch.Generator().manual_seed(cfg.seed)
    n = max(max(cfg.batch_sizes), cfg.parity_images)
    x = torch.randn(n, target.in_chans, target.img_size, target.img_size, generator=g)
    entries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vitcompress-bench-") as tmp, Threads(threads), torch.inference_mode():
        reference = model(x[: cfg.parity_images])
        macs = target.macs if target.macs is not None else _macs(model, x)
        onnx_dir = target.onnx_dir or Path(tmp)
        for device, name in tqdm(plan, desc=f"bench {target.label}", disable=not progress, leave=False):
            try:
                dep = deploy(name, model, x, threads, onnx_dir, device=device)
                entry = {"requested": name, **_measure_one(dep, x, reference, cfg), "error": None}
            except Exception as exc:  # this runtime cannot run this model: say so, go on with the others
                # Exporters colour their messages; a JSON file and a table want plain text.
                first = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())[:300]
                entry = {"requested": name, "runtime": name, "device": device, "error": f"{type(exc).__name__}: {first}"}
            entries.append(entry)
    ran = [e for e in entries if not e["error"]]
    if not ran:
        why = "; ".join(f"{e['requested']} ({e['device']}): {e['error']}" for e in entries) or "nothing to run"
        raise VitcompressError(f"no runtime could run {target.label}: {why}")
    warnings = []
    if not bool(torch.isfinite(reference).all()):
        warnings.append("the model's own outputs (PyTorch eager) hold NaN or inf: its weights are damaged or "
                        "diverged, and every parity figure below is meaningless")
    for e in ran:
        bad = [k for k, v in e["parity"].items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            warnings.append(f"{e['runtime']}: parity {', '.join(bad)} is not a number (NaN or inf outputs)")
    return {
        "warnings": warnings,
        "target": target.source, "kind": target.kind, "model": target.label,
        "img_size": target.img_size, "in_chans": target.in_chans, "num_classes": target.num_classes,
        "params": count_params(model), "macs": macs, "size_bytes": target.size_bytes,
        "config": {**asdict(cfg), "threads": threads},
        "inputs": f"seeded random normal images (seed {cfg.seed}); parity on the first {cfg.parity_images}",
        "runtimes": entries, "skipped": skipped, "fastest": fastest(entries),
        "env": environment(threads),
    }


def json_safe(value: Any) -> Any:
    """``value`` with NaN and inf floats as None: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _macs(model: nn.Module, x: torch.Tensor) -> int | None:
    from . import count_macs

    try:
        return count_macs(model, x[:1])
    except Exception:  # quantized modules may hide from the counter; MACs are a detail, not the result
        return None


def fastest(entries: list[Mapping[str, Any]]) -> dict[str, str]:
    """Batch size (as text, a JSON key) -> the runtime label with the most images/s there."""
    best: dict[str, tuple[float, str]] = {}
    for e in entries:
        if e.get("error"):
            continue
        for b in e["batches"]:
            key = str(b["batch_size"])
            if key not in best or b["img_s"] > best[key][0]:
                best[key] = (b["img_s"], e["runtime"])
    return {key: runtime for key, (_, runtime) in best.items()}


# ---- output -------------------------------------------------------------------------------------------------
def render_bench_table(result: Mapping[str, Any]) -> Table:
    """One row per runtime × batch size; ★ marks the fastest runtime at each batch size."""
    from rich.table import Table
    from rich.text import Text

    cfg = result["config"]
    table = Table(title=f"vitcompress bench: {result['model']} ({cfg['threads']} threads, median of "
                        f"{cfg['repeats']} repeats)")
    headers = [("Runtime", False), ("Batch", True), ("img/s", True), ("ms/batch", True), ("p50 ms (b1)", True),
               ("p95 ms (b1)", True), ("Int kernels", False), ("Top-1 agree", True), ("max |Δlogit|", True),
               ("Cosine", True)]
    for header, right in headers:
        table.add_column(header, justify="right" if right else "left")
    failed = []
    for e in result["runtimes"]:
        if e.get("error"):
            failed.append(f"{e['requested']} ({e['device']}): {e['error']}")
            continue
        for i, b in enumerate(e["batches"]):
            star = " ★" if result["fastest"].get(str(b["batch_size"])) == e["runtime"] else ""
            first = i == 0  # per-runtime cells once, on its first line
            par = e["parity"]
            cells = [e["runtime"] if first else "", str(b["batch_size"]), f"{b['img_s']:.1f}{star}",
                     f"{b['ms_per_batch']:.2f}",
                     f"{e['latency_ms_p50']:.2f}" if first else "", f"{e['latency_ms_p95']:.2f}" if first else "",
                     ("yes" if e["int_arithmetic"] else "no") if first else "",
                     f"{par['top1_agreement']:.3f}" if first else "", f"{par['max_abs_logit_err']:.2e}" if first else "",
                     f"{par['cosine']:.5f}" if first else ""]
            table.add_row(*(Text(c) for c in cells))
    notes = [f"warning: {w}" for w in result.get("warnings", [])]
    notes += [f"skipped {s['device']}: {s['reason']}" for s in result.get("skipped", [])]
    notes += [f"failed {f}" for f in failed]
    notes.append("parity: against PyTorch eager (CPU) on the same inputs")
    table.caption = Text("\n".join(notes))
    return table
