"""qat.lsq and qat.diffq: LSQ's gradients, QAT training, bit packing, and packed artifacts whose bytes are the size."""

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
from safetensors import safe_open
from torch import nn

from vitcompress.artifact import WEIGHTS_FILE, load_artifact, save_artifact, size_on_disk
from vitcompress.config import to_dict
from vitcompress.data import ImageTensorDataset
from vitcompress.methods import get_method
from vitcompress.methods.quant.diffq_method import (
    DiffqConfig,
    DiffqPackedLinear,
    export_packed,
    learned_bits,
    make_quantizer,
)
from vitcompress.methods.quant.lsq import (
    LsqConfig,
    LsqLinear,
    LsqPackedLinear,
    grad_scale_factor,
    initial_step,
    lsq_quantize,
    pack_lsq,
    prepare_lsq,
    quantizable_linears,
    reinit_weights,
)
from vitcompress.methods.quant.packing import pack_bits, packed_numel, unpack_bits, value_range
from vitcompress.models import ModelSpec, create_model
from vitcompress.study.context import StepContext
from vitcompress.train import TrainConfig

SPEC = ModelSpec("vitc_micro")


def _train_set(n: int = 128) -> ImageTensorDataset:
    return synthetic_train_set(n)


def _ctx(ds: ImageTensorDataset, work, steps: int = 4) -> StepContext:
    train = TrainConfig(epochs=1, batch_size=32, lr=3e-3, warmup_epochs=0, mixed_precision="no",
                        augment=False, max_steps_per_epoch=steps)
    return StepContext(ds, 28, 1, 10, 0, work, train, calib_images=32, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    ds = _train_set()
    ctx = _ctx(ds, tmp_path_factory.mktemp("base"), steps=8)
    model = ctx.fit(create_model(SPEC), epochs=2).model
    return model, ds


def _save(model: nn.Module, out, method: str, cfg, meta) -> None:
    save_artifact(model, out, {"model": SPEC.to_dict(), "steps": [{"method": method, "config": to_dict(cfg),
                                                                     "meta": meta}]})


def _file_entries(path) -> dict[str, tuple[torch.dtype, int]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: (f.get_tensor(k).dtype, f.get_tensor(k).numel()) for k in f.keys()}


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
    per_tensor = LsqLinear.from_linear(lin, 4, per_channel=False)
    per_channel = LsqLinear.from_linear(lin, 4, per_channel=True)
    assert per_tensor.weight_grad_scale() == pytest.approx(1 / math.sqrt(64 * 7))
    assert per_channel.weight_grad_scale() == pytest.approx(1 / math.sqrt(16 * 7))
    torch.testing.assert_close(per_tensor.weight_step, (2 * lin.weight.abs().mean() / math.sqrt(7)).reshape(1))
    torch.testing.assert_close(per_channel.weight_step, 2 * lin.weight.abs().mean(1) / math.sqrt(7))
    torch.testing.assert_close(initial_step(lin.weight, 4, dim=1), per_channel.weight_step.detach())


@pytest.mark.parametrize("per_channel", [False, True])
def test_step_sizes_receive_gradient(per_channel: bool) -> None:
    torch.manual_seed(0)
    mod = LsqLinear.from_linear(nn.Linear(16, 8), 4, per_channel, act_bits=8)
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
    mod = LsqLinear.from_linear(nn.Linear(24, 12), 4, per_channel=True, act_bits=6)
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        mod.weight_step.mul_(1.3)  # a "learned" step, not the initial one
        ref = mod(x)
    packed = LsqPackedLinear.from_lsq(mod)
    assert packed.weight_packed.dtype == torch.uint8 and packed.weight_packed.numel() == 24 * 12 // 2
    assert packed.int_weight().abs().max() <= 8
    with torch.no_grad():
        assert torch.equal(packed(x), ref)


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
        n = layer["in"] * layer["out"]
        assert entries[layer["name"] + ".weight_packed"] == (torch.uint8, math.ceil(n * cfg.bits / 8))
        assert layer["name"] + ".weight" not in entries
    loaded = load_artifact(tmp_path / "art")
    assert isinstance(loaded.blocks[0].mlp.fc1, LsqPackedLinear)
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
    names = quantizable_linears(model, skip_head=False)
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
    # avg_bits is the stored widths' mean over all quantized weights.
    groups = sum(meta["groups_per_bits"].values())
    assert groups * cfg.group_size == meta["quantized_weights"]
    expected = sum(int(b) * n for b, n in meta["groups_per_bits"].items()) / groups
    assert meta["avg_bits"] == pytest.approx(expected)


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
        name, n = layer["name"], layer["in"] * layer["out"]
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
    assert isinstance(loaded.head, DiffqPackedLinear)
    x = torch.randn(6, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(loaded(x), out.model(x))
