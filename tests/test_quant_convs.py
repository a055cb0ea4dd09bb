"""Conv weights in the quantization methods: BatchNorm folding, int8 convs, QLinearConv in ONNX Runtime, float16 storage."""

from __future__ import annotations

import pytest
import torch
from conftest import synthetic_train_set, trained_like_batchnorms
from torch import nn

from vitcompress.artifact import (
    CODE_MIN_NUMEL,
    decode_uint8,
    encode_uint8,
    load_artifact,
    read_state,
    save_artifact,
    size_on_disk,
    stored_tensors,
)
from vitcompress.config import to_dict
from vitcompress.methods import get_method
from vitcompress.methods.quant.convs import conv_names, fold_batchnorms, refold_structure
from vitcompress.methods.quant.dynamic import DynamicQuantConfig
from vitcompress.methods.quant.fqvit import FQViTConfig
from vitcompress.methods.quant.qmodules import Int8Conv2d, QuantConv2d
from vitcompress.methods.quant.static import StaticQuantConfig
from vitcompress.models import ModelSpec, create_model
from vitcompress.study.context import StepContext
from vitcompress.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# vitc_small's layout (conv stem 32-64-128, width 96) at a quarter of its depth and stem width.
STEM_SPEC = ModelSpec("vitc_small", kwargs={"depth": 1, "stem": [8, 16, 16]})


def _stem_model() -> nn.Module:
    torch.manual_seed(0)
    return trained_like_batchnorms(create_model(STEM_SPEC), seed=0)


def _ctx(tmp_path) -> StepContext:
    return StepContext(synthetic_train_set(64), 28, 1, 10, 0, tmp_path, TrainConfig(epochs=1, mixed_precision="no"),
                       calib_images=64, progress=False)


def _x() -> torch.Tensor:
    return torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _save(model, out, method, cfg, meta, small_tensors="float16") -> None:
    save_artifact(model, out, {"model": STEM_SPEC.to_dict(),
                               "steps": [{"method": method, "config": to_dict(cfg), "meta": meta}]},
                  small_tensors=small_tensors)


def _dtypes(art) -> dict[str, str]:
    names = {torch.int8: "I8", torch.uint8: "U8", torch.float16: "F16", torch.float32: "F32",
             torch.float64: "F64", torch.int32: "I32", torch.int64: "I64"}
    return {k: names[t.dtype] for k, t in stored_tensors(art).items()}


def test_batchnorm_folding_keeps_the_function_and_restores_the_structure():
    model = _stem_model()
    x = _x()
    with torch.no_grad():
        ref = model(x)
    folded = fold_batchnorms(model)
    assert [p["bn"] for p in folded] == ["patch_embed.proj.layers.1", "patch_embed.proj.layers.4",
                                         "patch_embed.proj.layers.7"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    fresh = create_model(STEM_SPEC)
    refold_structure(fresh, folded)
    fresh.load_state_dict(model.state_dict())  # strict: same keys and shapes
    assert conv_names(model) == [f"patch_embed.proj.layers.{i}" for i in (0, 3, 6, 9)]


@pytest.mark.parametrize("method,cfg", [("ptq.static", StaticQuantConfig()), ("ptq.fqvit", FQViTConfig())])
def test_static_and_fqvit_quantize_the_conv_stem(tmp_path, method, cfg):
    model = _stem_model()
    out = get_method(method).apply(model, cfg, _ctx(tmp_path / "w"))
    q = out.model
    convs = [m for m in q.modules() if isinstance(m, QuantConv2d)]
    assert len(convs) == 4 == len(out.meta["convs"])
    assert not any(type(m) in (nn.Conv2d, nn.BatchNorm2d) for m in q.modules())
    assert all(float(c.input_quant.scale) != 1.0 for c in convs)  # calibrated
    _save(q, tmp_path / "a", method, cfg, out.meta)
    dtypes = _dtypes(tmp_path / "a")
    stem = {k: d for k, d in dtypes.items() if k.startswith("patch_embed.")}
    assert {d for k, d in stem.items() if k.endswith("weight_int8")} == {"I8"}
    assert not [k for k, d in stem.items() if d == "F32" and k.endswith("weight")]
    loaded = load_artifact(tmp_path / "a")
    x = _x()
    with torch.no_grad():
        ref, got = model(x), loaded(x)
    cos = torch.nn.functional.cosine_similarity(got, ref).min()
    assert cos > 0.98, cos


def test_qdq_conv_runs_as_qlinearconv_in_onnx_runtime(tmp_path):
    pytest.importorskip("onnxruntime")
    from vitcompress.export.onnx import OnnxRunner, export_onnx, optimized_op_counts

    q = get_method("ptq.static").apply(_stem_model(), StaticQuantConfig(), _ctx(tmp_path / "w")).model
    x = _x()
    path = export_onnx(q, x, tmp_path / "m.onnx")
    ops = optimized_op_counts(path)
    # Three 3x3 convs sit between two quantizers (a ReLU between is absorbed): integer convs. The
    # last 1x1 conv feeds float token arithmetic: its weight is int8 in the file, it convolves in float.
    assert ops.get("com.microsoft.QLinearConv") == 3, ops
    with torch.no_grad():
        torch.testing.assert_close(OnnxRunner(path)(x), q(x), atol=0.05, rtol=0.0)


def test_conv_quantization_can_be_switched_off_and_shrinks_the_file(tmp_path):
    model = _stem_model()
    sizes = {}
    for convs in (True, False):
        cfg = StaticQuantConfig(convs=convs)
        out = get_method("ptq.static").apply(model, cfg, _ctx(tmp_path / f"w{convs}"))
        assert (not convs) == any(isinstance(m, nn.BatchNorm2d) for m in out.model.modules())
        _save(out.model, tmp_path / f"c{convs}", "ptq.static", cfg, out.meta)
        sizes[convs] = size_on_disk(tmp_path / f"c{convs}")
    stem_weights = sum(m.weight.numel() for m in model.patch_embed.modules() if isinstance(m, nn.Conv2d))
    # float16 for what stays float (weights, BatchNorm) without convs, one byte per weight with them
    assert sizes[False] - sizes[True] >= stem_weights * 0.9


def test_dynamic_gives_the_stem_weight_only_int8(tmp_path):
    model = _stem_model()
    cfg = DynamicQuantConfig()
    out = get_method("ptq.dynamic").apply(model, cfg, None)
    convs = [m for m in out.model.modules() if isinstance(m, Int8Conv2d)]
    assert len(convs) == 4 and not any(isinstance(m, QuantConv2d) for m in convs)  # no input quantizer
    _save(out.model, tmp_path / "d", "ptq.dynamic", cfg, out.meta, small_tensors="float32")
    assert {d for k, d in _dtypes(tmp_path / "d").items() if k.endswith("weight_int8")} == {"I8"}
    loaded = load_artifact(tmp_path / "d")
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded(x), out.model(x))
        assert torch.nn.functional.cosine_similarity(loaded(x), model(x)).min() > 0.98


def test_float16_storage_halves_float_tensors_and_loads_as_float32(tmp_path):
    model = _stem_model()
    spec = {"model": STEM_SPEC.to_dict(), "steps": []}
    with torch.no_grad():
        model.pos_embed[0, 0, 0] = 1e6  # float16 overflows here: this tensor must stay float32
    save_artifact(model, tmp_path / "f32", spec)
    save_artifact(model, tmp_path / "f16", spec, small_tensors="float16")
    dtypes = _dtypes(tmp_path / "f16")
    assert dtypes["pos_embed"] == "F32" and dtypes["blocks.0.mlp.fc1.weight"] == "F16"
    state = read_state(tmp_path / "f32")
    floats = sum(t.numel() * 4 for k, t in state.items() if t.is_floating_point() and k != "pos_embed")
    saved = size_on_disk(tmp_path / "f32") - size_on_disk(tmp_path / "f16")
    assert abs(saved - floats / 2) < 0.01 * floats
    loaded = load_artifact(tmp_path / "f16")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0.05, rtol=0.01)
        assert not torch.equal(loaded(x), model(x))  # the file's rounding is in the loaded model


def test_uint8_codes_bound_their_error():
    torch.manual_seed(0)
    steps = torch.rand(300).mul(3).exp2() * 1e-3  # positive, spanning a factor 8: a log2 grid
    codes, params, grid = encode_uint8(steps)
    assert grid == "log2" and codes.dtype == torch.uint8 and codes.shape == steps.shape
    back = decode_uint8(codes, params, grid)
    lo, hi = steps.log2().min(), steps.log2().max()
    bound = 2 ** float((hi - lo) / 255 / 2) - 1  # half a grid step, as a ratio
    assert ((back / steps - 1).abs() <= bound * 1.001 + 1e-6).all()
    assert float(back.min()) == pytest.approx(float(steps.min()), rel=1e-5)  # the ends are on the grid
    assert float(back.max()) == pytest.approx(float(steps.max()), rel=1e-5)
    bias = torch.randn(4, 50)  # both signs: a uniform grid from min to max
    codes, params, grid = encode_uint8(bias)
    assert grid == "linear" and codes.shape == (4, 50)
    err = (decode_uint8(codes, params, grid) - bias).abs().max()
    assert err <= float(bias.max() - bias.min()) / 255 / 2 * 1.001
    assert err > 0  # 200 random values are not all on the grid
    flat = torch.full((20,), 0.25)  # one value: exact
    assert torch.equal(decode_uint8(*encode_uint8(flat)), flat)
    zeros = torch.zeros(20)  # not positive: the uniform grid, and still exact
    assert encode_uint8(zeros)[2] == "linear" and torch.equal(decode_uint8(*encode_uint8(zeros)), zeros)


def test_uint8_storage_codes_float_tensors_in_a_byte_and_loads_as_float32(tmp_path):
    model = _stem_model()
    spec = {"model": STEM_SPEC.to_dict(), "steps": []}
    save_artifact(model, tmp_path / "f16", spec, small_tensors="float16")
    save_artifact(model, tmp_path / "u8", spec, small_tensors="uint8")
    stored = stored_tensors(tmp_path / "u8")
    state = model.state_dict()
    coded = 0
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if value.dim() >= 2 and key.endswith(".weight"):  # a layer kept in float is not quantized by the file
            assert stored[key].dtype == torch.float16
        elif value.numel() >= CODE_MIN_NUMEL:
            assert stored[key + "::code"].dtype == torch.uint8 and key not in stored
            assert stored[key + "::code"].numel() == value.numel()
            coded += value.numel()
        else:  # a byte code and its two float32 numbers would cost more than float16
            assert stored[key].dtype == torch.float16
    # LayerNorm gains are all positive (log2 grid), the position embedding has both signs (uniform grid).
    from vitcompress.artifact import WEIGHTS_FILE, _open

    layout = _open(tmp_path / "u8" / WEIGHTS_FILE, lambda layout, f: layout)
    assert layout["norm.weight"]["kind"] == "uint8_log2" and layout["pos_embed"]["kind"] == "uint8_linear"
    saved = size_on_disk(tmp_path / "f16") - size_on_disk(tmp_path / "u8")
    # One byte less per coded value, less its two float32 grid numbers, less what the extra names and layout
    # entries add to the standard safetensors header.
    import struct

    def header(art):
        return 8 + struct.unpack("<Q", (art / WEIGHTS_FILE).read_bytes()[:8])[0]

    as_f16 = stored_tensors(tmp_path / "f16")
    codes = [k.removesuffix("::code") for k in stored if k.endswith("::code")]
    payload_saved = sum(as_f16[k].numel() * as_f16[k].element_size() - stored[k + "::code"].numel() - 8
                        for k in codes)
    assert len(codes) >= 3 and payload_saved >= coded - 8 * len(codes)  # float16 (or wider) -> one byte
    assert saved == payload_saved - (header(tmp_path / "u8") - header(tmp_path / "f16"))
    assert saved > 0.4 * coded
    loaded = load_artifact(tmp_path / "u8")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = _x()
    with torch.no_grad():
        ref, out = model(x), loaded(x)
        assert not torch.equal(out, ref)  # the file's rounding is in the loaded model
        assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.99


def test_small_tensor_storage_follows_the_chain():
    from vitcompress.methods import parse_config
    from vitcompress.study.recipe import Step
    from vitcompress.study.runner import small_tensor_storage

    def steps(*names_and_configs):
        return tuple(Step(name, parse_config(name, cfg, "test")) for name, cfg in names_and_configs)

    assert small_tensor_storage(()) == "float32"
    assert small_tensor_storage(steps(("lowrank.svd", {"keep": 0.5}))) == "float32"
    assert small_tensor_storage(steps(("ptq.dynamic", {}))) == "float16"
    assert small_tensor_storage(steps(("qat.lsq", {}))) == "uint8"  # LSQ's default
    assert small_tensor_storage(steps(("qat.lsq", {"small_tensors": "float16"}))) == "float16"
    assert small_tensor_storage(steps(("lowrank.svd", {"keep": 0.5}), ("qat.lsq", {}))) == "uint8"


def test_openvino_export_pads_quantized_convs_before_their_quantizer(tmp_path):
    import importlib.util

    import onnx

    from vitcompress.export.onnx import OnnxRunner, export_onnx, optimized_op_counts
    from vitcompress.measure.runtimes import as_module, deploy_openvino

    q = get_method("ptq.static").apply(_stem_model(), StaticQuantConfig(), _ctx(tmp_path / "w")).model
    convs = [m for m in q.patch_embed.proj.layers if isinstance(m, QuantConv2d)]
    x = _x()
    with torch.no_grad():  # padding first is the same arithmetic as the conv's own
        ref = q(x)
        for m in convs:
            m.pad_first = True
        assert torch.allclose(q(x), ref, atol=1e-5)
        for m in convs:
            m.pad_first = False
    plain = export_onnx(q, x, tmp_path / "any.onnx")
    ov = export_onnx(q, x, tmp_path / "ov.onnx", target="openvino")
    assert not any(m.pad_first for m in convs)  # the export leaves the model as it was
    n_pads = {p: sum(n.op_type == "Pad" for n in onnx.load(str(p)).graph.node) for p in (plain, ov)}
    assert n_pads == {plain: 0, ov: 3}  # the three 3x3 convs; the 1x1 pads nothing
    assert optimized_op_counts(plain).get("com.microsoft.QLinearConv") == 3
    runners = [OnnxRunner(plain, threads=1), OnnxRunner(ov, threads=1)]
    if importlib.util.find_spec("openvino") is not None:
        runners.append(as_module(deploy_openvino(ov, 1)))
    with torch.no_grad():
        for runner in runners:
            got = runner(x).float()
            assert torch.nn.functional.cosine_similarity(got, ref).min() >= 0.999
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
