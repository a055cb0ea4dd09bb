"""qat.lsq and qat.diffq: LSQ's gradients, QAT training, bit packing, conv quantization (BatchNorm folded),
and packed artifacts whose bytes are the size."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_train_set
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vitcompress.artifact import WEIGHTS_FILE, load_artifact, save_artifact, size_on_disk, stored_tensors
from vitcompress.config import to_dict
from vitcompress.data import ImageTensorDataset
from vitcompress.measure import count_params
from vitcompress.methods import get_method
from vitcompress.methods.quant.convs import conv_names, fold_batchnorms, refold_structure
from vitcompress.methods.quant.diffq_method import (
    DiffqConfig,
    DiffqPackedConv2d,
    DiffqPackedLinear,
    export_packed,
    learned_bits,
    make_quantizer,
)
from vitcompress.methods.quant.lsq import (
    LsqConfig,
    LsqConv2d,
    LsqLinear,
    LsqPackedConv2d,
    LsqPackedLinear,
    grad_scale_factor,
    initial_step,
    lsq_quantize,
    pack_lsq,
    prepare_lsq,
    quantizable_layers,
    quantizable_linears,
    reinit_weights,
)
from vitcompress.methods.quant.packing import pack_bits, packed_numel, unpack_bits, value_range
from vitcompress.models import ModelSpec, create_model
from vitcompress.models.presets import build_vit
from vitcompress.study.context import StepContext
from vitcompress.train import TrainConfig

SPEC = ModelSpec("vitc_micro")
# vitc_small's layout in miniature: a conv stem (3x3 conv + BatchNorm + ReLU, twice, then a 1x1 conv).
STEM_SPEC = ModelSpec("vitc_micro", kwargs={"patch_size": 4, "stem": [8, 16]})


def _train_set(n: int = 128) -> ImageTensorDataset:
    return synthetic_train_set(n)


def _ctx(ds: ImageTensorDataset, work, steps: int = 4) -> StepContext:
    train = TrainConfig(epochs=1, batch_size=32, lr=3e-3, warmup_epochs=0, mixed_precision="no",
                        augment=False, max_steps_per_epoch=steps)
    return StepContext(ds, 28, 1, 10, 0, work, train, calib_images=32, progress=False)


def _fit(spec: ModelSpec, work) -> tuple[nn.Module, ImageTensorDataset]:
    torch.manual_seed(0)
    ds = _train_set()
    return _ctx(ds, work, steps=8).fit(create_model(spec), epochs=2).model, ds


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _fit(SPEC, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def stem_trained(tmp_path_factory):
    """A trained model with a conv stem, so its BatchNorms hold real running statistics."""
    return _fit(STEM_SPEC, tmp_path_factory.mktemp("stem_base"))


def _save(model: nn.Module, out, method: str, cfg, meta, spec: ModelSpec = SPEC) -> None:
    save_artifact(model, out, {"model": spec.to_dict(), "steps": [{"method": method, "config": to_dict(cfg),
                                                                     "meta": meta}]})


def _weights(layer: dict) -> int:
    """Weights of a quantized layer from its meta (a conv's have a kernel; meta without one is a Linear)."""
    return layer["in"] * layer["out"] * math.prod(layer.get("kernel", [1]))


def _file_entries(path) -> dict[str, tuple[torch.dtype, int]]:
    return {k: (t.dtype, t.numel()) for k, t in stored_tensors(path.parent).items()}


def _header_bytes(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


# ---- packing -------------------------------------------------------------------------------------

def test_pack_layout_known_bytes() -> None:
    # 4 bits: first value in the low nibble; -1 is 0xF in two's complement.
    assert pack_bits(torch.tensor([1, 2, 3]), 4).tolist() == [0x21, 0x03]
    assert pack_bits(torch.tensor([-1, 7]), 4).tolist() == [0x7F]
    # 3 bits: 8 values fill exactly 3 bytes, value 2 straddles bytes 0 and 1.
    packed = pack_bits(torch.tensor([7, 0, 7, 0, 0, 0, 0, 0]), 3)
    assert packed.tolist() == [0b11000111, 0b00000001, 0]
    assert packed_numel(9, 3) == 4 and packed_numel(10, 4) == 5 and packed_numel(1, 1) == 1


def test_pack_rejects_values_that_do_not_fit() -> None:
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([16]), 4)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([-9]), 4)
    with pytest.raises(TypeError):
        pack_bits(torch.tensor([0.5]), 4)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_pack_unpack_round_trip(data) -> None:
    bits = data.draw(st.integers(1, 16), label="bits")
    signed = data.draw(st.booleans(), label="signed")
    lo, hi = value_range(bits, signed)
    values = data.draw(st.lists(st.integers(lo, hi), max_size=70), label="values")
    v = torch.tensor(values, dtype=torch.int64)
    packed = pack_bits(v, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(len(values) * bits / 8)
    out = unpack_bits(packed, bits, len(values), signed)
    assert out.tolist() == values


# ---- LSQ -----------------------------------------------------------------------------------------

def test_lsq_step_gradient_matches_eq3_times_grad_scale() -> None:
    # 3 bits: Q_N = 4, Q_P = 3. Eq. 3 per value with s = 1:
    #   0.3 -> -0.3 + 0 = -0.3; -1.2 -> 1.2 - 1 = 0.2; 5.0 (>= Q_P) -> 3; -9.0 (<= -Q_N) -> -4. Sum -1.1.
    v = torch.tensor([0.3, -1.2, 5.0, -9.0], requires_grad=True)
    s = torch.tensor([1.0], requires_grad=True)
    g = grad_scale_factor(4, 3)
    assert g == pytest.approx(1 / math.sqrt(4 * 3))
    out = lsq_quantize(v, s, 3, g)
    assert out.tolist() == [0.0, -1.0, 3.0, -4.0]
    out.sum().backward()
    assert s.grad.item() == pytest.approx(-1.1 * g, rel=1e-6)
    # Straight-through inside the clip range, zero outside.
    assert v.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_lsq_linear_grad_scale_and_initial_step() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    per_tensor = LsqLinear.from_float(lin, 4, per_channel=False)
    per_channel = LsqLinear.from_float(lin, 4, per_channel=True)
    assert per_tensor.weight_grad_scale() == pytest.approx(1 / math.sqrt(64 * 7))
    assert per_channel.weight_grad_scale() == pytest.approx(1 / math.sqrt(16 * 7))
    torch.testing.assert_close(per_tensor.weight_step, (2 * lin.weight.abs().mean() / math.sqrt(7)).reshape(1))
    torch.testing.assert_close(per_channel.weight_step, 2 * lin.weight.abs().mean(1) / math.sqrt(7))
    torch.testing.assert_close(initial_step(lin.weight, 4, dim=1), per_channel.weight_step.detach())


@pytest.mark.parametrize("per_channel", [False, True])
def test_step_sizes_receive_gradient(per_channel: bool) -> None:
    torch.manual_seed(0)
    mod = LsqLinear.from_float(nn.Linear(16, 8), 4, per_channel, act_bits=8)
    x = torch.randn(4, 5, 16)
    mod(x).pow(2).sum().backward()
    assert not mod.act_init_pending
    for p in (mod.weight_step, mod.act_step, mod.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert mod.weight_step.grad.shape == ((8,) if per_channel else (1,))


def test_lsq_qat_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = create_model(SPEC)
    names = quantizable_linears(model, skip_head=False)
    prepare_lsq(model, names, LsqConfig(bits=4))
    assert all(isinstance(model.get_submodule(n), LsqLinear) for n in names) and len(names) == 9
    ds = _train_set(64)
    x = (ds.images.float() / 255 - 0.286) / 0.353
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(x), ds.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]


def test_packed_layer_equals_trained_layer_exactly() -> None:
    torch.manual_seed(0)
    mod = LsqLinear.from_float(nn.Linear(24, 12), 4, per_channel=True, act_bits=6)
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        mod.weight_step.mul_(1.3)  # a "learned" step, not the initial one
        ref = mod(x)
    packed = LsqPackedLinear.from_lsq(mod)
    assert packed.weight_packed.dtype == torch.uint8 and packed.weight_packed.numel() == 24 * 12 // 2
    assert packed.int_weight().abs().max() <= 8
    with torch.no_grad():
        assert torch.equal(packed(x), ref)


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_conv_grad_scale_initial_step_and_gradients(per_channel: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    mod = LsqConv2d.from_float(conv, 4, per_channel, act_bits=8)
    # N of §2.2: one output channel's in_channels * kh * kw weights, or the whole tensor.
    assert mod.weight_grad_scale() == pytest.approx(1 / math.sqrt((3 * 3 * 3 if per_channel else 8 * 27) * 7))
    mean_abs = conv.weight.abs().mean(dim=(1, 2, 3)) if per_channel else conv.weight.abs().mean().reshape(1)
    torch.testing.assert_close(mod.weight_step.detach(), 2 * mean_abs / math.sqrt(7))
    x = torch.randn(2, 3, 9, 9)
    y = mod(x)
    assert y.shape == conv(x).shape == (2, 8, 5, 5)
    y.pow(2).sum().backward()
    for p in (mod.weight_step, mod.act_step, mod.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert mod.weight_step.grad.shape == ((8,) if per_channel else (1,))
    # The input step is shared by one sample's 3 * 9 * 9 values.
    assert mod.act_step.item() == pytest.approx(float(2 * x.abs().mean() / math.sqrt(127)), rel=1e-5)


@pytest.mark.parametrize("act_bits", [None, 6])
def test_packed_conv_equals_trained_conv_exactly(act_bits: int | None) -> None:
    torch.manual_seed(0)
    mod = LsqConv2d.from_float(nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1)), 3,
                               per_channel=True, act_bits=act_bits)
    x = torch.randn(3, 4, 10, 11)
    with torch.no_grad():
        mod.weight_step.mul_(torch.linspace(0.7, 1.4, 6))  # "learned" steps, not the initial ones
        mod.eval()(x)  # sets the activation step
        ref = mod(x)
    packed = LsqPackedConv2d.from_lsq(mod)
    assert packed.weight_numel == 6 * 4 * 3 * 2
    assert packed.weight_packed.dtype == torch.uint8 and packed.weight_packed.numel() == math.ceil(144 * 3 / 8)
    assert packed.int_weight().shape == (6, 4, 3, 2) and packed.int_weight().abs().max() <= 4
    assert (packed.stride, packed.padding, packed.dilation) == ((1, 2), (1, 0), (2, 1))
    with torch.no_grad():
        assert torch.equal(packed(x), ref)
    # The packed conv is rebuilt from its meta alone, as an artifact's restore does.
    empty = LsqPackedConv2d({"name": "unused", "kind": "conv2d", "in": 4, "out": 6, "kernel": [3, 2],
                             "stride": [1, 2], "padding": [1, 0], "dilation": [2, 1], "bias": True},
                            3, True, act_bits)
    empty.load_state_dict(packed.state_dict())
    with torch.no_grad():
        assert torch.equal(empty(x), ref)


def test_lsq_file_is_one_eighth_for_linear_weights(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 10))
    save_artifact(model, tmp_path / "fp32", {})
    names = quantizable_linears(model, skip_head=False)
    pack_lsq(prepare_lsq(model, names, LsqConfig(bits=4, per_channel=True)), names)
    save_artifact(model, tmp_path / "q4", {})
    path = tmp_path / "q4" / WEIGHTS_FILE
    entries = _file_entries(path)
    weights = {"0": 256 * 512, "2": 512 * 256, "4": 256 * 10}
    outs = {"0": 512, "2": 256, "4": 10}
    expected_payload = 0
    for i, n in weights.items():
        assert entries[f"{i}.weight_packed"] == (torch.uint8, math.ceil(n * 4 / 8))
        assert entries[f"{i}.weight_step"] == (torch.float32, outs[i])
        assert f"{i}.weight" not in entries
        expected_payload += math.ceil(n * 4 / 8) + 4 * outs[i] + 4 * outs[i]  # packed + steps + bias
    # The file is exactly header + these bytes: nothing else hides in it.
    assert size_on_disk(tmp_path / "q4") == _header_bytes(path) + expected_payload
    fp32_payload = size_on_disk(tmp_path / "fp32") - _header_bytes(tmp_path / "fp32" / WEIGHTS_FILE)
    linear_fp32 = 4 * sum(weights.values())
    linear_q4 = sum(math.ceil(n * 4 / 8) for n in weights.values())
    assert linear_q4 * 8 == linear_fp32  # the Linear weights take 1/8 of their fp32 bytes
    ratio = size_on_disk(tmp_path / "q4") / size_on_disk(tmp_path / "fp32")
    assert ratio == pytest.approx((_header_bytes(path) + expected_payload) / (_header_bytes(
        tmp_path / "fp32" / WEIGHTS_FILE) + fp32_payload))
    assert ratio < 0.135


@pytest.mark.parametrize("cfg", [LsqConfig(bits=4, epochs=1), LsqConfig(bits=3, per_channel=False, act_bits=8)],
                         ids=["w4", "w3a8"])
def test_lsq_method_artifact_round_trip(cfg: LsqConfig, trained, tmp_path) -> None:
    base, ds = trained
    out = get_method("qat.lsq").apply(copy.deepcopy(base), cfg, _ctx(ds, tmp_path / "work"))
    assert out.meta["avg_bits"] == cfg.bits and out.meta["int_arithmetic"] is False
    json.dumps(out.meta)
    _save(out.model, tmp_path / "art", "qat.lsq", cfg, out.meta)
    entries = _file_entries(tmp_path / "art" / WEIGHTS_FILE)
    for layer in out.meta["layers"]:
        n = _weights(layer)
        assert entries[layer["name"] + ".weight_packed"] == (torch.uint8, math.ceil(n * cfg.bits / 8))
        assert layer["name"] + ".weight" not in entries
    assert out.meta["quantized_weights"] == sum(_weights(layer) for layer in out.meta["layers"])
    loaded = load_artifact(tmp_path / "art")
    assert isinstance(loaded.blocks[0].mlp.fc1, LsqPackedLinear)
    assert isinstance(loaded.patch_embed.proj, LsqPackedConv2d)  # timm's patch projection, 7x7 stride 7
    x = torch.randn(6, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(loaded(x), out.model(x))


def test_from_scratch_reinitialises(trained) -> None:
    base, _ = trained
    fresh = copy.deepcopy(base)
    reinit_weights(fresh, seed=0)
    again = copy.deepcopy(base)
    reinit_weights(again, seed=0)
    w0, w1 = base.blocks[0].attn.qkv.weight, fresh.blocks[0].attn.qkv.weight
    assert not torch.allclose(w0, w1)
    assert torch.equal(w1, again.blocks[0].attn.qkv.weight)  # seeded


# ---- DiffQ ---------------------------------------------------------------------------------------

needs_diffq = pytest.mark.skipif(importlib.util.find_spec("diffq") is None, reason="pip install diffq")


@needs_diffq
def test_diffq_penalty_lowers_bits(trained, tmp_path) -> None:
    base, ds = trained
    bits = {}
    for penalty in (0.0, 50.0):
        cfg = DiffqConfig(penalty=penalty, epochs=2, bits_lr=0.05)
        out = get_method("qat.diffq").apply(copy.deepcopy(base), cfg, _ctx(ds, tmp_path / f"w{penalty}"))
        bits[penalty] = out.meta["learned_bits_mean"]
        assert cfg.min_bits <= out.meta["avg_bits"] <= cfg.max_bits
    assert bits[50.0] < bits[0.0] - 0.1


@needs_diffq
def test_diffq_export_matches_diffq_eval_and_packs(trained) -> None:
    base, _ = trained
    model = copy.deepcopy(base)
    cfg = DiffqConfig(group_size=8, init_bits=3.6, min_bits=2, max_bits=6)
    names = quantizable_layers(model, skip_head=False, convs=True)
    assert names[0] == "patch_embed.proj" and len(names) == 10  # the patch projection and 9 Linears
    n_weights = sum(model.get_submodule(n).weight.numel() for n in names)
    quantizer = make_quantizer(model, cfg, names)
    with torch.no_grad():  # spread the bits so several widths occur
        for i, p in enumerate(p for n, p in model.named_parameters() if n.endswith("_diffq")):
            p.add_(torch.linspace(-0.3, 0.3, p.numel()) * (1 + i % 2))
    x = torch.randn(5, 1, 28, 28)
    with torch.inference_mode():
        ref = model.eval()(x)  # diffq swaps in its true quantized weights in eval mode
    continuous = learned_bits(quantizer, model)
    model, meta = export_packed(model, quantizer, cfg)
    assert not any(n.endswith("_diffq") for n, _ in model.named_parameters())
    assert len(meta["groups_per_bits"]) >= 2
    assert meta["learned_bits_mean"] == pytest.approx(float(continuous.mean()))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    conv = model.patch_embed.proj
    assert isinstance(conv, DiffqPackedConv2d) and conv.weight_numel == 32 * 1 * 7 * 7
    assert meta["layers"][0] == {"name": "patch_embed.proj", "kind": "conv2d", "in": 1, "out": 32, "kernel": [7, 7],
                                 "stride": [7, 7], "padding": [0, 0], "dilation": [1, 1], "bias": True,
                                 "bits_width": conv.bits_width,
                                 "groups_per_bits": {str(b): n for b, n in conv.groups_per_bits.items()}}
    # avg_bits is the stored widths' mean over all quantized weights, the conv's included.
    groups = sum(meta["groups_per_bits"].values())
    assert groups * cfg.group_size == meta["quantized_weights"] == n_weights
    expected = sum(int(b) * n for b, n in meta["groups_per_bits"].items()) / groups
    assert meta["avg_bits"] == pytest.approx(expected)
    packed = [model.get_submodule(n) for n in names]
    stored_bits = sum(int(m.bits().sum()) * cfg.group_size for m in packed)
    assert meta["avg_bits"] == pytest.approx(stored_bits / sum(m.weight_numel for m in packed))


@needs_diffq
def test_diffq_method_artifact_round_trip(trained, tmp_path) -> None:
    base, ds = trained
    cfg = DiffqConfig(penalty=20.0, init_bits=4.4, max_bits=8)
    out = get_method("qat.diffq").apply(copy.deepcopy(base), cfg, _ctx(ds, tmp_path / "work"))
    json.dumps(out.meta)
    _save(out.model, tmp_path / "art", "qat.diffq", cfg, out.meta)
    path = tmp_path / "art" / WEIGHTS_FILE
    entries = _file_entries(path)
    payload = 0
    for layer in out.meta["layers"]:
        name, n = layer["name"], _weights(layer)
        assert name + ".weight" not in entries
        groups = n // cfg.group_size
        assert entries[name + ".group_bits"] == (torch.uint8, math.ceil(groups * layer["bits_width"] / 8))
        for b, count in layer["groups_per_bits"].items():
            assert entries[f"{name}.levels_{b}bit"] == (torch.uint8, math.ceil(count * cfg.group_size * int(b) / 8))
            payload += math.ceil(count * cfg.group_size * int(b) / 8)
    # The levels take avg_bits per weight, to within a byte per layer and width.
    levels_bits = 8 * payload / out.meta["quantized_weights"]
    assert out.meta["avg_bits"] <= levels_bits <= out.meta["avg_bits"] + 0.05
    loaded = load_artifact(tmp_path / "art")
    assert isinstance(loaded.head, DiffqPackedLinear) and isinstance(loaded.patch_embed.proj, DiffqPackedConv2d)
    x = torch.randn(6, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(loaded(x), out.model(x))


# ---- convolutions: the patch projection and a conv stem -------------------------------------------

def test_batchnorm_folding_keeps_the_float_outputs() -> None:
    torch.manual_seed(0)
    model = build_vit(img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2, stem=(8, 16))
    with torch.no_grad():  # BatchNorms as training leaves them, not the identity they start as
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model.eval()(x)
    folded = fold_batchnorms(model)
    assert folded == [{"conv": "patch_embed.proj.layers.0", "bn": "patch_embed.proj.layers.1"},
                      {"conv": "patch_embed.proj.layers.3", "bn": "patch_embed.proj.layers.4"}]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert conv_names(model) == ["patch_embed.proj.layers.0", "patch_embed.proj.layers.3", "patch_embed.proj.layers.6"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
    # restore's view: a fresh model given the folded structure loads the folded state strictly.
    fresh = build_vit(img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2, stem=(8, 16))
    refold_structure(fresh, folded)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def _stem_entries(path) -> dict[str, tuple[torch.dtype, int]]:
    return {k: v for k, v in _file_entries(path).items() if k.startswith("patch_embed.")}


def test_lsq_quantizes_the_conv_stem_and_shrinks_the_file(stem_trained, tmp_path) -> None:
    base, ds = stem_trained
    sizes, outs = {}, {}
    for convs in (True, False):
        cfg = LsqConfig(bits=4, epochs=0, convs=convs)
        out = outs[convs] = get_method("qat.lsq").apply(copy.deepcopy(base), cfg, _ctx(ds, tmp_path / f"w{convs}"))
        _save(out.model, tmp_path / f"art{convs}", "qat.lsq", cfg, out.meta, spec=STEM_SPEC)
        sizes[convs] = size_on_disk(tmp_path / f"art{convs}")
    stem = ["patch_embed.proj.layers.0", "patch_embed.proj.layers.3", "patch_embed.proj.layers.6"]
    conv_weights = 1 * 8 * 9 + 8 * 16 * 9 + 16 * 32
    meta = outs[True].meta
    assert [layer["name"] for layer in meta["layers"] if layer["kind"] == "conv2d"] == stem
    assert [pair["conv"] for pair in meta["folded_bn"]] == stem[:2]
    assert meta["quantized_weights"] == outs[False].meta["quantized_weights"] + conv_weights
    # Every stem tensor in the file: the packed 4-bit weights (uint8), the steps and the biases; no BatchNorm.
    expected = {}
    for name, n, out_ch in zip(stem, (72, 1152, 512), (8, 16, 32)):
        expected[f"{name}.weight_packed"] = (torch.uint8, n // 2)
        expected[f"{name}.weight_step"] = (torch.float32, out_ch)
        expected[f"{name}.bias"] = (torch.float32, out_ch)  # BatchNorm folded in
    assert _stem_entries(tmp_path / "artTrue" / WEIGHTS_FILE) == expected
    linear_only = _stem_entries(tmp_path / "artFalse" / WEIGHTS_FILE)
    assert linear_only["patch_embed.proj.layers.3.weight"] == (torch.float32, 1152)
    assert "patch_embed.proj.layers.4.running_var" in linear_only
    # The stem's fp32 weights (6944 bytes) become 868 packed ones; steps and folded biases cost 320.
    assert sizes[True] < sizes[False] - 0.8 * 4 * conv_weights
    # count_params counts the packed conv weights: the same as the folded float model.
    folded = copy.deepcopy(base)
    fold_batchnorms(folded)
    assert count_params(outs[True].model) == sum(p.numel() for p in folded.parameters())


def test_lsq_conv_stem_artifact_round_trip(stem_trained, tmp_path) -> None:
    base, ds = stem_trained
    cfg = LsqConfig(bits=4, act_bits=8)
    out = get_method("qat.lsq").apply(copy.deepcopy(base), cfg, _ctx(ds, tmp_path / "work"))
    json.dumps(out.meta)
    _save(out.model, tmp_path / "art", "qat.lsq", cfg, out.meta, spec=STEM_SPEC)
    loaded = load_artifact(tmp_path / "art")
    layers = loaded.patch_embed.proj.layers
    assert isinstance(layers[0], LsqPackedConv2d) and isinstance(layers[1], nn.Identity)
    assert isinstance(layers[6], LsqPackedConv2d) and layers[6].kernel_size == (1, 1)
    x = torch.randn(6, 1, 28, 28)
    with torch.inference_mode():
        y = loaded(x)
        assert torch.equal(y, out.model(x)) and torch.isfinite(y).all()


def test_lsq_restores_meta_written_before_convs(trained, tmp_path) -> None:
    # Meta of the Linear-only method: layers without a kind, no folded_bn.
    base, ds = trained
    cfg = LsqConfig(bits=4, epochs=0, convs=False)
    out = get_method("qat.lsq").apply(copy.deepcopy(base), cfg, _ctx(ds, tmp_path / "work"))
    old_meta = dict(out.meta, layers=[{k: v for k, v in layer.items() if k != "kind"} for layer in out.meta["layers"]])
    del old_meta["folded_bn"]
    _save(out.model, tmp_path / "art", "qat.lsq", cfg, old_meta)
    loaded = load_artifact(tmp_path / "art")
    assert isinstance(loaded.head, LsqPackedLinear) and type(loaded.patch_embed.proj) is nn.Conv2d
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(loaded(x), out.model(x))


@needs_diffq
def test_diffq_conv_stem_artifact_round_trip(stem_trained, tmp_path) -> None:
    base, ds = stem_trained
    cfg = DiffqConfig(penalty=5.0, init_bits=4.4, max_bits=8)
    out = get_method("qat.diffq").apply(copy.deepcopy(base), cfg, _ctx(ds, tmp_path / "work"))
    json.dumps(out.meta)
    # The first conv's 72 weights are not whole groups of 16: it stays float (BatchNorm still folded into it).
    assert out.meta["float_convs"] == ["patch_embed.proj.layers.0"] and out.meta["float_linears"] == []
    convs = [layer for layer in out.meta["layers"] if layer["kind"] == "conv2d"]
    assert [layer["name"] for layer in convs] == ["patch_embed.proj.layers.3", "patch_embed.proj.layers.6"]
    linears = [layer for layer in out.meta["layers"] if layer["kind"] == "linear"]
    assert out.meta["quantized_weights"] == 8 * 16 * 9 + 16 * 32 + sum(_weights(layer) for layer in linears)
    _save(out.model, tmp_path / "art", "qat.diffq", cfg, out.meta, spec=STEM_SPEC)
    entries = _stem_entries(tmp_path / "art" / WEIGHTS_FILE)
    assert entries["patch_embed.proj.layers.0.weight"] == (torch.float32, 72)
    assert entries["patch_embed.proj.layers.0.bias"] == (torch.float32, 8)
    for layer in convs:
        name = layer["name"]
        assert name + ".weight" not in entries
        assert all(entries[f"{name}.levels_{b}bit"][0] == torch.uint8 for b in layer["groups_per_bits"])
    assert not any("running" in k for k in entries)
    # avg_bits counts the conv weights with the Linear ones.
    levels_bits = sum(int(b) * n * cfg.group_size for layer in out.meta["layers"]
                      for b, n in layer["groups_per_bits"].items())
    assert out.meta["avg_bits"] == pytest.approx(levels_bits / out.meta["quantized_weights"])
    loaded = load_artifact(tmp_path / "art")
    layers = loaded.patch_embed.proj.layers
    assert type(layers[0]) is nn.Conv2d and isinstance(layers[1], nn.Identity)
    assert isinstance(layers[3], DiffqPackedConv2d) and isinstance(layers[6], DiffqPackedConv2d)
    x = torch.randn(6, 1, 28, 28)
    with torch.inference_mode():
        y = loaded(x)
        assert torch.equal(y, out.model(x)) and torch.isfinite(y).all()
