"""ONNX export with our own quantization parameters, and ONNX Runtime execution.

:func:`export_onnx` exports any artifact model with ``torch.onnx.export``
(dynamo exporter, dynamic batch). The quantized modules of
:mod:`vitcompress.methods.quant.qmodules` call two custom ops that translate to
standard QDQ (ONNX operator docs: QuantizeLinear / DequantizeLinear):

* ``fake_quant(x, s, zp)`` → ``QuantizeLinear(x, s, zp) → DequantizeLinear`` with
  *our calibrated* ``s`` and uint8 ``zp`` (per-axis on the last dim for PTF);
* ``dequant_weight_t(w_int8, s_c)`` → ``DequantizeLinear(w_int8ᵀ, s_c, axis=1)`` on an
  int8 initializer, so the ONNX file holds the integer weights;
* ``dequant_weight(w_int8, s_c)`` (conv weights) → ``DequantizeLinear(w_int8, s_c, axis=0)``.

ONNX Runtime's QDQ transformer rewrites ``DQ(Q(x)) → MatMul ← DQ(w_int8)`` into
``com.microsoft.MatMulIntegerToFloat`` (uint8 × int8 products accumulated in
int32, then one float scale): that is where the integer arithmetic happens. A conv
between two quantizers (``DQ → Conv → [Relu] → Q``) becomes ``QLinearConv``.
:func:`integer_ops_in_session` reads the graph ORT actually runs (its
``optimized_model_filepath`` output) so a result row can say ``int_arithmetic``
from evidence, and :func:`float_parts` names what stays float.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import VitcompressError

# Operators of ONNX Runtime's CPU provider that compute on integer operands (int8/uint8 in, int32 accumulate).
INTEGER_OPS = frozenset({
    "MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul", "QAttention",
    "QLinearConv", "ConvInteger", "QLinearAdd", "QLinearMul", "QLinearSoftmax", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearReduceMean",
    "QLinearWhere", "QEmbedLayerNormalization",
})
FLOAT_PARTS_KEY = "vitcompress.float_parts"


# ---- translations of our custom ops (onnxscript, traced) ------------------------------------------------------
def _fake_quant_onnx(x: Any, scale: Any, zero_point: Any, qmin: int, qmax: int) -> Any:
    from onnxscript import ir
    from onnxscript import opset18 as op

    signed = qmin < 0
    qtype = ir.DataType.INT8 if signed else ir.DataType.UINT8
    full = (-128, 127) if signed else (0, 255)
    axis = {"axis": -1} if len(scale.shape or ()) == 1 else {}
    zp = op.Cast(zero_point, to=qtype)
    if (qmin, qmax) != full:
        # QuantizeLinear saturates to the container's range; a narrower code range (b < 8) is a clip of
        # the float input, which keeps Q right after it and DQ right before the consumer.
        zpf = op.Cast(zero_point, to=ir.DataType.FLOAT)
        lo = op.Mul(op.Sub(op.Constant(value_float=float(qmin)), zpf), scale)
        hi = op.Mul(op.Sub(op.Constant(value_float=float(qmax)), zpf), scale)
        x = op.Min(op.Max(x, lo), hi)
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp, **axis), scale, zp, **axis)


def _dequant_weight_t_onnx(w_int: Any, scale: Any) -> Any:
    from onnxscript import opset18 as op

    # The exporter's optimizer folds the Transpose of the int8 initializer, leaving an (in, out) int8 initializer.
    return op.DequantizeLinear(op.Transpose(w_int, perm=[1, 0]), scale, axis=1)


def _dequant_weight_onnx(w_int: Any, scale: Any) -> Any:
    from onnxscript import opset18 as op

    return op.DequantizeLinear(w_int, scale, axis=0)


def _translation_table() -> dict[Any, Any]:
    from ..methods.quant import qmodules  # noqa: F401  (registers the custom ops)

    return {
        torch.ops.vitcompress.fake_quant.default: _fake_quant_onnx,
        torch.ops.vitcompress.dequant_weight_t.default: _dequant_weight_t_onnx,
        torch.ops.vitcompress.dequant_weight.default: _dequant_weight_onnx,
    }


# ---- export ---------------------------------------------------------------------------------------------------
def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, opset: int = 18,
                target: str = "any") -> Path:
    """Write ``model`` as ONNX to ``path`` (batch dimension dynamic) and return the path.

    ``opset`` defaults to 18, the lowest the PyTorch exporter implements (a lower one is a lossy
    down-conversion). The file's metadata ``vitcompress.float_parts`` lists what runs in float.
    ``target="openvino"``: quantized padded convs pad before their input quantizer (see
    ``QuantConv2d.forward``), which OpenVINO needs and which costs ONNX Runtime its QLinearConv fusion.
    """
    from ..methods.quant.qmodules import QuantConv2d

    if target not in ("any", "openvino"):
        raise ValueError(f"unknown export target {target!r}; choose any or openvino")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    example = example.detach().cpu().float()
    if example.shape[0] < 2:
        # A batch of 1 would be specialized away by the tracer; the graph must take any batch.
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    convs = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    for m in convs:
        m.pad_first = target == "openvino"
    try:
        program = _export_program(model, example, opset)
    finally:
        for m in convs:
            m.pad_first = False
    program.model.metadata_props[FLOAT_PARTS_KEY] = json.dumps(float_parts(model))
    # The exporter tags every node and value with where it came from in PyTorch (module path, class
    # hierarchy, FX node): 37% of a quantized vitc_small file. A deployment file does not need it.
    for node in program.model.graph:
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()
    tmp = path.with_name(path.name + ".tmp")
    program.save(str(tmp), external_data=False)
    os.replace(tmp, path)
    return path


def _export_program(model: nn.Module, example: torch.Tensor, opset: int) -> Any:
    from torch.export import Dim

    with torch.no_grad():
        try:
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=opset, input_names=["images"],
                output_names=["logits"], dynamic_shapes=({0: Dim("batch")},),
                custom_translation_table=_translation_table(), external_data=False, optimize=True, verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; name the step that failed
            raise VitcompressError(f"ONNX export of {type(model).__name__} failed ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:200]})") from exc
    assert program is not None
    return program


def float_parts(model: nn.Module) -> list[str]:
    """The parts of ``model`` that run as float ops in ONNX Runtime (empty list: none named)."""
    from timm.models.vision_transformer import Attention

    from ..methods.quant.qmodules import (
        LogIntSoftmax,
        PowerOfTwoLayerNorm,
        QuantAttention,
        QuantConv2d,
        QuantLinear,
    )

    mods = list(model.modules())
    if not any(isinstance(m, QuantLinear) for m in mods):
        return ["all (float model)"]
    parts: list[str] = []
    float_linear = sum(type(m) is nn.Linear for m in mods)
    if float_linear:
        parts.append(f"{float_linear} float Linear layer(s)")
    if any(isinstance(m, nn.Conv2d) for m in mods):
        parts.append("patch embedding (Conv)")
    elif any(isinstance(m, QuantConv2d) for m in mods):
        # Its output feeds float token arithmetic (no quantizer after it): int8 weights, float convolution.
        parts.append("last conv of the patch embedding (int8 weights, float Conv)")
    if any(isinstance(m, PowerOfTwoLayerNorm) and m.ptf for m in mods):
        parts.append("PTF quantizer and LayerNorm (per-channel 2^α quantize/dequantize, float normalization)")
    elif any(isinstance(m, PowerOfTwoLayerNorm) for m in mods):
        parts.append("LayerNorm (quantized input, float normalization)")
    if any(isinstance(m, nn.LayerNorm) and not isinstance(m, PowerOfTwoLayerNorm) for m in mods):
        parts.append("LayerNorm")
    if any(isinstance(m, Attention) and not isinstance(m, QuantAttention) for m in mods):
        parts.append("attention matmuls q·kᵀ and attn·V")
        parts.append("softmax")
    if any(isinstance(m, LogIntSoftmax) for m in mods):
        parts.append("Log-Int-Softmax (i-exp and log2 rounding as float ops)")
        parts.append("attn·V with 2^−q probabilities (float MatMul; shifts on integer hardware)")
    elif any(isinstance(m, QuantAttention) for m in mods):
        parts.append("softmax")
        if any(isinstance(m, QuantAttention) and m.qk_only for m in mods):
            parts.append("attn·V (only q·kᵀ has quantized inputs)")
    parts.append("GELU")
    parts.append("residual and bias adds")
    return parts


def deploy_runtime(model: nn.Module) -> str | None:
    """``"onnxruntime"`` when the model's integer form is our QDQ modules (deployed through ONNX), else None."""
    from ..methods.quant.qmodules import QuantModule

    return "onnxruntime" if any(isinstance(m, QuantModule) for m in model.modules()) else None


# ---- ONNX Runtime ---------------------------------------------------------------------------------------------
def _session_options(threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only (the NCHWc "optimized model is hardware specific" notice is expected)
    return so


class OnnxRunner:
    """An ONNX Runtime CPU session behind a torch-like call: ``runner(x) -> logits`` (torch tensors).

    ``eval()``/``cpu()`` return the runner itself, so the study's ``evaluate_accuracy`` and
    ``cpu_speed`` can time it exactly as they time a torch model. The thread count is fixed here,
    at session creation (ORT has no per-call setting).
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.threads = threads
        self.session = ort.InferenceSession(str(self.path), _session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])

    def eval(self) -> OnnxRunner:
        return self

    def cpu(self) -> OnnxRunner:
        return self

    def __repr__(self) -> str:
        return f"OnnxRunner({self.path.name}, threads={self.threads})"


def optimized_op_counts(path: str | os.PathLike) -> dict[str, int]:
    """Op types (``domain.Op`` outside the default domain) of the graph ORT runs after its optimizations."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        so = _session_options(1)
        so.optimized_model_filepath = str(out)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(out), load_external_data=False).graph
        return dict(Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in graph.node))


def _integer_ops(counts: dict[str, int]) -> list[str]:
    found = []
    for name, n in sorted(counts.items()):
        if name.rsplit(".", 1)[-1] in INTEGER_OPS:
            found += [name.rsplit(".", 1)[-1]] * n
    return found


def integer_ops_in_session(path: str | os.PathLike) -> list[str]:
    """One entry per node of ORT's optimized graph that computes on integers (e.g. ``MatMulIntegerToFloat``)."""
    return _integer_ops(optimized_op_counts(path))


def deployment_info(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """What a result row needs to say about the ONNX Runtime deployment of ``model`` exported to ``path``.

    ``float_parts`` names the float parts from the model's structure and adds, as evidence from the
    graph ORT runs, how many matmuls it left in float (e.g. ``attn·V`` after Log-Int-Softmax, or a
    matmul whose QDQ pattern ORT did not fuse).
    """
    counts = optimized_op_counts(path)
    ops = _integer_ops(counts)
    float_mm = sum(n for op, n in counts.items() if op.rsplit(".", 1)[-1] in ("MatMul", "FusedMatMul", "Gemm"))
    parts = float_parts(model)
    if float_mm:
        parts = parts + [f"{float_mm} MatMul/Gemm node(s) left in float by ONNX Runtime"]
    return {"runtime": "onnxruntime-cpu", "int_arithmetic": bool(ops), "integer_ops": dict(Counter(ops)),
            "float_matmuls": float_mm, "float_parts": parts}


@torch.no_grad()
def parity(model: nn.Module, session: OnnxRunner | Any, x: torch.Tensor) -> dict[str, float]:
    """How closely the ONNX Runtime logits follow the PyTorch ones on ``x``.

    ``top1_agreement`` (fraction of equal argmax), ``max_abs_logit_err``, ``cosine`` (mean per-sample
    cosine similarity of the logit vectors). ``session``: an :class:`OnnxRunner`, an
    ``onnxruntime.InferenceSession`` or a path to an ONNX file.
    """
    if isinstance(session, (str, os.PathLike)):
        session = OnnxRunner(session)
    elif not isinstance(session, OnnxRunner):
        name = session.get_inputs()[0].name
        raw = session
        session = lambda t: torch.from_numpy(raw.run(None, {name: t.numpy()})[0])  # noqa: E731
    from ..measure.bench import logit_parity

    return logit_parity(model.cpu().eval()(x.cpu().float()), session(x.cpu().float()))
