"""Low-rank family: Nyström and Performer attention on trained weights, SVD-factorized Linear layers."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import Attention, Block

from vitcompress.artifact import load_artifact, save_artifact, size_on_disk
from vitcompress.config import from_dict, to_dict
from vitcompress.data import ImageTensorDataset, dataset_info
from vitcompress.errors import VitcompressError
from vitcompress.methods import get_method
from vitcompress.methods.lowrank import (
    FactorizedLinear,
    NystromAttention,
    PerformerAttention,
    iterative_pinv,
    segment_means,
)
from vitcompress.methods.lowrank.nystrom import NystromConfig, segment_bounds
from vitcompress.methods.lowrank.performer import PerformerConfig, orthogonal_features
from vitcompress.methods.lowrank.svd import SVDConfig, budget_ranks, energy_rank, max_useful_rank
from vitcompress.models import ModelSpec, create_model
from vitcompress.study.context import StepContext
from vitcompress.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec("vitc_micro")  # 17 tokens: 16 patches + the class token


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _attention(dim: int = 32, heads: int = 2, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(dim, num_heads=heads, qkv_bias=True).eval()


def _segment_constant(n: int, m: int, dim: int, noise: float = 0.01, batch: int = 2) -> torch.Tensor:
    """Tokens constant on each of the m landmark segments (plus noise): attention of rank <= m."""
    g = torch.Generator().manual_seed(1)
    bounds = segment_bounds(n, m)
    protos = torch.randn(batch, m, dim, generator=g)
    x = torch.cat([protos[:, j:j + 1].expand(-1, bounds[j + 1] - bounds[j], -1) for j in range(m)], dim=1)
    return x + noise * torch.randn(x.shape, generator=g)


def _ctx(tmp_path: Path, **train: object) -> StepContext:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (64, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,), generator=g)
    ds = ImageTensorDataset(images, labels, dataset_info("fashion-mnist"), "train", "synthetic")
    cfg = TrainConfig(**{"epochs": 1, "batch_size": 32, "mixed_precision": "no", "max_steps_per_epoch": 2, **train})
    return StepContext(ds, 28, 1, 10, 0, tmp_path / "work", cfg, progress=False)


def _micro() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(SPEC).eval()


# ---- Nyström -----------------------------------------------------------------------------------
def test_pinv_iteration_converges_on_well_conditioned_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.eye(12, dtype=torch.float64) + 0.3 * torch.randn(3, 12, 12, generator=g, dtype=torch.float64) / 12**0.5
    ref = torch.linalg.pinv(a)
    residuals = [(torch.eye(12) - a @ iterative_pinv(a, k)).norm().item() for k in range(6)]
    assert all(r1 < r0 for r0, r1 in zip(residuals, residuals[1:]))  # monotone
    assert _rel(iterative_pinv(a, 8), ref) < 1e-8
    # float32, as the attention runs it: converged to float precision.
    assert _rel(iterative_pinv(a.float(), 8), ref.float()) < 1e-5


def test_segment_means_uneven() -> None:
    x = torch.randn(2, 3, 50, 8)
    bounds = segment_bounds(50, 8)
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    assert sum(sizes) == 50 and max(sizes) - min(sizes) <= 1
    want = torch.stack([x[..., a:b, :].mean(-2) for a, b in zip(bounds, bounds[1:])], dim=-2)
    torch.testing.assert_close(segment_means(x, 8), want)
    torch.testing.assert_close(segment_means(x, 10), x.unflatten(-2, (10, 5)).mean(-2))  # even case
    torch.testing.assert_close(segment_means(x, 50), x)  # one token per landmark


def test_nystrom_with_m_equal_n_is_exact_attention() -> None:
    attn = _attention()
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        exact = attn(x)
        # Converged pinv: exact to float32 precision; the paper's 6 iterations: within 3 %.
        assert _rel(NystromAttention.from_attention(attn, m=20, pinv_iters=25)(x), exact) < 1e-4
        assert _rel(NystromAttention.from_attention(attn, m=20)(x), exact) < 0.03


@pytest.mark.parametrize("n,m", [(64, 8), (50, 8), (197, 24)])
def test_nystrom_on_vanilla_block_weights_low_rank_input(n: int, m: int) -> None:
    torch.manual_seed(0)
    block = Block(64, 4).eval()
    x = _segment_constant(n, m, 64)
    with torch.no_grad():
        ref_attn, ref_block = block.attn(block.norm1(x)), block(x)
        swapped = copy.deepcopy(block)
        swapped.attn = NystromAttention.from_attention(swapped.attn, m=m)
        assert swapped.attn.qkv is not block.attn.qkv  # deep copy: the original block is untouched
        got_attn, got_block = swapped.attn(swapped.norm1(x)), swapped(x)
    assert _rel(got_attn, ref_attn) < 0.03
    assert _rel(got_block, ref_block) < 0.005
    # The module reuses the block's own layers and settings.
    assert swapped.attn.num_heads == 4 and swapped.attn.head_dim == 16 and swapped.attn.scale == block.attn.scale
    assert set(swapped.state_dict()) == set(block.state_dict())


def test_nystrom_uneven_sequence_and_exact_cls() -> None:
    attn = _attention()
    x = torch.randn(3, 50, 32)
    with torch.no_grad():
        exact = attn(x)
        approx = NystromAttention.from_attention(attn, m=7)(x)
        with_cls = NystromAttention.from_attention(attn, m=7, exact_prefix=1)(x)
    assert approx.shape == exact.shape and torch.isfinite(approx).all()
    assert _rel(approx, exact) < 0.5
    torch.testing.assert_close(with_cls[:, 0], exact[:, 0], atol=1e-5, rtol=1e-5)  # class token exact
    torch.testing.assert_close(with_cls[:, 1:], approx[:, 1:])  # the rest untouched


def test_nystrom_refuses_m_at_least_n(tmp_path: Path) -> None:
    method = get_method("lowrank.nystrom")
    for cfg in (NystromConfig(landmarks=17), NystromConfig(landmarks=64), NystromConfig(ratio=0.99)):
        with pytest.raises(VitcompressError, match="exact attention"):
            method.apply(_micro(), cfg, _ctx(tmp_path))
    with pytest.raises(VitcompressError):
        NystromConfig(landmarks=8, ratio=0.1)
    out = method.apply(_micro(), NystromConfig(ratio=0.25), _ctx(tmp_path))
    assert out.meta["landmarks"] == 4 and out.meta["tokens"] == 17
    assert method.apply(_micro(), NystromConfig(), _ctx(tmp_path)).meta["landmarks"] == round(32 / 197 * 17)


def test_nystrom_finetune_under_bf16_autocast(tmp_path: Path) -> None:
    # Fine-tuning goes through the shared loop, here under bf16 autocast (the core stays float32).
    cfg = NystromConfig(landmarks=4, finetune_epochs=1, finetune_images=64)
    out = get_method("lowrank.nystrom").apply(_micro(), cfg, _ctx(tmp_path, mixed_precision="bf16"))
    assert all(torch.isfinite(p).all() for p in out.model.parameters())
    assert isinstance(out.model.blocks[0].attn, NystromAttention)
    layer = NystromAttention.from_attention(_attention(), m=5)
    x = torch.randn(2, 20, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16 = layer(x)  # qkv and proj in bf16, the Nyström core in float32
    with torch.no_grad():
        assert _rel(y_bf16.float(), layer(x)) < 0.03


# ---- Performer ---------------------------------------------------------------------------------
def test_performer_error_decreases_with_features() -> None:
    attn = _attention(dim=32, heads=2)
    x = 0.5 * torch.randn(2, 40, 32)
    with torch.no_grad():
        exact = attn(x)
        err = {f: sum(_rel(PerformerAttention.from_attention(attn, features=f, seed=s)(x), exact) for s in range(3)) / 3
               for f in (8, 128, 4096)}
    assert err[4096] < err[128] < err[8]
    assert err[4096] < 0.05


def test_performer_features_are_orthogonal_seeded_buffers() -> None:
    omega = orthogonal_features(32, 16, seed=3)
    block = omega[:16] / omega[:16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(orthogonal_features(32, 16, seed=3), omega)
    layer = PerformerAttention.from_attention(_attention(dim=32, heads=2), features=32, seed=3)
    assert "omega" in layer.state_dict()
    torch.testing.assert_close(layer.omega, omega)


# ---- SVD ---------------------------------------------------------------------------------------
def test_factorized_linear_full_rank_and_parameter_count() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40)
    x = torch.randn(5, 24)
    full = FactorizedLinear.from_linear(linear, 24)
    torch.testing.assert_close(full(x), linear(x), atol=1e-5, rtol=1e-5)
    for k in (1, 5, 13):
        f = FactorizedLinear.from_linear(linear, k)
        assert sum(p.numel() for p in f.parameters()) == k * (24 + 40) + 40
        # Eckart–Young: the weight error is the dropped singular values.
        s = torch.linalg.svdvals(linear.weight.detach().double())
        w = (f.up.weight @ f.down.weight).double()
        assert abs((w - linear.weight.double()).norm().item() - s[k:].norm().item()) < 1e-4
    no_bias = FactorizedLinear.from_linear(torch.nn.Linear(24, 40, bias=False), 3)
    assert sum(p.numel() for p in no_bias.parameters()) == 3 * 64


def test_svd_rank_choice() -> None:
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert energy_rank(s, 0.7) == 1 and energy_rank(s, 0.9) == 2 and energy_rank(s, 1.0) == 4
    assert max_useful_rank(32, 32) == 15  # 16 * 64 = 1024 = dense: not smaller
    layers = {"a": (torch.tensor([10.0, 5.0, 1.0, 0.1]), 8, 8), "b": (torch.tensor([3.0, 3.0, 3.0, 3.0]), 8, 8)}
    # Rank 1 each (32 weights), then b's flat spectrum outranks a's tail: b gets ranks 2 and 3.
    assert budget_ranks(layers, weight_budget=4 * 16) == {"a": 1, "b": 3}
    # Rank 4 of b would not be smaller than dense (4 * 16 = 64 = 8 * 8): b goes dense instead.
    assert budget_ranks(layers, weight_budget=5 * 16) == {"a": 1, "b": None}
    assert budget_ranks(layers, weight_budget=10_000) == {"a": None, "b": None}  # everything fits: dense
    with pytest.raises(VitcompressError, match="keep is too small"):
        budget_ranks(layers, weight_budget=20)


def test_svd_budget_and_file_size(tmp_path: Path) -> None:
    model = _micro()
    method = get_method("lowrank.svd")
    cfg = SVDConfig(keep=0.5)
    out = method.apply(model, cfg, _ctx(tmp_path))
    meta = out.meta
    assert meta["linear_params_after"] <= 0.5 * meta["linear_params_before"]
    assert meta["linear_params_after"] > 0.4 * meta["linear_params_before"]
    for name, rank in meta["ranks"].items():
        layer = out.model.get_submodule(name)
        if rank is None:
            assert isinstance(layer, torch.nn.Linear)
        else:
            assert isinstance(layer, FactorizedLinear) and rank <= max_useful_rank(layer.in_features, layer.out_features)
            assert sum(p.numel() for p in layer.parameters()) == rank * (layer.in_features + layer.out_features) + layer.out_features
    save_artifact(model, tmp_path / "dense", {"model": SPEC.to_dict(), "steps": []})
    save_artifact(out.model, tmp_path / "svd", {"model": SPEC.to_dict(), "steps": [
        {"method": "lowrank.svd", "config": to_dict(cfg), "meta": meta}]})
    saved = size_on_disk(tmp_path / "dense") - size_on_disk(tmp_path / "svd")
    expected = 4 * (meta["linear_params_before"] - meta["linear_params_after"])  # float32 bytes
    assert abs(saved - expected) < 2048  # the rest is the safetensors header (tensor names)
    energy = method.apply(model, SVDConfig(keep=None, energy=0.9), _ctx(tmp_path)).meta
    assert all(r is None or r >= 1 for r in energy["ranks"].values())


def test_svd_config_checks() -> None:
    with pytest.raises(VitcompressError, match="exactly one"):
        SVDConfig(keep=0.5, energy=0.9)
    with pytest.raises(VitcompressError):
        from_dict(SVDConfig, {"layers": ["qkv", "mlp"]})
    assert from_dict(SVDConfig, {"keep": None, "energy": 0.95, "layers": ["fc1", "fc2", "head"]}).layers == ("fc1", "fc2", "head")


# ---- artifacts: save -> load gives identical logits ----------------------------------------------
@pytest.mark.parametrize("chain", [
    [("lowrank.nystrom", NystromConfig(landmarks=5, exact_cls=True))],
    [("lowrank.performer", PerformerConfig(features=48, seed=7))],
    [("lowrank.svd", SVDConfig(keep=0.4, layers=("qkv", "proj", "fc1", "fc2", "head")))],
    [("lowrank.svd", SVDConfig(keep=None, energy=0.8)), ("lowrank.nystrom", NystromConfig(ratio=0.3))],
    [("lowrank.svd", SVDConfig(keep=0.5)), ("ptq.dynamic", None)],
    [("lowrank.nystrom", NystromConfig(landmarks=8)), ("ptq.dynamic", None)],
], ids=["nystrom", "performer", "svd", "svd+nystrom", "svd+ptq", "nystrom+ptq"])
def test_save_load_identical_logits(chain: list, tmp_path: Path) -> None:
    model = _micro()
    steps = []
    for name, cfg in chain:
        method = get_method(name)
        cfg = cfg if cfg is not None else method.config_cls()
        out = method.apply(model, cfg, _ctx(tmp_path))
        model = out.model.eval()
        steps.append({"method": name, "config": to_dict(cfg), "meta": out.meta})
        assert from_dict(method.config_cls, to_dict(cfg)) == cfg
    save_artifact(model, tmp_path / "art", {"model": SPEC.to_dict(), "steps": steps})
    loaded = load_artifact(tmp_path / "art")
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=0)


# ---- benchmark smoke run -----------------------------------------------------------------------
def test_benchmark_quick_runs(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention_lowrank.py"), "--quick", "--threads", "1",
                           "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    res = json.loads(out.read_text())
    assert res["quick"] and res["layer"]["rows"] and res["model"]["rows"]
    row = res["layer"]["rows"][-1]
    assert row["tokens"] == 197 and row["exact-sdpa"] > 0 and row["nystrom-32"] > 0
    assert 0 <= res["error"]["nystrom-24"]["rel_fro_mean"] < 1
    assert "Crossover" in proc.stdout
