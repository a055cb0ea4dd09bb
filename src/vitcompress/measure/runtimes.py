"""Runtimes a saved model can be measured in: the same model, deployed where a user would run it.

``torch-eager`` runs the PyTorch module as is. ``torch-compile`` compiles it
(``dynamic=True``: with static shapes and freezing, Inductor's CPU path falls back
to slower GEMMs here). ``onnxruntime`` and ``openvino`` run the ONNX export; for
our QDQ-quantized models the export carries our own calibrated scales, so the
runtime executes our quantization rather than one of its own. Whether integer
kernels ran is read from what the runtime actually executes (ONNX Runtime's
optimized graph, OpenVINO's execution graph), never assumed. The two PyTorch
runtimes also run on CUDA (``device="cuda"``) when a GPU is present.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import VitcompressError

RUNTIMES = ("torch-eager", "torch-compile", "onnxruntime", "openvino")
CHOICES = ("auto", "all", *RUNTIMES)
CUDA_RUNTIMES = ("torch-eager", "torch-compile")


@dataclass
class Deployed:
    runtime: str  # as reported in a row, e.g. "onnxruntime-cpu"
    fn: Callable[[torch.Tensor], torch.Tensor]
    int_arithmetic: bool
    float_parts: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"  # where ``fn`` wants its input tensor


class _Callable(nn.Module):
    """Wrap a runtime's callable so accuracy and timing code can treat it like a module."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def resolve(names: list[str] | tuple[str, ...], model: nn.Module) -> list[str]:
    """The runtimes to measure ``model`` in. ``auto``: ONNX Runtime for our QDQ-quantized models (deployed
    through it), PyTorch eager for everything else; ``all``: every runtime installed here."""
    from ..export.onnx import deploy_runtime

    out: list[str] = []
    for name in names:
        if name == "auto":
            # A QDQ model in eager PyTorch is a float simulation, not a deployment: measure it where it deploys.
            out += ["onnxruntime"] if deploy_runtime(model) == "onnxruntime" else ["torch-eager"]
        elif name == "all":
            out += [r for r in RUNTIMES if installed(r)]
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def installed(runtime: str) -> bool:
    import importlib.util

    module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(runtime)
    return module is None or importlib.util.find_spec(module) is not None


def deploy(runtime: str, model: nn.Module, example: torch.Tensor, threads: int, work_dir: Path,
           device: str = "cpu") -> Deployed:
    """``model`` ready to run in ``runtime``; raises ``RuntimeError`` when it cannot run there.

    ``device="cuda"`` runs the PyTorch runtimes on the GPU (on a copy of ``model``).
    """
    from . import uses_integer_kernels

    if device == "cuda":
        return _deploy_cuda(runtime, model)
    if device != "cpu":
        raise ValueError(f"unknown device {device!r}; choose cpu or cuda")
    model = model.cpu().eval()
    if runtime == "torch-eager":
        return Deployed("torch-eager-cpu", model, uses_integer_kernels(model))
    if runtime == "torch-compile":
        compiled = torch.compile(model, dynamic=True)
        return Deployed("torch-compile-cpu", compiled, uses_integer_kernels(model))
    if runtime in ("onnxruntime", "openvino") and uses_integer_kernels(model):
        # Said plainly instead of the exporter's own error, which names neither cause nor way out.
        raise RuntimeError("PyTorch's int8 modules (ptq.dynamic) have no ONNX export; they run in torch-eager. "
                           "For ONNX Runtime or OpenVINO quantize with ptq.static")
    if runtime == "onnxruntime":
        from ..export.onnx import OnnxRunner, deployment_info

        onnx_path = _export(model, example, work_dir)
        info = deployment_info(model, onnx_path)
        return Deployed("onnxruntime-cpu", OnnxRunner(onnx_path, threads), info["int_arithmetic"],
                        info["float_parts"] if info["int_arithmetic"] else None,
                        {"integer_ops": info["integer_ops"]})
    if runtime == "openvino":
        return deploy_openvino(_export(model, example, work_dir / "openvino", target="openvino"), threads)
    raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(CHOICES)}")


def cuda_unavailable_reason() -> str | None:
    """Why nothing can run on CUDA here, or None when a GPU is usable."""
    if not torch.cuda.is_available():
        return "CUDA is not available here (torch.cuda.is_available() is False: no GPU, driver or CUDA build)"
    return None


def _deploy_cuda(runtime: str, model: nn.Module) -> Deployed:
    import copy

    from . import can_run_on_cuda

    if runtime not in CUDA_RUNTIMES:
        raise RuntimeError(f"{runtime} runs on the CPU only here; on CUDA choose {' or '.join(CUDA_RUNTIMES)}")
    reason = cuda_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    if not can_run_on_cuda(model):
        raise RuntimeError("PyTorch's int8 quantized modules have CPU kernels only")
    on_gpu = copy.deepcopy(model).cuda().eval()
    fn = on_gpu if runtime == "torch-eager" else torch.compile(on_gpu, dynamic=True)
    # On CUDA every matmul is a float kernel: fake-quant modules simulate, they do not run integers.
    return Deployed(f"{runtime}-cuda", fn, False, device="cuda")


@functools.cache
def code_fingerprint() -> str:
    """A hash of this package's source and torch's version: what an exported graph was made by."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(torch.__version__.encode())
    for file in sorted(root.rglob("*.py")):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module, example: torch.Tensor, target: str = "any") -> str:
    """A hash of what an export of ``model`` depends on: its module tree, every tensor of its state
    (names, shapes, dtypes, values), the example's shape and the export target."""
    digest = hashlib.sha256(f"{target}\0{tuple(example.shape)}\0{example.dtype}\0{model!r}".encode())
    for name, value in model.state_dict().items():
        digest.update(name.encode() + b"\0")
        if not isinstance(value, torch.Tensor):  # a packed-params object: its repr names its contents' shapes
            digest.update(repr(value).encode())
            continue
        value = value.detach().cpu()
        if value.is_quantized:
            value = value.int_repr()
        digest.update(f"{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _export(model: nn.Module, example: torch.Tensor, work_dir: Path, target: str = "any") -> Path:
    """The model's ONNX file in ``work_dir``, exported once and reused while neither the model nor the code
    that wrote it changed.

    A resumed study re-deploys its saved artifacts; an export cached by an earlier version of this
    package (a changed token-merging graph, say) would be timed in place of what the code now builds,
    so the file is stamped with :func:`code_fingerprint` and exported again when the stamp differs.
    The stamp holds :func:`model_fingerprint` too: a benchmark that deploys other models into folders it
    used before (``l0``, ``l1``, ...) timed the earlier run's models while the stamp named the code alone.
    """
    from ..export.onnx import export_onnx

    path, stamp = work_dir / "model.onnx", work_dir / "model.onnx.code"
    fingerprint = f"{code_fingerprint()} {model_fingerprint(model, example[:2], target)}"
    if not path.exists() or not stamp.exists() or stamp.read_text().strip() != fingerprint:
        work_dir.mkdir(parents=True, exist_ok=True)
        tmp = work_dir / "model.tmp.onnx"
        export_onnx(model, example[:2], tmp, target=target)
        tmp.replace(path)
        stamp.write_text(fingerprint + "\n")
    return path


STATIC_SHAPES = 4  # input shapes an OpenVINO deployment compiles a static-shape model for


def deploy_openvino(model: Path | str | Any, threads: int, precision: str | None = None) -> Deployed:
    """An ONNX file (path) or an ``openvino.Model`` compiled for the CPU with ``threads`` threads, one stream.

    ``precision`` ("f32", "bf16") sets OpenVINO's ``INFERENCE_PRECISION_HINT`` for its float parts; None keeps
    OpenVINO's default for this CPU (bf16 where the CPU has bf16 instructions). Integer parts (QDQ or
    FakeQuantize nodes) run int8 either way; the runtime label names the float precision that was used.

    The model is compiled again for each input shape it meets (up to ``STATIC_SHAPES`` shapes, then the
    dynamic-batch compilation serves the rest), as one deploys OpenVINO for a fixed batch size: with static
    shapes the CPU plugin plans memory once and skips per-call shape inference. Measured on the
    fashion-mnist ViT at batch 16, the static compilation ran 1.14x as fast as the dynamic one, and for
    its token-merging variant (718 graph nodes against 463) 1.26x.
    """
    try:
        import openvino as ov
    except ImportError:
        raise VitcompressError("OpenVINO is not installed; pip install 'vitcompress[openvino]'") from None

    core = ov.Core()
    source = core.read_model(str(model)) if isinstance(model, (str, Path)) else model
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(source, "CPU", config)
    dynamic = compiled.create_infer_request()
    precisions, integer_layers = openvino_layer_precisions(compiled)
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    hint = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    static: dict[tuple[int, ...], Any] = {}  # input shape -> infer request of a compilation for that shape
    reshapable = source.inputs[0].get_partial_shape().is_dynamic  # a static-shape source serves its one shape

    def request_for(shape: tuple[int, ...]) -> Any:
        if shape not in static:
            if len(static) >= STATIC_SHAPES or not reshapable:
                return dynamic
            fixed = source.clone()
            fixed.reshape({fixed.inputs[0]: ov.PartialShape(list(shape))})
            static[shape] = core.compile_model(fixed, "CPU", config).create_infer_request()
        return static[shape]

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float().contiguous()
        out = request_for(tuple(x.shape)).infer({0: x.numpy()})
        return torch.from_numpy(next(iter(out.values())).copy())

    return Deployed(f"openvino-cpu-{hint.lower()}", run, bool(integer_layers),
                    info={"precisions": sorted(precisions), "inference_precision": hint,
                          "integer_layers": integer_layers})


# Layers of OpenVINO's CPU execution graph that do a model's multiply-accumulates.
_OV_COMPUTE_LAYERS = frozenset({"FullyConnected", "MatMul", "Convolution", "GroupConvolution", "Deconvolution"})


def openvino_layer_precisions(compiled: Any) -> tuple[set[str], dict[str, int]]:
    """Every runtime precision in a compiled model's execution graph, and its compute layers that run on
    int8/uint8 inputs (layer type -> count).

    Only compute layers count as integer arithmetic: a float model's execution graph holds u8 constants
    and reorders too (masks, shape data), which compute nothing.
    """
    precisions: set[str] = set()
    integer: dict[str, int] = {}
    for node in compiled.get_runtime_model().get_ops():
        info = node.get_rt_info()
        if "runtimePrecision" not in info:
            continue
        precision = info["runtimePrecision"].astype(str)
        precisions.add(precision)
        layer = info["layerType"].astype(str) if "layerType" in info else ""
        if layer in _OV_COMPUTE_LAYERS and precision in ("i8", "u8"):
            integer[layer] = integer.get(layer, 0) + 1
    return precisions, integer


def as_module(dep: Deployed) -> nn.Module:
    return dep.fn if isinstance(dep.fn, nn.Module) else _Callable(dep.fn)
