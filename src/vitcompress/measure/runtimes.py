"""Runtimes a saved model can be measured in: the same model, deployed where a user would run it.

``torch-eager`` runs the PyTorch module as is. ``torch-compile`` compiles it
(``dynamic=True``: with static shapes and freezing, Inductor's CPU path falls back
to slower GEMMs here). ``onnxruntime`` and ``openvino`` run the ONNX export; for
our QDQ-quantized models the export carries our own calibrated scales, so the
runtime executes our quantization rather than one of its own. Whether integer
kernels ran is read from what the runtime actually executes (ONNX Runtime's
optimized graph, OpenVINO's execution graph), never assumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

RUNTIMES = ("torch-eager", "torch-compile", "onnxruntime", "openvino")
CHOICES = ("auto", "all", *RUNTIMES)


@dataclass
class Deployed:
    runtime: str  # as reported in a row, e.g. "onnxruntime-cpu"
    fn: Callable[[torch.Tensor], torch.Tensor]
    int_arithmetic: bool
    float_parts: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)


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
            out += [r for r in RUNTIMES if _installed(r)]
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def _installed(runtime: str) -> bool:
    import importlib.util

    module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(runtime)
    return module is None or importlib.util.find_spec(module) is not None


def deploy(runtime: str, model: nn.Module, example: torch.Tensor, threads: int, work_dir: Path) -> Deployed:
    """``model`` ready to run in ``runtime``; raises ``RuntimeError`` when it cannot run there."""
    from . import uses_integer_kernels

    model = model.cpu().eval()
    if runtime == "torch-eager":
        return Deployed("torch-eager-cpu", model, uses_integer_kernels(model))
    if runtime == "torch-compile":
        compiled = torch.compile(model, dynamic=True)
        return Deployed("torch-compile-cpu", compiled, uses_integer_kernels(model))
    onnx_path = _export(model, example, work_dir)
    if runtime == "onnxruntime":
        from ..export.onnx import OnnxRunner, deployment_info

        info = deployment_info(model, onnx_path)
        return Deployed("onnxruntime-cpu", OnnxRunner(onnx_path, threads), info["int_arithmetic"],
                        info["float_parts"] if info["int_arithmetic"] else None,
                        {"integer_ops": info["integer_ops"]})
    if runtime == "openvino":
        return _openvino(onnx_path, threads)
    raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(CHOICES)}")


def _export(model: nn.Module, example: torch.Tensor, work_dir: Path) -> Path:
    from ..export.onnx import export_onnx

    path = work_dir / "model.onnx"
    if not path.exists():
        work_dir.mkdir(parents=True, exist_ok=True)
        tmp = work_dir / "model.tmp.onnx"
        export_onnx(model, example[:2], tmp)
        tmp.replace(path)
    return path


def _openvino(onnx_path: Path, threads: int) -> Deployed:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU",
                                  {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1})
    request = compiled.create_infer_request()
    precisions = {n.get_rt_info()["runtimePrecision"].astype(str)
                  for n in compiled.get_runtime_model().get_ops() if "runtimePrecision" in n.get_rt_info()}
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    hint = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)

    def run(x: torch.Tensor) -> torch.Tensor:
        out = request.infer({0: x.detach().cpu().float().contiguous().numpy()})
        return torch.from_numpy(next(iter(out.values())).copy())

    return Deployed(f"openvino-cpu-{hint.lower()}", run, bool(precisions & {"i8", "u8"}),
                    info={"precisions": sorted(precisions), "inference_precision": hint})


def as_module(dep: Deployed) -> nn.Module:
    return dep.fn if isinstance(dep.fn, nn.Module) else _Callable(dep.fn)
