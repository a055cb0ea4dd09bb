"""One way to measure every artifact: accuracy, speed, size, parameters, MACs.

No method grades itself: the study hands each finished model to
:func:`measure_model`, which times it the same way whatever it is (fixed thread
count, warm-up, ``perf_counter``, CUDA synchronize, median of repeats) and reads
its size from the saved file.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import LATE, check

MAX_BATCH = 65_536
MAX_THREADS = 1_024


@dataclass(frozen=True)
class MeasureConfig:
    batch_size: int = 16
    threads: int | None = None  # None: every core this process may use
    warmup: int = 3
    repeats: int = 7
    min_repeat_seconds: float = 0.2  # each repeat runs enough batches to last this long
    latency_samples: int = 50
    eval_batch_size: int = 256
    gpu: bool = True  # measure on CUDA when a GPU is present
    test_subset: int | None = None  # evaluate on the first N test images (tests only; reports show N)
    # Where to run each model: "auto" (ONNX Runtime for our QDQ-quantized models, else PyTorch eager),
    # "all" (every runtime installed), or names from vitcompress.measure.runtimes.RUNTIMES.
    runtimes: list[str] = field(default_factory=lambda: ["auto"])
    # After the last row, re-time every row interleaved with the baseline (groups of this many rows,
    # the baseline one of them), so every speed-up is a same-round ratio; see vitcompress.study.retime.
    interleave: bool = True
    interleave_group: int = 8
    # A row whose accuracy rests on fewer test images says so (its standard error is in the report either way).
    min_test_images: int = field(default=1000, metadata=LATE)

    def __post_init__(self) -> None:
        check(1 <= self.batch_size <= MAX_BATCH, f"measure.batch_size must be in [1, {MAX_BATCH}]")
        check(1 <= self.eval_batch_size <= MAX_BATCH, f"measure.eval_batch_size must be in [1, {MAX_BATCH}]")
        # More threads than any machine has only buys an OpenMP pool that runs out of memory.
        check(self.threads is None or 1 <= self.threads <= MAX_THREADS,
              f"measure.threads must be in [1, {MAX_THREADS}] or null (every core)")
        check(1 <= self.repeats <= 10_000 and 0 <= self.warmup <= 10_000,
              "measure.repeats must be in [1, 10000] and warmup in [0, 10000]")
        check(0 <= self.min_repeat_seconds <= 600, "measure.min_repeat_seconds must be in [0, 600]")
        check(2 <= self.latency_samples <= 100_000, "measure.latency_samples must be in [2, 100000]")
        check(2 <= self.interleave_group <= 1_000,
              "measure.interleave_group must be in [2, 1000] (the baseline and a row at least)")
        check(self.test_subset is None or self.test_subset >= 1, "measure.test_subset must be >= 1 or null")
        check(self.min_test_images >= 0, "measure.min_test_images must be >= 0")
        from .runtimes import CHOICES

        bad = [r for r in self.runtimes if r not in CHOICES]
        check(bool(self.runtimes) and not bad, f"measure.runtimes: unknown runtime {bad[0] if bad else '(empty)'}; "
              f"choose from {', '.join(CHOICES)}")

    def resolved_threads(self) -> int:
        return self.threads or available_cores()


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


class Threads:
    """Fix torch's intra-op thread count for a block, then put it back."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


def uses_integer_kernels(model: nn.Module) -> bool:
    """True when the model holds modules whose matmuls run in integer arithmetic.

    PyTorch's quantized modules (dynamic or static) execute fbgemm/oneDNN int8
    kernels; fake-quant and float modules do not, however their weights look.
    """
    for mod in model.modules():
        name = type(mod).__module__
        if name.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")) and hasattr(mod, "_packed_params"):
            return True
    return False


def can_run_on_cuda(model: nn.Module) -> bool:
    # PyTorch's int8 quantized modules have CPU kernels only.
    return not uses_integer_kernels(model)


@torch.inference_mode()
def evaluate_accuracy(model: nn.Module, test_ds: Any, *, img_size: int, in_chans: int, batch_size: int = 256,
                      device: str = "cpu", progress: bool = False, desc: str = "eval") -> dict[str, Any]:
    """Top-1 (and top-5 with more than 10 classes) in percent over the whole of ``test_ds``."""
    from tqdm.auto import tqdm

    from ..data import make_loader

    model.eval()
    loader = make_loader(test_ds, batch_size, train=False, img_size=img_size, in_chans=in_chans)
    num_classes = test_ds.info.num_classes
    top1 = top5 = n = 0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, mininterval=1.0):
        logits = model(x.to(device))
        y = y.to(device)
        top1 += (logits.argmax(-1) == y).sum().item()
        if num_classes > 10:
            k = logits.topk(5, dim=-1).indices
            top5 += (k == y[:, None]).any(-1).sum().item()
        n += len(y)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n if num_classes > 10 else None, "n_test": n}


def _time_calls(fn: Callable[[], Any], warmup: int, repeats: int, min_seconds: float,
                sync: Callable[[], None] = lambda: None) -> list[float]:
    """Seconds per call, one number per repeat (each repeat loops until ``min_seconds``)."""
    for _ in range(warmup):
        fn()
    sync()
    # Calibrate how many calls make one repeat last min_seconds.
    t = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t, 1e-6)
    inner = max(1, int(min_seconds / once))
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        out.append((time.perf_counter() - t) / inner)
    return out


@torch.inference_mode()
def cpu_speed(model: nn.Module, example: torch.Tensor, cfg: MeasureConfig) -> dict[str, float]:
    """Throughput at ``cfg.batch_size`` and at batch 1, and batch-1 latency percentiles, on CPU."""
    model = model.cpu().eval()
    batch = _repeat_to(example, cfg.batch_size)
    one = example[:1]
    with Threads(cfg.resolved_threads()):
        per_batch = _time_calls(lambda: model(batch), cfg.warmup, cfg.repeats, cfg.min_repeat_seconds)
        per_one = _time_calls(lambda: model(one), cfg.warmup, cfg.repeats, cfg.min_repeat_seconds)
        lat = []
        for _ in range(cfg.latency_samples):
            t = time.perf_counter()
            model(one)
            lat.append(time.perf_counter() - t)
    lat.sort()
    return {
        "cpu_img_s": cfg.batch_size / statistics.median(per_batch),
        "cpu_img_s_b1": 1.0 / statistics.median(per_one),
        "latency_ms_p50": 1e3 * _percentile(lat, 50),
        "latency_ms_p95": 1e3 * _percentile(lat, 95),
    }


@torch.inference_mode()
def gpu_speed(model: nn.Module, example: torch.Tensor, cfg: MeasureConfig) -> float | None:
    """Images/s on CUDA at ``cfg.batch_size``, or None when there is no GPU or no CUDA kernel for the model."""
    if not (cfg.gpu and torch.cuda.is_available() and can_run_on_cuda(model)):
        return None
    dev_model = copy.deepcopy(model).cuda().eval()
    batch = _repeat_to(example, cfg.batch_size).cuda()
    per_batch = _time_calls(lambda: dev_model(batch), cfg.warmup, cfg.repeats, cfg.min_repeat_seconds,
                            sync=torch.cuda.synchronize)
    dev_model.cpu()
    torch.cuda.empty_cache()
    return cfg.batch_size / statistics.median(per_batch)


def count_macs(model: nn.Module, example: torch.Tensor) -> int | None:
    """Multiply-accumulates for one image, from torch's FlopCounterMode (FLOPs / 2).

    Quantized modules are invisible to the counter; call this on the float model
    that a quantization step started from (quantization keeps the MAC count).
    Attention is counted through PyTorch's math kernel: the counter has no formula for
    the CPU's fused ``scaled_dot_product_attention`` kernel and would leave out q.k^T
    and attn.v (1.9 M of vitc_small's 32.1 M MACs), which made a Nystrom row look more
    costly than the baseline whose attention it approximates.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]), counter:
        model.cpu().eval()(example[:1])
    flops = counter.get_total_flops()
    return int(flops // 2) if flops else None


def count_params(model: nn.Module) -> int:
    """Parameters of a float model, counting the weights packed inside quantized modules too."""
    total = sum(p.numel() for p in model.parameters())
    for mod in model.modules():
        # The quantized Linear itself, not its LinearPackedParams child (which would count twice).
        if isinstance(getattr(mod, "_packed_params", None), nn.Module) and hasattr(mod, "_weight_bias"):
            w, b = mod._weight_bias()
            total += w.numel() + (b.numel() if b is not None else 0)
        # Bit-packed weights (LSQ, DiffQ) are buffers; their modules say how many weights they hold.
        total += int(getattr(mod, "weight_numel", 0))
    return total


_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16",
              "amx_int8", "asimd", "sve", "bf16", "i8mm")


def environment(threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    import timm

    cpu = unnamed = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == unnamed:
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # The instructions int8 and bf16 kernels choose between: the same model name has been seen with
        # and without AMX, and the speed-ups of int8 rows differ by several times between them.
        "cpu_isa": [flag for flag in _ISA_FLAGS if flag in flags],
        "cores_available": available_cores(),
        "threads": threads,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "quantized_engine": torch.backends.quantized.engine,
    }


def _repeat_to(example: torch.Tensor, n: int) -> torch.Tensor:
    reps = -(-n // len(example))
    return example.repeat(reps, 1, 1, 1)[:n].contiguous()


def _percentile(sorted_values: list[float], q: float) -> float:
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)
