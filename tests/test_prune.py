"""Pruning that really shrinks a ViT, and token merging: counts, shapes, exactness, export, restore."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_train_set, trained_like_batchnorms
from torch import nn

from vitcompress.artifact import load_artifact, save_artifact, size_on_disk
from vitcompress.config import from_dict, to_dict
from vitcompress.data import ImageTensorDataset
from vitcompress.errors import VitcompressError
from vitcompress.methods import get_method
from vitcompress.methods.prune import plot_importance
from vitcompress.methods.prune.cut import apply_plans, parse_ranges, ranges
from vitcompress.methods.prune.groups import ParamSlice, find_groups, make_group
from vitcompress.methods.prune.importance import kl_importance, magnitude_importance, taylor_importance
from vitcompress.methods.prune.masks import install_gates, installed_gates, remove_gates
from vitcompress.methods.prune.select import plan_pruning
from vitcompress.methods.prune.tome import TokenMergeConfig, apply_merging, bipartite_merge
from vitcompress.models import ModelSpec, create_model
from vitcompress.study.context import StepContext
from vitcompress.train import TrainConfig

MICRO = ModelSpec("vitc_micro")
QUICK = ModelSpec("vitc_quick")
STEM = ModelSpec("vitc_small", kwargs={"depth": 2, "stem": [8, 16, 24]})  # a conv stem, 3x3 convs 8-16-24


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(spec).eval()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _synthetic(n: int = 128) -> ImageTensorDataset:
    return synthetic_train_set(n)


def _ctx(tmp_path, teacher: nn.Module | None = None) -> StepContext:
    return StepContext(_synthetic(), 28, 1, 10, 0, tmp_path / "work",
                       TrainConfig(epochs=1, batch_size=32, lr=1e-3, mixed_precision="no", max_steps_per_epoch=2),
                       teacher=teacher, calib_images=64, progress=False)


def _plan(model: nn.Module, ratio: float, attention: str | None, stem: bool = False, ranking: str = "global",
          max_heads: int | None = None):
    groups = find_groups(model, stem=stem)
    mags = magnitude_importance(model, groups)
    return plan_pruning(groups, mags, mags, ratio=ratio, total_params=_params(model), attention=attention,
                        min_keep=0.1, ranking=ranking, max_heads=max_heads)


def _expected_params(model: nn.Module, plans) -> int:
    """Parameters left, counted by hand from the kept dims: a (head, dim) owns 3 rows + 3 biases of qkv and a
    column of proj; an MLP channel a row + bias of fc1 and a column of fc2."""
    left = _params(model)
    for blk, plan in zip(model.blocks, plans.blocks):
        dim = blk.attn.qkv.in_features
        per_dim = 3 * dim + 3 + blk.attn.proj.out_features
        old = blk.attn.num_heads * blk.attn.head_dim
        left -= (old - len(plan.heads) * len(plan.dims[0])) * per_dim
        per_channel = dim + 1 + blk.mlp.fc2.out_features
        left -= (blk.mlp.fc1.out_features - len(plan.mlp)) * per_channel
    return left


ATTENTION_MODES = ["head", "dim", None]


@pytest.mark.parametrize("attention", ATTENTION_MODES)
@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_parameter_count_matches_the_plan_and_the_ratio(attention, ratio) -> None:
    model = _model(QUICK)
    plans, removed = _plan(model, ratio, attention)
    pruned = apply_plans(copy.deepcopy(model), plans)
    assert _params(pruned) == _expected_params(model, plans) == _params(model) - removed
    achieved = removed / _params(model)
    assert abs(achieved - ratio) <= 0.02 * ratio
    if attention is None:
        assert all(len(p.heads) == 4 and len(p.dims[0]) == 24 for p in plans.blocks)
    if attention == "head":
        assert all(len(p.dims[0]) == 24 for p in plans.blocks)  # whole heads go, dims never
    if attention == "dim":
        assert all(len(p.heads) == 4 for p in plans.blocks)  # heads stay, dims go


@pytest.mark.parametrize("attention", ["head", "dim"])
@pytest.mark.parametrize("ranking", ["global", "layer"])
def test_max_heads_drops_the_weakest_heads_and_keeps_the_ratio(attention, ranking) -> None:
    model = _model(QUICK)  # 4 heads of 24 dims per block
    groups = find_groups(model)
    mags = magnitude_importance(model, groups)
    plans, removed = _plan(model, 0.5, attention, ranking=ranking, max_heads=2)
    pruned = apply_plans(copy.deepcopy(model), plans)
    assert _params(pruned) == _expected_params(model, plans) == _params(model) - removed
    assert abs(removed / _params(model) - 0.5) <= 0.02 * 0.5
    attn = [mags[i] for i, g in enumerate(groups) if g.kind == "attn"]
    for plan, blk, score in zip(plans.blocks, pruned.blocks, attn, strict=True):
        assert len(plan.heads) <= 2
        assert blk.attn.num_heads == len(plan.heads) and blk.attn.head_dim == len(plan.dims[0])
        strongest = set(torch.argsort(score.heads, descending=True)[:2].tolist())
        assert set(plan.heads) <= strongest  # the heads kept are among the two with the highest score
    if attention == "dim":
        assert all(len(p.heads) == 2 for p in plans.blocks)
    x = torch.randn(3, 1, 28, 28)
    assert pruned(x).shape == (3, 10)


def test_max_heads_that_alone_exceeds_the_ratio_is_refused() -> None:
    model = _model(QUICK)
    with pytest.raises(VitcompressError, match="raise ratio or max_heads"):
        _plan(model, 0.1, "dim", max_heads=1)  # 3 of 4 heads in every block is ~27% of the parameters
    with pytest.raises(VitcompressError, match="max_heads must be at least 1"):
        get_method("prune.structured").config_cls(max_heads=0)


def test_floor_keeps_every_layer_and_refuses_impossible_ratios() -> None:
    model = _model(QUICK)
    plans, _ = _plan(model, 0.8, "head")
    assert all(len(p.heads) >= 1 and len(p.mlp) >= math.ceil(0.1 * 384) for p in plans.blocks)
    with pytest.raises(VitcompressError, match="lower ratio or min_keep"):
        _plan(model, 0.95, "head")


def test_saved_file_shrinks_with_the_parameters(tmp_path) -> None:
    model = _model(QUICK)
    plans, removed = _plan(model, 0.3, "dim")
    pruned = apply_plans(copy.deepcopy(model), plans)
    save_artifact(model, tmp_path / "base", {})
    save_artifact(pruned, tmp_path / "pruned", {})
    size_ratio = size_on_disk(tmp_path / "pruned") / size_on_disk(tmp_path / "base")
    assert abs(size_ratio - _params(pruned) / _params(model)) < 0.01
    assert size_ratio < 0.72


@pytest.mark.parametrize("attention", ["head", "dim"])
def test_pruned_model_is_consistent_and_equals_masking(attention) -> None:
    model = _model(QUICK)
    plans, _ = _plan(model, 0.3, attention)
    pruned = apply_plans(copy.deepcopy(model), plans)
    for blk in pruned.blocks:
        a = blk.attn
        assert type(a).__name__ == "Attention"
        assert a.qkv.out_features == 3 * a.num_heads * a.head_dim == 3 * a.attn_dim
        assert a.proj.in_features == a.num_heads * a.head_dim
        assert a.scale == pytest.approx(a.head_dim ** -0.5)
        assert blk.mlp.fc2.in_features == blk.mlp.fc1.out_features
    # The cut equals the unpruned model with the removed units gated to zero (exactly, up to float order).
    masked = copy.deepcopy(model)
    groups = find_groups(masked)
    install_gates(masked, groups)
    with torch.no_grad():
        for g, gate in zip(groups, installed_gates(masked, groups)):
            plan = plans.blocks[g.block]
            gate.gate.zero_()
            if g.kind == "mlp":
                gate.gate[list(plan.mlp)] = 1
            else:
                for h, dims in zip(plan.heads, plan.dims):
                    gate.gate.view(g.shape)[h, list(dims)] = 1
    for batch in (1, 7):
        x = torch.randn(batch, 1, 28, 28)
        with torch.inference_mode():
            y = pruned(x)
            torch.testing.assert_close(y, masked(x), atol=2e-5, rtol=1e-4)
        assert y.shape == (batch, 10)
    # Fused SDPA (ignores .scale) and the manual path (uses it) agree: the temperature lives in the weights.
    manual = copy.deepcopy(pruned)
    for blk in manual.blocks:
        blk.attn.fused_attn = not blk.attn.fused_attn
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(manual(x), pruned(x), atol=2e-5, rtol=1e-4)


def test_pruned_model_exports_to_onnx(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = _model(QUICK)
    plans, _ = _plan(model, 0.3, "dim")
    pruned = apply_plans(model, plans).eval()
    path = tmp_path / "pruned.onnx"
    x = torch.randn(2, 1, 28, 28)
    torch.onnx.export(pruned, (x,), str(path), opset_version=17, dynamo=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28)
        got = sess.run(None, {"x": x.numpy()})[0]
        with torch.inference_mode():
            want = pruned(x).numpy()
        assert got.shape == (batch, 10)
        assert abs(got - want).max() < 1e-4


def test_stem_channels_are_cut_with_the_blocks_and_equal_masking(tmp_path) -> None:
    model = trained_like_batchnorms(_model(STEM))
    plan, removed = _plan(model, 0.4, "dim", stem=True, ranking="layer")  # every layer, the stem's too, loses some
    assert len(plan.stem) == 3 and all(len(k) < c for k, c in zip(plan.stem, (8, 16, 24)))
    pruned = apply_plans(copy.deepcopy(model), plan)
    # Parameters by hand: a stem channel owns its 3x3 filter (in x 9), its BatchNorm gain and shift, and the
    # next conv's input slice (out x kernel); the blocks as in _expected_params.
    layers = model.patch_embed.proj.layers
    stem_removed = 0
    for k, (c, kept) in enumerate(zip((0, 3, 6), plan.stem)):
        nxt = layers[c + 3]
        per_channel = layers[c].in_channels * 9 + 2 + nxt.out_channels * nxt.kernel_size[0] * nxt.kernel_size[1]
        gone = layers[c].out_channels - len(kept)
        # The previous conv's cut already shrank this conv's input: those weights are not counted twice.
        if k:
            per_channel -= (layers[c].in_channels - len(plan.stem[k - 1])) * 9
        stem_removed += gone * per_channel
    assert _params(pruned) == _expected_params(model, plan) - stem_removed == _params(model) - removed
    assert abs(removed / _params(model) - 0.4) <= 0.02 * 0.4
    new = pruned.patch_embed.proj
    assert new.channels == tuple(len(k) for k in plan.stem)
    assert [new.layers[c].out_channels for c in (0, 3, 6)] == list(new.channels)
    assert [new.layers[b].num_features for b in (1, 4, 7)] == list(new.channels)
    # The cut equals the unpruned model with the removed channels gated to zero.
    masked = copy.deepcopy(model)
    groups = find_groups(masked, stem=True)
    install_gates(masked, groups)
    with torch.no_grad():
        for g, gate in zip(groups, installed_gates(masked, groups)):
            gate.gate.zero_()
            if g.kind == "stem":
                gate.gate[list(plan.stem[g.block])] = 1
            elif g.kind == "mlp":
                gate.gate[list(plan.blocks[g.block].mlp)] = 1
            else:
                bp = plan.blocks[g.block]
                for h, dims in zip(bp.heads, bp.dims):
                    gate.gate.view(g.shape)[h, list(dims)] = 1
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28)
        with torch.inference_mode():
            torch.testing.assert_close(pruned(x), masked(x), atol=2e-5, rtol=1e-4)
    # The step's meta rebuilds the same shapes on a fresh model, and the saved file shrinks.
    from vitcompress.methods.prune.cut import plan_from_meta, plan_to_meta

    meta = plan_to_meta(plan)
    assert [k["channels"] for k in meta["stem_plan"]] == list(new.channels)
    rebuilt = apply_plans(_model(STEM), plan_from_meta(meta))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    save_artifact(model, tmp_path / "base", {})
    save_artifact(pruned, tmp_path / "pruned", {})
    assert abs(size_on_disk(tmp_path / "pruned") / size_on_disk(tmp_path / "base") - 0.6) < 0.02


def test_stem_pruning_runs_end_to_end_and_restores(tmp_path) -> None:
    model = trained_like_batchnorms(_model(STEM))
    spec = STEM
    cfg = from_dict(get_method("prune.structured").config_cls,
                    {"ratio": 0.3, "importance": "kl", "head_unit": "dim", "stem": True, "ranking": "layer",
                     "calib_batches": 1,
                     "kl_chunks": 4, "finetune_epochs": 1}, "test")
    out = get_method("prune.structured").apply(model, cfg, _ctx(tmp_path))
    stem = out.model.patch_embed.proj
    assert sum(stem.channels) < 8 + 16 + 24
    kinds = {g["kind"] for g in out.meta["importance"]["groups"]}
    assert kinds == {"stem", "attn", "mlp"}
    stem_scores = [v for g in out.meta["importance"]["groups"] if g["kind"] == "stem" for v in g["scores"]]
    assert all(v >= 0 for v in stem_scores) and max(stem_scores) > 0  # KL of a stem channel: run from the input
    steps = [{"method": "prune.structured", "config": to_dict(cfg), "meta": out.meta}]
    save_artifact(out.model, tmp_path / "art", {"model": spec.to_dict(), "steps": steps})
    loaded = load_artifact(tmp_path / "art")
    assert loaded.patch_embed.proj.channels == stem.channels
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), out.model(x))
    plot = plot_importance(out.meta, tmp_path / "fig3.png")
    assert plot.stat().st_size > 0
    # The title counts what the step removed, not the units' costs (adjacent stem channels share weights).
    from vitcompress.methods.prune.plot import importance_title

    before, after = _params(model), _params(out.model)
    assert importance_title(out.meta) == f"Parameters vs importance: {before - after:,} of {before:,} parameters removed"


def test_stem_pruning_on_a_model_without_a_stem_says_so() -> None:
    with pytest.raises(VitcompressError, match="plain patch projection.*stem: false"):
        find_groups(_model(MICRO), stem=True)


def test_taylor_score_of_a_stem_channel_is_the_squared_derivative_of_scaling_it() -> None:
    # sum_b dL/dw_b * w_b over the channel's filter, BatchNorm gain and shift and the next conv's input slice
    # equals dL/d(alpha) when all of them are scaled by alpha.
    model = trained_like_batchnorms(_model(STEM))
    groups = find_groups(model, stem=True)
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    scores = taylor_importance(model, groups, [(x, y)])
    ch = 5
    alpha = torch.ones((), requires_grad=True)
    names = ["patch_embed.proj.layers.3.weight", "patch_embed.proj.layers.4.weight", "patch_embed.proj.layers.4.bias",
             "patch_embed.proj.layers.6.weight"]
    params = dict(model.named_parameters())
    scaled = {}
    for name, axis in zip(names, (0, 0, 0, 1)):
        p = params[name].detach().clone()
        shape = [1] * p.dim()
        shape[axis] = -1
        r = torch.ones(p.shape[axis])
        r[ch] = 0
        scaled[name] = p * (r + (1 - r) * alpha).view(shape)
    loss = F.cross_entropy(torch.func.functional_call(model, scaled, (x,)), y)
    (grad,) = torch.autograd.grad(loss, alpha)
    assert groups[1].kind == "stem" and groups[1].block == 1
    assert scores[1].units[ch].item() == pytest.approx(grad.item() ** 2, rel=1e-3)


def test_taylor_score_equals_a_hand_computation() -> None:
    # Two layers, y = W2 relu(W1 x + b1) + b2; a hidden unit j owns W1[j, :], b1[j] and W2[:, j].
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    params = dict(net.named_parameters())
    group = make_group(0, "mlp", (4,), (ParamSlice("0.weight", 0, (4,)), ParamSlice("0.bias", 0, (4,)),
                                        ParamSlice("2.weight", 1, (4,))), params, "2")
    assert group.unit_cost == 3 + 1 + 2
    batches = [(torch.randn(5, 3), torch.randint(0, 2, (5,))) for _ in range(3)]
    got = taylor_importance(net, [group], batches)[0].units

    w1, b1, w2, b2 = (p.detach() for p in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    want = torch.zeros(4, dtype=torch.float64)
    for x, y in batches:
        pre = x @ w1.T + b1
        h = pre.clamp(min=0)
        out = h @ w2.T + b2
        d_out = (out.softmax(-1) - F.one_hot(y, 2)) / len(y)  # dL/d out of the mean cross-entropy
        d_w2 = d_out.T @ h
        d_pre = (d_out @ w2) * (pre > 0)
        d_w1, d_b1 = d_pre.T @ x, d_pre.sum(0)
        c = (d_w1 * w1).sum(1) + d_b1 * b1 + (d_w2 * w2).sum(0)  # sum over the unit's weights of g * w
        want += c.double() ** 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-12)


def test_taylor_head_score_is_the_squared_derivative_of_scaling_that_head() -> None:
    # sum_b dL/dw_b * w_b = dL/d(alpha) when the head's q, k, v rows and proj columns are scaled by alpha.
    model = _model(MICRO)
    groups = find_groups(model)
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    scores = taylor_importance(model, groups, [(x, y)])
    attn = model.blocks[1].attn
    h, d, hd = 1, 3, attn.head_dim
    for unit, rows in (("head", slice(h * hd, (h + 1) * hd)), ("dim", slice(h * hd + d, h * hd + d + 1))):
        alpha = torch.ones((), requires_grad=True)
        w, b, p = attn.qkv.weight.detach().clone(), attn.qkv.bias.detach().clone(), attn.proj.weight.detach().clone()
        scale_rows = torch.ones(w.shape[0])
        width = attn.num_heads * hd
        for part in range(3):
            scale_rows[part * width + rows.start: part * width + rows.stop] = 0
        scale_cols = torch.ones(p.shape[1])
        scale_cols[rows] = 0
        r = scale_rows + (1 - scale_rows) * alpha
        c = scale_cols + (1 - scale_cols) * alpha
        loss = F.cross_entropy(torch.func.functional_call(model, {
            "blocks.1.attn.qkv.weight": w * r[:, None], "blocks.1.attn.qkv.bias": b * r,
            "blocks.1.attn.proj.weight": p * c[None, :]}, (x,)), y)
        (grad,) = torch.autograd.grad(loss, alpha)
        got = scores[2].heads[h] if unit == "head" else scores[2].units[h, d]
        assert got.item() == pytest.approx(grad.item() ** 2, rel=1e-3)


def test_kl_score_of_a_head_is_the_kl_without_it() -> None:
    model = _model(MICRO)
    groups = find_groups(model)
    x = torch.randn(8, 1, 28, 28)
    scores = kl_importance(model, groups, [(x, torch.zeros(8, dtype=torch.long))], attention_unit="head")
    with torch.no_grad():
        ref = F.log_softmax(model(x).double(), -1)
        cut = copy.deepcopy(model)
        hd = cut.blocks[0].attn.head_dim
        cut.blocks[0].attn.proj.weight[:, hd:2 * hd] = 0  # head 1's output never reaches the block
        kl = F.kl_div(F.log_softmax(cut(x).double(), -1), ref, log_target=True, reduction="sum").item()
    assert scores[0].heads[1].item() == pytest.approx(kl, rel=1e-4)
    assert _params(model) == _params(_model(MICRO))  # the gates came out again


def test_gates_fold_exactly_into_the_weights() -> None:
    model = _model(MICRO)
    groups = find_groups(model)
    install_gates(model, groups)
    with torch.no_grad():
        for gate in installed_gates(model, groups):
            gate.gate.uniform_(0.0, 2.0)
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        y = model(x)
    remove_gates(model, groups, fold=True)
    assert not any("gate" in name for name, _ in model.named_parameters())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), y, atol=1e-5, rtol=1e-5)


def test_token_merging_keeps_the_class_token_and_merges_r_per_block() -> None:
    model = _model(QUICK)  # 49 patches + class token, 4 blocks
    merged, schedule, entering = apply_merging(copy.deepcopy(model), TokenMergeConfig(r=5))
    assert schedule == [5, 5, 5, 5] and entering == [50, 45, 40, 35]
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        h = merged.norm_pre(merged.patch_drop(merged._pos_embed(merged.patch_embed(x))))
        size = None
        for blk, n_in in zip(merged.blocks, entering):
            assert h.shape[1] == n_in
            h, size = blk.merge_forward(h, size)
            assert h.shape[1] == n_in - 5
            assert torch.equal(size[:, 0, 0], torch.ones(3))  # the class token is never merged
            assert torch.allclose(size.sum(1), torch.full((3, 1), 50.0))  # every patch is still represented
        assert merged(x).shape == (3, 10)
    # r = 0 is the unmodified model; keep sets r from the token count and never empties the sequence.
    same, _, _ = apply_merging(copy.deepcopy(model), TokenMergeConfig(r=0))
    with torch.inference_mode():
        torch.testing.assert_close(same(x), model(x))
    _, schedule, entering = apply_merging(copy.deepcopy(model), TokenMergeConfig(keep=0.5))
    assert schedule == [24, 12, 6, 4] and entering[-1] - schedule[-1] >= 2
    _, schedule, entering = apply_merging(copy.deepcopy(model), TokenMergeConfig(r=1000))
    assert schedule == [25, 12, 6, 3]  # at most every A token of the bipartite split: ceil(patches / 2)
    _, schedule, entering = apply_merging(_model(MICRO), TokenMergeConfig(r=1000))  # 16 patches, 2 blocks
    assert entering == [17, 9] and schedule == [8, 4]


def test_token_merging_schedule_merges_where_it_says() -> None:
    model = _model(QUICK)  # 49 patches + class token, 4 blocks
    merged, schedule, entering = apply_merging(copy.deepcopy(model), TokenMergeConfig(schedule=(24,)))
    assert schedule == [24, 0, 0, 0] and entering == [50, 26, 26, 26]
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        h = merged.norm_pre(merged.patch_drop(merged._pos_embed(merged.patch_embed(x))))
        size = None
        for blk in merged.blocks:
            h, size = blk.merge_forward(h, size)
        assert h.shape[1] == 26 and torch.allclose(size.sum(1), torch.full((2, 1), 50.0))
        assert merged(x).shape == (2, 10)
    # Capped like r (at most the A half of the patches), and all zeros is the unmodified model.
    assert apply_merging(copy.deepcopy(model), TokenMergeConfig(schedule=(40, 40)))[1] == [25, 12, 0, 0]
    same = apply_merging(copy.deepcopy(model), TokenMergeConfig(schedule=(0, 0, 0, 0)))[0]
    with torch.inference_mode():
        torch.testing.assert_close(same(x), model(x))
    with pytest.raises(VitcompressError, match="5 entries for a model of 4 blocks"):
        apply_merging(copy.deepcopy(model), TokenMergeConfig(schedule=(1, 1, 1, 1, 1)))


def test_bipartite_merge_protects_the_class_token_and_averages_by_size() -> None:
    # The class token equals patch token 1; matching must still leave it alone.
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.0, 1.1]]])
    merge = bipartite_merge(x, 1, prefix=1)
    out = merge(x)
    assert out.shape == (1, 4, 2)
    assert torch.equal(out[0, 0], x[0, 0])
    size = merge(torch.ones(1, 5, 1))
    assert size[0, 0, 0] == 1 and size.sum() == 5


def test_bipartite_merge_sums_every_a_token_into_its_b_partner() -> None:
    # Tokens after the class token alternate A, B: A0 and A1 both match B0 best; B1 points elsewhere.
    cls, a0, b0, a1, b1 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.1], [0.0, 1.0, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 1.0]
    x = torch.tensor([[cls, a0, b0, a1, b1]])
    out = bipartite_merge(x, 2, prefix=1)(torch.cat([x, torch.ones(1, 5, 1)], dim=-1))
    expect = torch.tensor([[cls + [1.0], [0.0, 2.9, 0.1, 3.0], b1 + [1.0]]])
    torch.testing.assert_close(out, expect)
    # r = 1 merges the closer of the two (A1: cosine 1 with B0) and keeps A0 right after the class token.
    out = bipartite_merge(x, 1, prefix=1)(x)
    torch.testing.assert_close(out, torch.tensor([[cls, a0, [0.0, 1.9, 0.0], b1]]))


def test_config_errors_are_one_line() -> None:
    with pytest.raises(VitcompressError, match="prune.gates"):
        get_method("prune.structured").config_cls(importance="gate")
    with pytest.raises(VitcompressError, match="one of r, keep or schedule, not r and keep"):
        TokenMergeConfig(r=2, keep=0.5)
    with pytest.raises(VitcompressError, match=">= 0"):
        TokenMergeConfig(schedule=(4, -1))
    with pytest.raises(VitcompressError, match="ratio"):
        get_method("prune.structured").config_cls(ratio=1.5)


def test_ranges_round_trip() -> None:
    idx = (0, 1, 2, 5, 7, 8, 10)
    assert ranges(idx) == "0-2,5,7-8,10"
    assert parse_ranges(ranges(idx)) == idx
    assert parse_ranges("") == ()


CASES = [
    ("prune.structured", {"ratio": 0.2, "importance": "taylor", "calib_batches": 1}),
    ("prune.structured", {"ratio": 0.3, "importance": "kl", "head_unit": "dim", "calib_batches": 1, "kl_chunks": 4,
                          "distill": True}),
    ("prune.structured", {"ratio": 0.2, "importance": "magnitude", "heads": False, "ranking": "layer"}),
    ("prune.structured", {"ratio": 0.5, "importance": "taylor", "head_unit": "dim", "ranking": "layer",
                          "max_heads": 1, "calib_batches": 1}),
    ("prune.gates", {"ratio": 0.2}),
    ("prune.gates", {"ratio": 0.2, "importance": "taylor", "head_unit": "head", "calib_batches": 1}),
    ("tokens.merge", {"r": 3}),
    ("tokens.merge", {"keep": 0.7}),
    ("tokens.merge", {"schedule": [6]}),
]


@pytest.mark.parametrize(("name", "settings"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_restore_after_save_and_load_gives_identical_logits(name, settings, tmp_path) -> None:
    base = _model(MICRO)
    method = get_method(name)
    cfg = from_dict(method.config_cls, settings)
    assert from_dict(method.config_cls, to_dict(cfg)) == cfg
    out = method.apply(base, cfg, _ctx(tmp_path, teacher=base))
    x = torch.randn(5, 1, 28, 28)
    with torch.inference_mode():
        y = out.model(x)
    assert torch.isfinite(y).all()
    steps = [{"method": name, "config": to_dict(cfg), "meta": out.meta}]
    save_artifact(out.model, tmp_path / "art", {"model": MICRO.to_dict(), "steps": steps})
    loaded = load_artifact(tmp_path / "art")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), y, atol=1e-6, rtol=1e-6)
    if name.startswith("prune."):
        assert abs(out.meta["removed_fraction"] - cfg.ratio) <= 0.02 * cfg.ratio
        assert _params(loaded) == out.meta["params_after"]
        plot_importance(out.meta, tmp_path / "fig3.png")
        assert (tmp_path / "fig3.png").stat().st_size > 1000


def test_pruning_then_dynamic_int8_and_token_merging_restore(tmp_path) -> None:
    base = _model(MICRO)
    steps, model = [], base
    for name, settings in (("prune.structured", {"ratio": 0.2, "importance": "magnitude", "finetune_epochs": 0}),
                           ("tokens.merge", {"r": 2}), ("ptq.dynamic", {})):
        method = get_method(name)
        cfg = from_dict(method.config_cls, settings)
        out = method.apply(model, cfg, _ctx(tmp_path / name, teacher=base))
        steps.append({"method": name, "config": to_dict(cfg), "meta": out.meta})
        model = out.model
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        y = model(x)
    save_artifact(model, tmp_path / "art", {"model": MICRO.to_dict(), "steps": steps})
    with torch.inference_mode():
        torch.testing.assert_close(load_artifact(tmp_path / "art")(x), y, atol=1e-6, rtol=1e-6)


def test_pruning_refuses_a_merged_model(tmp_path) -> None:
    merged, _, _ = apply_merging(_model(MICRO), TokenMergeConfig(r=2))
    with pytest.raises(VitcompressError, match="before tokens.merge"):
        find_groups(merged)


def test_attention_heads_benchmark_quick_runs(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_heads.py"
    out = tmp_path / "heads.json"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    layouts = {(r["runtime"], r["layout"]) for r in rows}
    assert {("eager", "4x24"), ("eager", "4x6")} <= layouts
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["speed_vs_4x24"] == 1.0 for r in rows if r["layout"] == "4x24")


def test_token_merging_without_proportional_attention_attends_without_sizes() -> None:
    from timm.models.vision_transformer import Attention

    model = _model(QUICK)
    flat, _, _ = apply_merging(copy.deepcopy(model), TokenMergeConfig(schedule=(24,), prop_attn=False))
    prop, _, _ = apply_merging(copy.deepcopy(model), TokenMergeConfig(schedule=(24,)))
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        h = flat.norm_pre(flat.patch_drop(flat._pos_embed(flat.patch_embed(x))))
        h, size = flat.blocks[0].merge_forward(h, None)
        assert size is not None and size.max() > 1  # tokens were merged, and their sizes are still tracked
        blk = flat.blocks[1]
        want = h + Attention.forward(blk.attn, blk.norm1(h))  # plain attention: no log-size bias
        want = want + blk.mlp(blk.norm2(want))
        got, _ = blk.merge_forward(h, size)
        torch.testing.assert_close(got, want)
        assert not torch.allclose(flat(x), prop(x), atol=1e-4)


def test_token_merging_before_the_first_block_shortens_every_block() -> None:
    from vitcompress.methods.prune.tome import merge_weighted

    model = _model(QUICK)  # 49 patches + class token, 4 blocks
    cfg = TokenMergeConfig(entry=20)
    out = get_method("tokens.merge").apply(copy.deepcopy(model), cfg, None)
    assert out.meta["entry"] == 20 and out.meta["r_per_block"] == [0, 0, 0, 0]
    assert out.meta["tokens_per_block"] == [30, 30, 30, 30]
    merged, x = out.model, torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        h = merged.norm_pre(merged.patch_drop(merged._pos_embed(merged.patch_embed(x))))
        # The entry merge, matched on the tokens themselves: class token untouched, every patch still counted.
        h, size = merge_weighted(h, None, bipartite_merge(h, 20, 1))
        assert h.shape[1] == 30 and torch.equal(size[:, 0, 0], torch.ones(3))
        assert torch.allclose(size.sum(1), torch.full((3, 1), 50.0))
        for blk in merged.blocks:
            h, size = blk.merge_forward(h, size)
        assert h.shape[1] == 30
        torch.testing.assert_close(merged.head(merged.norm(h)[:, 0]), merged(x))  # what the model's forward does
    # entry plus merges inside the blocks: r counts from the shortened sequence.
    both = get_method("tokens.merge").apply(copy.deepcopy(model), TokenMergeConfig(entry=20, r=5), None)
    assert both.meta["tokens_per_block"] == [30, 25, 20, 15] and both.meta["tokens_out"] == 10
    # restore rebuilds the same model; an artifact saved with another entry is refused.
    restored = get_method("tokens.merge").restore(copy.deepcopy(model), cfg, out.meta)
    with torch.inference_mode():
        torch.testing.assert_close(restored(x), merged(x))
    with pytest.raises(VitcompressError, match="differs from the saved one"):
        get_method("tokens.merge").restore(copy.deepcopy(model), TokenMergeConfig(entry=16), out.meta)
    with pytest.raises(VitcompressError, match="entry must be >= 0"):
        from_dict(TokenMergeConfig, {"entry": -1}, "test")


def test_the_soft_kd_loss_of_the_prune_fine_tune_is_the_formula() -> None:
    from vitcompress.methods.distill.losses import make_distill_loss  # what methods/prune/finetune.py calls

    torch.manual_seed(0)
    teacher, student = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    loss = make_distill_loss("soft", teacher, alpha=0.7, tau=2.0, label_smoothing=0.1)(student, x, y)
    # By hand: alpha T^2 KL(softmax(t/T) || softmax(s/T)), averaged over the batch, plus (1 - alpha) CE.
    p_t = F.softmax(teacher(x) / 2.0, dim=-1)
    kl = (p_t * (p_t.log() - F.log_softmax(student(x) / 2.0, dim=-1))).sum(-1).mean()
    expected = 0.7 * 4.0 * kl + 0.3 * F.cross_entropy(student(x), y, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None  # the teacher gets no gradient
