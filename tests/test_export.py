"""ONNX export: float parity, QDQ graphs with our scales and int8 initializers, integer kernels in ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnx_checks import assert_int8_initializers_are_ours

from vitcompress.data import ImageTensorDataset, dataset_info, make_loader
from vitcompress.export.onnx import (
    FLOAT_PARTS_KEY,
    OnnxRunner,
    deploy_runtime,
    deployment_info,
    export_onnx,
    float_parts,
    integer_ops_in_session,
    parity,
)
from vitcompress.measure import MeasureConfig, cpu_speed, evaluate_accuracy
from vitcompress.methods import get_method
from vitcompress.methods.quant.fqvit import FQViTConfig
from vitcompress.methods.quant.qmodules import ActQuantizer, QuantConv2d, QuantLinear
from vitcompress.methods.quant.static import StaticQuantConfig
from vitcompress.models import ModelSpec, create_model
from vitcompress.study.context import StepContext
from vitcompress.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(n: int = 128) -> ImageTensorDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageTensorDataset(images, labels, dataset_info("fashion-mnist"), "test", "synthetic")


def _batch(ds: ImageTensorDataset, n: int) -> torch.Tensor:
    return next(iter(make_loader(ds, n, train=False, img_size=28, in_chans=1)))[0]


def _quantize(method: str, cfg, tmp_path) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = create_model(ModelSpec("vitc_micro")).eval()
    ctx = StepContext(_dataset(), 28, 1, 10, 0, tmp_path, TrainConfig(mixed_precision="no"), calib_images=128,
                      progress=False)
    return model, get_method(method).apply(model, cfg, ctx).model


def test_float_model_parity(tmp_path):
    torch.manual_seed(0)
    model = create_model(ModelSpec("vitc_micro")).eval()
    x = _batch(_dataset(), 16)
    path = export_onnx(model, x, tmp_path / "f.onnx")
    # The exporter's per-node PyTorch provenance is dropped; the model-level float_parts stays.
    saved = onnx.load(str(path))
    assert not any(n.metadata_props for n in saved.graph.node)
    assert FLOAT_PARTS_KEY in {p.key for p in saved.metadata_props}
    runner = OnnxRunner(path, threads=1)
    with torch.no_grad():
        for n in (1, 5, 16):  # the batch dimension is dynamic
            np.testing.assert_allclose(runner(x[:n]).numpy(), model(x[:n]).numpy(), atol=1e-4, rtol=0)
    assert deploy_runtime(model) is None and integer_ops_in_session(path) == []
    assert float_parts(model) == ["all (float model)"]


def test_static_int8_graph_runs_integer_matmuls(tmp_path):
    _, q = _quantize("ptq.static", StaticQuantConfig(), tmp_path)
    ds = _dataset()
    x = _batch(ds, 64)
    path = export_onnx(q, x[:16], tmp_path / "q.onnx")
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    qlinears = [m for m in q.modules() if isinstance(m, QuantLinear)]
    qconvs = [m for m in q.modules() if isinstance(m, QuantConv2d)]
    # The int8 initializers are our weights, bit for bit: 9 Linear layers and the patch projection.
    assert len(assert_int8_initializers_are_ours(path, q)) == len(qlinears) + len(qconvs) == 9 + 1
    # Every QuantizeLinear uses one of our calibrated activation scales.
    act_scales = {np.float32(float(m.scale)) for m in q.modules() if isinstance(m, ActQuantizer)}
    ql = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(ql) == len(qlinears) + len(qconvs)
    assert {np.float32(inits[n.input[1]].item()) for n in ql} <= act_scales
    assert json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}[FLOAT_PARTS_KEY]) == \
        float_parts(q)

    runner = OnnxRunner(path, threads=1)
    par = parity(q, runner, x)
    assert par["top1_agreement"] >= 0.99 and par["cosine"] >= 0.99
    ops = integer_ops_in_session(path)
    assert ops.count("MatMulIntegerToFloat") == len(qlinears)  # every Linear, the head included
    info = deployment_info(q, path)
    assert info["int_arithmetic"] and info["runtime"] == "onnxruntime-cpu"
    assert info["float_matmuls"] == 4  # q·kᵀ and attn·V of 2 blocks: ptq.static leaves attention float
    assert deploy_runtime(q) == "onnxruntime"
    # The runner stands in for a torch model in the study's measurement functions.
    acc = evaluate_accuracy(runner, ds, img_size=28, in_chans=1, batch_size=64)
    assert acc["n_test"] == len(ds)
    speed = cpu_speed(runner, x[:4], MeasureConfig(batch_size=4, threads=1, warmup=1, repeats=2,
                                                   min_repeat_seconds=0.01, latency_samples=3))
    assert speed["cpu_img_s"] > 0


def test_static_qk_attention_exports_signed_int8_scores(tmp_path):
    _, q = _quantize("ptq.static", StaticQuantConfig(quant_attn_matmul="qk"), tmp_path)
    x = _batch(_dataset(), 32)
    path = export_onnx(q, x[:16], tmp_path / "qk.onnx")
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    zps = [inits[n.input[2]].dtype for n in graph.node if n.op_type == "QuantizeLinear"]
    n_layers = sum(isinstance(m, (QuantLinear, QuantConv2d)) for m in q.modules())
    # Each layer's input is uint8; the queries and keys of the 2 blocks are int8 (symmetric, zero point 0).
    assert sorted(map(str, zps)) == ["int8"] * 4 + ["uint8"] * n_layers
    assert not any(inits[n.input[2]].any() for n in graph.node
                   if n.op_type == "QuantizeLinear" and inits[n.input[2]].dtype == np.int8)
    par = parity(q, OnnxRunner(path, threads=1), x)
    assert par["top1_agreement"] >= 0.99 and par["cosine"] >= 0.999
    assert "attn·V (only q·kᵀ has quantized inputs)" in float_parts(q)


def test_fqvit_graph_parity_and_float_parts(tmp_path):
    _, q = _quantize("ptq.fqvit", FQViTConfig(), tmp_path)
    x = _batch(_dataset(), 64)
    path = export_onnx(q, x[:16], tmp_path / "fq.onnx")
    par = parity(q, str(path), x)
    assert par["top1_agreement"] >= 0.99 and par["cosine"] >= 0.99
    info = deployment_info(q, path)
    assert info["integer_ops"] == {"MatMulIntegerToFloat": 9, "QLinearMatMul": 2}  # Linears; q·kᵀ per block
    assert info["float_matmuls"] == 2  # attn·V with 2^−q probabilities, one per block
    parts = info["float_parts"]
    assert any(p.startswith("Log-Int-Softmax") for p in parts) and any(p.startswith("PTF") for p in parts)


@pytest.mark.parametrize("merge", [{"entry": 6}, {"r": 3}, {"entry": 4, "schedule": [2]}])
def test_token_merged_model_exports_with_parity(tmp_path, merge):
    # Merging picks tokens per image (argsort, gather, one-hot matmul): the graph must keep that data-dependent
    # choice, not the example batch's, at every batch size.
    from vitcompress.config import from_dict
    from vitcompress.methods.prune.tome import TokenMergeConfig

    torch.manual_seed(0)
    model = create_model(ModelSpec("vitc_micro")).eval()
    merged = get_method("tokens.merge").apply(model, from_dict(TokenMergeConfig, merge, "test"), None).model
    x = _batch(_dataset(), 16)
    runner = OnnxRunner(export_onnx(merged, x[:2], tmp_path / "m.onnx"), threads=1)
    with torch.no_grad():
        for n in (1, 5, 16):
            np.testing.assert_allclose(runner(x[:n]).numpy(), merged(x[:n]).numpy(), atol=1e-4, rtol=0)
