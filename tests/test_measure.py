from __future__ import annotations

import pytest
import torch
from torch import nn

from vitcompress.data import ImageTensorDataset, dataset_info
from vitcompress.measure import (
    MeasureConfig,
    count_macs,
    count_params,
    cpu_speed,
    evaluate_accuracy,
    gpu_speed,
    uses_integer_kernels,
)
from vitcompress.models import ModelSpec, create_model

FAST = MeasureConfig(batch_size=4, repeats=2, warmup=1, min_repeat_seconds=0.01, latency_samples=5)


class _Oracle(nn.Module):
    """Predicts the label stored in the first pixel: accuracy is known exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(self.labels_from(x), 10).float()

    @staticmethod
    def labels_from(x: torch.Tensor) -> torch.Tensor:
        info = dataset_info("fashion-mnist")
        raw = (x[:, 0, 0, 0] * info.std[0] + info.mean[0]) * 255
        return raw.round().long().clamp(0, 9)


def test_accuracy_is_exact_on_a_known_model() -> None:
    n = 100
    labels = torch.arange(n) % 10
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    images[:30, 0, 0, 0] = (labels[:30] + 1) % 10  # the oracle is wrong on exactly 30 images
    ds = ImageTensorDataset(images, labels, dataset_info("fashion-mnist"), "test", "synthetic")
    acc = evaluate_accuracy(_Oracle(), ds, img_size=28, in_chans=1, batch_size=32)
    assert acc == {"top1": 70.0, "top5": None, "n_test": 100}


def test_macs_of_a_linear_layer() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    assert count_macs(model, torch.randn(3, 1, 28, 28)) == 28 * 28 * 10


def test_macs_and_params_of_a_vit() -> None:
    model = create_model(ModelSpec("vitc_micro"))
    macs = count_macs(model, torch.randn(2, 1, 28, 28))
    # By hand: the 7x7-patch projection once per patch (16), every block Linear once per token (17),
    # the head once, and per block q.k^T and attn.v, 17 x 17 x width each (the fused attention kernel's
    # matmuls, which the counter alone would miss).
    tokens, width, blocks = 17, model.embed_dim, len(model.blocks)
    lin = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "head")
    want = 16 * model.patch_embed.proj.weight.numel() + lin * tokens + model.head.weight.numel()
    want += blocks * 2 * tokens * tokens * width
    assert macs == want
    assert count_params(model) == sum(p.numel() for p in model.parameters())


def test_cpu_speed_reports_positive_consistent_numbers() -> None:
    model = create_model(ModelSpec("vitc_micro")).eval()
    before = torch.get_num_threads()
    out = cpu_speed(model, torch.randn(4, 1, 28, 28), FAST)
    assert torch.get_num_threads() == before
    assert out["cpu_img_s"] > 0 and out["cpu_img_s_b1"] > 0
    assert 0 < out["latency_ms_p50"] <= out["latency_ms_p95"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_no_gpu_gives_none_never_a_number() -> None:
    assert gpu_speed(create_model(ModelSpec("vitc_micro")), torch.randn(2, 1, 28, 28), FAST) is None


def test_integer_kernel_detection() -> None:
    model = create_model(ModelSpec("vitc_micro")).eval()
    q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert uses_integer_kernels(q)
    assert not uses_integer_kernels(model)


def test_interleaved_rounds_visit_deployments_in_a_seeded_shuffled_order() -> None:
    from vitcompress.measure.bench import time_interleaved

    def rounds(seed: int | None) -> list[tuple[str, ...]]:
        calls: list[str] = []
        fns = {name: (lambda name=name: calls.append(name)) for name in "abcde"}
        times = time_interleaved(fns, warmup=0, repeats=6, min_repeat_seconds=0.0, seed=seed)
        assert {k: len(v) for k, v in times.items()} == dict.fromkeys("abcde", 6)
        timed = calls[5:]  # one sizing call each, then one call per name per round
        return [tuple(timed[i:i + 5]) for i in range(0, 30, 5)]

    shuffled = rounds(0)
    assert all(sorted(r) == list("abcde") for r in shuffled) and len(set(shuffled)) > 1
    assert rounds(0) == shuffled  # seeded: the same order on every run
    assert rounds(None) == [tuple("abcde")] * 6


def test_anchored_timing_brackets_every_repeat_with_the_anchor(monkeypatch) -> None:
    import vitcompress.measure.bench as bench

    # A fake clock: each call advances it by its cost times a load that doubles every 10 calls (drift
    # inside a round).
    clock = {"t": 0.0, "calls": 0}
    trace: list[str] = []

    def make(name: str, cost: float):
        def fn() -> None:
            clock["calls"] += 1
            clock["t"] += cost * 2 ** (clock["calls"] // 10)
            trace.append(name)
        return fn

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["t"])
    fns = {"base": make("base", 1.0), "half": make("half", 0.5), "same": make("same", 1.0)}
    seconds, around = bench.time_anchored(fns, "base", warmup=0, repeats=3, min_repeat_seconds=0.0, seed=None)
    timed = trace[3:]  # one sizing call each, then the rounds
    assert timed == ["base", "half", "base", "same", "base"] * 3  # the anchor around every other call
    assert len(seconds["base"]) == 9 and len(seconds["half"]) == len(around["half"]) == 3
    assert set(around) == {"half", "same"}
    a = seconds["base"]  # three anchor repeats a round: before "half", between, after "same"
    assert around["half"] == [(a[3 * k] + a[3 * k + 1]) / 2 for k in range(3)]
    assert around["same"] == [(a[3 * k + 1] + a[3 * k + 2]) / 2 for k in range(3)]
    # Under the drift, "same" (the anchor's own cost) pairs to about 1x with its brackets, within the
    # one load step that can fall between two neighbouring repeats.
    assert all(0.5 <= r / s <= 2.0 for r, s in zip(around["same"], seconds["same"], strict=True))
    with pytest.raises(ValueError, match="anchor"):
        bench.time_anchored(fns, "nope", warmup=0, repeats=1, min_repeat_seconds=0.0)


def test_paired_ratios_are_taken_round_by_round() -> None:
    from vitcompress.measure.bench import paired_ratios

    # Round 3 ran under load for both; its ratio is still 2, so the median stays 2.
    base, row = [1.0, 1.0, 4.0, 1.0, 1.2], [0.5, 0.5, 2.0, 0.4, 0.6]
    assert paired_ratios(base, row) == {"q25": 2.0, "median": 2.0, "q75": 2.0}
    assert paired_ratios([1.0, 1.0, 1.0], [0.5, 1.0, 0.25]) == {"q25": 1.5, "median": 2.0, "q75": 3.0}
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])
