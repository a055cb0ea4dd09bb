"""ptq.static and ptq.fqvit: calibrators, integer weight storage, restore, and what PTF and LIS buy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitcompress.artifact import load_artifact, save_artifact, size_on_disk, stored_tensors
from vitcompress.config import from_dict, to_dict
from vitcompress.data import ImageTensorDataset, dataset_info, load_split, make_loader
from vitcompress.errors import VitcompressError
from vitcompress.measure import count_params
from vitcompress.methods import get_method
from vitcompress.methods.quant.fqvit import FQViTConfig, parse_bits
from vitcompress.methods.quant.observers import (
    PowerOfTwoObserver,
    fake_quant_reference,
    make_observer,
    qparams_asymmetric,
    quantize_weight_per_channel,
)
from vitcompress.methods.quant.qmodules import (
    LogIntSoftmax,
    PowerOfTwoLayerNorm,
    QuantAttention,
    QuantLinear,
    _log2_round,
    dequant_weight_t,
    fake_quant,
)
from vitcompress.methods.quant.static import StaticQuantConfig
from vitcompress.models import ModelSpec, create_model
from vitcompress.study.context import StepContext
from vitcompress.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _synthetic(n: int = 128) -> ImageTensorDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ImageTensorDataset(images, labels, dataset_info("fashion-mnist"), "train", "synthetic")


def _ctx(ds: ImageTensorDataset, tmp_path, calib: int = 128) -> StepContext:
    train = TrainConfig(epochs=1, mixed_precision="no")
    return StepContext(ds, 28, 1, 10, 0, tmp_path, train, calib_images=calib, progress=False)


def _snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return 10 * math.log10(float(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp_min(1e-30)))


def _save(model: nn.Module, out, spec: ModelSpec, method: str | None = None, cfg=None, meta=None) -> None:
    steps = [] if method is None else [{"method": method, "config": to_dict(cfg), "meta": meta}]
    save_artifact(model, out, {"model": spec.to_dict(), "steps": steps})


# ---- calibrators ----------------------------------------------------------------------------------------------
def _heavy_tailed(n: int = 50_000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # Student-t with 2 degrees of freedom: a normal divided by sqrt(chi2_2 / 2); rare huge values.
    z = torch.randn(n, generator=g)
    chi = torch.randn(n, 2, generator=g).pow(2).sum(1) / 2
    return z / chi.sqrt()


def test_calibrator_ranges_are_sensible():
    x = _heavy_tailed()
    obs = {name: make_observer(name, percentile=99.9) for name in ("minmax", "ema", "percentile", "omse")}
    for chunk in x.split(5000):
        for o in obs.values():
            o.update(chunk)
    ranges = {name: o.clip_range(0, 255) for name, o in obs.items()}
    mm_lo, mm_hi = ranges["minmax"]
    assert (mm_lo, mm_hi) == (float(x.min()), float(x.max()))
    for name in ("ema", "percentile", "omse"):
        lo, hi = ranges[name]
        assert mm_lo <= lo < 0 < hi <= mm_hi, name
    # Percentile drops the tail: its range is far narrower than min/max on heavy-tailed data.
    p_lo, p_hi = ranges["percentile"]
    assert p_hi - p_lo < 0.5 * (mm_hi - mm_lo)

    def mse(name: str) -> float:
        scale, zp = obs[name].qparams(0, 255)
        assert scale > 0 and 0 <= zp <= 255
        return float((fake_quant_reference(x, scale, zp, 0, 255) - x).pow(2).mean())

    assert mse("omse") < 0.95 * mse("minmax")  # OMSE tries min/max itself, so it can only be better


def test_qparams_keep_zero_exact():
    scale, zp = qparams_asymmetric(0.3, 5.0, 0, 255)  # range widened to hold 0
    assert zp == 0 and scale == pytest.approx(5.0 / 255)
    scale, zp = qparams_asymmetric(-1.0, 3.0, 0, 255)
    assert float(fake_quant_reference(torch.tensor(0.0), scale, zp, 0, 255)) == 0.0


def test_power_of_two_factors_fit_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 50, 16, generator=g)
    x[..., [2, 9]] *= 40  # the inter-channel variation of LayerNorm inputs (FQ-ViT Figure 1, left)
    obs = PowerOfTwoObserver(16)
    obs.update(x)
    base, zp, alpha = obs.ptf_params(255, k=3)
    assert alpha.dtype == torch.int8 and alpha[[2, 9]].tolist() == [3, 3]
    assert int(alpha.max()) == 3 and all(int(a) <= 1 for i, a in enumerate(alpha) if i not in (2, 9))
    ptf = fake_quant(x, base * 2.0 ** alpha.float(), torch.full((16,), zp, dtype=torch.int32), 0, 255)
    per_tensor = fake_quant_reference(x, base * 8, zp, 0, 255)
    normal = [i for i in range(16) if i not in (2, 9)]
    err_ptf = (ptf - x)[..., normal].pow(2).mean()
    err_pt = (per_tensor - x)[..., normal].pow(2).mean()
    assert err_ptf < err_pt / 10  # small channels keep ~3 more bits


def test_fake_quant_op_matches_reference():
    x = torch.randn(4, 7, 5) * 3
    s, zp = torch.tensor(0.05), torch.tensor(128, dtype=torch.int32)
    assert torch.equal(fake_quant(x, s, zp, 0, 255), fake_quant_reference(x, 0.05, 128, 0, 255))
    # A narrower code range clips (4-bit activations in a uint8 container).
    y = fake_quant(x, s, torch.tensor(8, dtype=torch.int32), 0, 15)
    assert y.max() <= (15 - 8) * 0.05 + 1e-6 and y.min() >= -8 * 0.05 - 1e-6


def test_custom_ops_fake_kernels_match_the_real_ones():
    """torch.compile and the exporter trace with the fake kernels: shapes, dtypes and strides must agree.

    A contiguous fake for the transposed weight made torch.compile fail on every QDQ model.
    """
    w = torch.randint(-127, 128, (48, 16), dtype=torch.int8)
    torch.library.opcheck(dequant_weight_t, (w, torch.rand(48) + 0.1))
    x = torch.randn(2, 5, 16)
    torch.library.opcheck(fake_quant, (x, torch.tensor(0.05), torch.tensor(128, dtype=torch.int32), 0, 255))


@pytest.mark.parametrize("bits,min_snr", [(8, 38.0), (6, 26.0), (4, 14.0)])
def test_weight_quantization_bits_in_int8(bits, min_snr):
    w = torch.randn(64, 96) * 0.02
    q, s = quantize_weight_per_channel(w, bits)
    assert q.dtype == torch.int8 and s.shape == (64,)
    qmax = 2 ** (bits - 1) - 1
    assert int(q.abs().max()) == qmax  # every row's max hits the top code, none beyond
    assert _snr_db(w, q.float() * s[:, None]) > min_snr
    q2, s2 = quantize_weight_per_channel(w, bits, "omse")
    assert (q2.float() * s2[:, None] - w).pow(2).sum() <= (q.float() * s[:, None] - w).pow(2).sum()


def test_log2_round_is_msb_plus_next_bit():
    r = torch.arange(1, 1 << 16, dtype=torch.float32)
    ref = [v.bit_length() - 1 + (v >> (v.bit_length() - 2) & 1 if v > 1 else 0) for v in range(1, 1 << 16)]
    assert _log2_round(r).tolist() == ref


def test_log_int_softmax_gives_powers_of_two():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 2, 17, 17, generator=g) * 3
    lis = LogIntSoftmax(bits=4)
    lis.logit_quant.begin_calibration(make_observer("minmax"))
    lis(logits)
    lis.logit_quant.end_calibration()
    p = lis(logits)
    nonzero = p[p > 0]
    codes = -torch.log2(nonzero)
    # 4-bit log2 codes: 2^−q values (exp-based 2^x is within 1e-6 relative of the exact power).
    assert (codes - codes.round()).abs().max() < 1e-4 and codes.round().max() <= 15
    ref = logits.softmax(-1)
    assert ((p == 0) <= (ref < 2**-15)).all()  # only what is below the smallest code becomes 0
    # Log2 rounding alone keeps p̂ / p in [0.75, 1.5); rounding 1/p to an integer first (FQ-ViT's
    # round(Σe / e)), 8-bit logits and i-exp's coarse ln2 step widen that, more so for small p.
    big = ref > 2**-6
    ratio = p[big] / ref[big]
    assert ratio.min() > 0.55 and ratio.max() < 2.0 and 0.9 < ratio.median() < 1.15


# ---- ptq.static -------------------------------------------------------------------------------------------------
def test_static_file_holds_int8_weights_and_restores(tmp_path):
    spec = ModelSpec("vitc_quick")  # width 96, MLP 384: the Linear layers are nearly all the bytes
    torch.manual_seed(0)
    model = create_model(spec).eval()
    ds = _synthetic()
    cfg = StaticQuantConfig()
    out = get_method("ptq.static").apply(model, cfg, _ctx(ds, tmp_path / "w", calib=64))
    q = out.model
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == n_linear == len(out.meta["linears"])
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert out.meta["calib_images"] == 64
    assert count_params(q) == count_params(model)  # int8 weights count as parameters too
    _save(model, tmp_path / "fp32", spec)
    _save(q, tmp_path / "int8", spec, "ptq.static", cfg, out.meta)
    dtypes = {k: t.dtype for k, t in stored_tensors(tmp_path / "int8").items()}
    int_keys = [k for k in dtypes if k.endswith("weight_int8")]
    # every Linear and the patch projection (Conv2d)
    assert len(int_keys) == n_linear + 1 and all(dtypes[k] == torch.int8 for k in int_keys)
    assert size_on_disk(tmp_path / "int8") <= 0.30 * size_on_disk(tmp_path / "fp32")

    x = next(iter(make_loader(ds, 16, train=False, img_size=28, in_chans=1)))[0]
    loaded = load_artifact(tmp_path / "int8")
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
        ref = model(x)
        assert _snr_db(ref, q(x)) > 25.0


@pytest.mark.parametrize("calibrator", ["minmax", "ema", "percentile", "omse"])
def test_static_calibrators_and_attention_matmuls(tmp_path, calibrator):
    torch.manual_seed(0)
    model = create_model(ModelSpec("vitc_micro")).eval()
    ds = _synthetic()
    cfg = StaticQuantConfig(calibrator=calibrator, quant_attn_matmul=True, w_bits=6)
    q = get_method("ptq.static").apply(model, cfg, _ctx(ds, tmp_path)).model
    assert sum(isinstance(m, QuantAttention) for m in q.modules()) == 2
    assert all(int(m.weight_int8.abs().max()) <= 31 for m in q.modules() if isinstance(m, QuantLinear))
    x = next(iter(make_loader(ds, 32, train=False, img_size=28, in_chans=1)))[0]
    with torch.no_grad():
        assert _snr_db(model(x), q(x)) > 18.0
    assert from_dict(StaticQuantConfig, to_dict(cfg), "t") == cfg


def test_signed_act_quantizer_is_symmetric():
    from vitcompress.methods.quant.qmodules import ActQuantizer

    q = ActQuantizer(8, signed=True)
    assert (q.qmin, q.qmax) == (-128, 127)
    q.begin_calibration(make_observer("minmax"))
    q(torch.tensor([-3.0, 0.5, 2.0]))
    q.end_calibration()
    assert int(q.zero_point) == 0 and math.isclose(float(q.scale), 3.0 / 127, rel_tol=1e-6)
    x = torch.linspace(-4, 4, 101)
    codes = torch.round(q(x) / q.scale)
    assert int(codes.min()) == -128 and int(codes.max()) == 127  # clipped to the int8 range
    assert torch.allclose(q(torch.tensor([-3.0, 3.0])), torch.tensor([-3.0, 3.0]))  # the range's ends are exact


def test_static_qk_attention_quantizes_scores_only_and_restores(tmp_path):
    spec = ModelSpec("vitc_micro")
    torch.manual_seed(0)
    model = create_model(spec).eval()
    ds = _synthetic()
    cfg = StaticQuantConfig(quant_attn_matmul="qk")
    out = get_method("ptq.static").apply(model, cfg, _ctx(ds, tmp_path / "w"))
    q = out.model
    attns = [m for m in q.modules() if isinstance(m, QuantAttention)]
    assert len(attns) == 2 and out.meta["attn_qk_only"]
    for a in attns:
        assert a.qk_only and a.q_quant.signed and a.k_quant.signed
        assert int(a.q_quant.zero_point) == 0 and int(a.k_quant.zero_point) == 0
        assert isinstance(a.softmax_quant, nn.Softmax) and isinstance(a.v_quant, nn.Identity)
    x = next(iter(make_loader(ds, 32, train=False, img_size=28, in_chans=1)))[0]
    plain = get_method("ptq.static").apply(model, StaticQuantConfig(), _ctx(ds, tmp_path / "p")).model
    with torch.no_grad():
        # 8-bit queries and keys cost little next to the Linear layers' own quantization.
        assert _snr_db(model(x), q(x)) > _snr_db(model(x), plain(x)) - 3.0
    with pytest.raises(VitcompressError):
        from_dict(StaticQuantConfig, {"quant_attn_matmul": "v"}, "t")
    _save(q, tmp_path / "a", spec, "ptq.static", cfg, out.meta)
    with torch.no_grad():
        assert torch.equal(load_artifact(tmp_path / "a")(x), q(x))


# ---- ptq.fqvit ---------------------------------------------------------------------------------------------------
def test_fqvit_bits_and_config():
    assert parse_bits("w8a8att4") == (8, 8, 4)
    assert parse_bits("w4a8att3") == (4, 8, 3)
    for bad in ("w8a8", "w9a8att4", "8-8-4"):
        with pytest.raises(VitcompressError):
            parse_bits(bad)
    with pytest.raises(VitcompressError):
        from_dict(FQViTConfig, {"bits": "w8a8att9"}, "t")
    cfg = FQViTConfig(ptf=False, calibrator="omse")
    assert from_dict(FQViTConfig, to_dict(cfg), "t") == cfg
    spec = get_method("ptq.fqvit")
    assert spec.produces_int_weights and spec.restore is not None and get_method("ptq.static").produces_int_weights


def test_fqvit_swaps_instances_and_restores_exactly(tmp_path):
    spec = ModelSpec("vitc_micro")
    torch.manual_seed(0)
    model = create_model(spec).eval()
    ds = _synthetic()
    cfg = FQViTConfig()
    out = get_method("ptq.fqvit").apply(model, cfg, _ctx(ds, tmp_path / "w"))
    q = out.model
    lns = [m for m in q.modules() if isinstance(m, PowerOfTwoLayerNorm)]
    assert len(lns) == 5 and all(m.ptf for m in lns)  # 2 blocks × 2 + final norm
    assert all(m.input_quant.alpha.dtype == torch.int8 for m in lns)
    attn = q.blocks[0].attn
    assert isinstance(attn, QuantAttention) and isinstance(attn.qkv, QuantLinear)
    assert type(model.blocks[0].attn).__name__ == "Attention"  # the input model is untouched
    _save(q, tmp_path / "a", spec, "ptq.fqvit", cfg, out.meta)
    x = next(iter(make_loader(ds, 16, train=False, img_size=28, in_chans=1)))[0]
    loaded = load_artifact(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
        assert torch.isfinite(q(x)).all()


class _ChannelGain(nn.Module):
    """Multiplies a few embedding channels: the residual stream (every LayerNorm input) gets outlier channels."""

    def __init__(self, dim: int, channels: list[int], gain: float) -> None:
        super().__init__()
        g = torch.ones(dim)
        g[channels] = gain
        self.register_buffer("gain", g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


@pytest.fixture(scope="module")
def outlier_model():
    """vitc_micro trained for a few seconds on real Fashion-MNIST with 30× outlier residual channels."""
    try:
        train = load_split("fashion-mnist", "train")
        test = load_split("fashion-mnist", "test").subset(torch.arange(1024))
    except VitcompressError:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    train = train.subset(torch.randperm(len(train), generator=g)[:4096])
    torch.manual_seed(0)
    model = create_model(ModelSpec("vitc_micro"))
    model.patch_embed.norm = _ChannelGain(32, [3, 11, 20], 30.0)  # patch_embed.norm is an Identity slot
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(4):
        for x, y in make_loader(train, 128, train=True, img_size=28, in_chans=1, seed=0, epoch=epoch,
                                augment=False):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    x, y = next(iter(make_loader(test, 1024, train=False, img_size=28, in_chans=1)))
    with torch.no_grad():
        ref = model(x)
    return model, train, x, y, ref


def _fqvit(model, train, tmp_path, **kw) -> nn.Module:
    return get_method("ptq.fqvit").apply(model, FQViTConfig(**kw), _ctx(train, tmp_path, calib=256)).model


def _score(q: nn.Module, x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    with torch.no_grad():
        out = q(x)
    return _snr_db(ref, out), float((out.argmax(-1) == ref.argmax(-1)).float().mean()), float(
        (out.argmax(-1) == y).float().mean())


def test_ptf_rescues_outlier_layernorm_inputs(outlier_model, tmp_path):
    model, train, x, y, ref = outlier_model
    assert float((ref.argmax(-1) == y).float().mean()) > 0.5  # the model learned something
    snr_ptf, agree_ptf, acc_ptf = _score(_fqvit(model, train, tmp_path, ptf=True, lis=False, bits="w8a8att8"),
                                         x, y, ref)
    snr_mm, agree_mm, acc_mm = _score(_fqvit(model, train, tmp_path, ptf=False, lis=False, bits="w8a8att8"),
                                      x, y, ref)
    # MinMax with one scale per LayerNorm input leaves the normal channels a few levels; PTF gives
    # them 2^K = 8 times finer steps (measured: ~14-18 dB vs 1-4 dB, agreement ~0.9 vs ~0.4).
    assert snr_ptf > snr_mm + 6.0
    assert agree_ptf > 0.8 and agree_ptf > agree_mm + 0.3
    assert acc_mm < acc_ptf - 0.1


def test_log_int_softmax_4bit_close_to_uniform_8bit(outlier_model, tmp_path):
    model, train, x, y, ref = outlier_model
    _, agree_lis, acc_lis = _score(_fqvit(model, train, tmp_path, lis=True, bits="w8a8att4"), x, y, ref)
    _, agree_u8, acc_u8 = _score(_fqvit(model, train, tmp_path, lis=False, bits="w8a8att8"), x, y, ref)
    assert agree_lis > 0.8 and abs(acc_lis - acc_u8) < 0.03
    # Where bits are scarce the log2 grid keeps the small probabilities that a uniform grid zeroes.
    snr_lis3, _, _ = _score(_fqvit(model, train, tmp_path, lis=True, bits="w8a8att3"), x, y, ref)
    snr_u3, _, _ = _score(_fqvit(model, train, tmp_path, lis=False, bits="w8a8att3"), x, y, ref)
    assert snr_lis3 > snr_u3 + 2.0
