"""Chains and search across techniques (issue: combinations and automatic search)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("optuna")  # the search extra
from conftest import tiny_recipe_dict

import vitcompress.data.source as data_source
import vitcompress.search.runner as search_runner
import vitcompress.study.runner as study_runner
from vitcompress.errors import VitcompressError
from vitcompress.search import pareto_mask
from vitcompress.search.runner import run_search
from vitcompress.study import parse_recipe

pytestmark = pytest.mark.usefixtures("needs_fmnist")


def test_pareto_mask() -> None:
    pts = [(90, -10, 100), (89, -5, 100), (88, -6, 90), (90, -10, 100.5)]
    assert pareto_mask(pts) == [False, True, False, True]


def _search_recipe(**budgets) -> dict:
    d = tiny_recipe_dict(experiments=[])
    d["search"] = {
        "trials": 4, "val_images": 200, "sampler": "random", "budgets": budgets,
        # Four distinct chains (a chain is its settings: two templates that can write the same settings
        # would hold fewer).
        "chains": [[{"ptq.dynamic": {"per_channel": {"choice": [True, False]}}}],
                   [{"ptq.dynamic": {"skip_head": True, "per_channel": {"choice": [True, False]}}}]],
    }
    return d


def test_search_space_is_validated() -> None:
    d = _search_recipe()
    d["search"]["chains"] = [[{"ptq.dynamic": {}}, {"ptq.dynamic": {"per_channel": {"choice": [True]}}}]]
    with pytest.raises(VitcompressError, match="integer weights"):
        parse_recipe(d)
    d = _search_recipe()
    d["search"]["chains"] = [[{"ptq.dynamic": {"per_channel": {"int": [3, 1]}}}]]
    with pytest.raises(VitcompressError, match="low <= high"):
        parse_recipe(d)


def test_search_respects_the_size_budget_and_never_sees_the_test_split(tmp_path, monkeypatch) -> None:
    calls: list[str] = []
    real = data_source.load_split

    def spy(name, split, *a, **k):
        calls.append(split)
        return real(name, split, *a, **k)

    # Every split the study and the search read goes through the data source's loader.
    monkeypatch.setattr(data_source, "load_split", spy)
    measured: list[int] = []
    real_eval = search_runner.evaluate_accuracy

    def eval_spy(model, ds, **kw):
        measured.append(len(ds))
        return real_eval(model, ds, **kw)

    monkeypatch.setattr(search_runner, "evaluate_accuracy", eval_spy)

    # A budget no model can meet, then, on the same trials (resumed, nothing re-runs), one that some meet.
    recipe = parse_recipe(_search_recipe(max_size_mb=0.001))
    res = run_search(recipe, tmp_path / "s", progress=False, log=lambda m: None)
    assert res.best is None
    assert len(res.rows) == 4 and all(r["status"] == "ok" for r in res.rows)
    sizes = sorted(r["size_bytes"] for r in res.rows)
    recipe = parse_recipe(_search_recipe(max_size_mb=(sizes[0] + 1) / 1e6))
    again = run_search(recipe, tmp_path / "s", progress=False, log=lambda m: None)
    assert [r["trial"] for r in again.rows] == [r["trial"] for r in res.rows]
    best = again.best
    assert best is not None and best["size_bytes"] == sizes[0]
    assert best["size_bytes"] / 1e6 <= recipe.search.budgets.max_size_mb
    assert (tmp_path / "s" / best["artifact"]).stat().st_size == best["size_bytes"]
    # Searching read only the training split (each run first fingerprints it, to check that the folder holds
    # rows of this data; the resumed run needed nothing else); the test split was read once per run, after
    # the trials, for the final check.
    assert calls == ["train", "train", "test", "train", "test"]
    assert all(r["n_test"] == 200 for r in again.rows)
    assert measured == [10000, 10000, 10000]  # test-split evaluations: baseline, then baseline + best
    cached = json.loads((tmp_path / "s" / "best.json").read_text())
    assert best["artifact"] in cached["test_top1"]
    assert (tmp_path / "s" / "search_report.md").read_text().count("★") >= 1


def test_validation_split_is_carved_from_train(tmp_path) -> None:
    recipe = parse_recipe(_search_recipe())
    s = search_runner.SearchStudy(recipe, tmp_path, 200, progress=False, log=lambda m: None)
    _ = s.train_ds
    val, fit = set(s.val_indices.tolist()), set(s.fit_indices.tolist())
    assert len(val) == 200 and not (val & fit) and len(val | fit) == 60000


def test_validation_split_is_carved_from_an_image_folders_train(tmp_path) -> None:
    """A user's folder: the search's validation images come from train/, never from val/, and a preset
    trained from scratch there is fed the folder's own statistics."""
    from fixtures_data import write_image_folder

    root = write_image_folder(tmp_path / "imgs", per_class={"bird": 8, "Cat": 8, "dog": 8}, val_per_class=3)
    d = _search_recipe()
    d["data"] = {"name": "imagefolder", "root": str(root), "calib_images": 8}
    s = search_runner.SearchStudy(parse_recipe(d), tmp_path / "run", 6, progress=False, log=lambda m: None)
    train, val = s.train_ds, s.test_ds
    assert (len(train), len(val)) == (18, 6)
    full = s.source.split("train", s.preprocess).images
    assert torch.equal(val.images, full[s.val_indices]) and torch.equal(train.images, full[s.fit_indices])
    assert s.preprocess.source == "dataset" and s.preprocess.input_size == 28 and s.preprocess.in_chans == 3


def test_relative_budgets_use_the_baseline_measured_in_the_same_run() -> None:
    from vitcompress.search.space import Budgets

    base = {"size_bytes": 2_000_000, "cpu_img_s": 1000.0, "top1": 90.0, "status": "ok"}
    b = Budgets(max_size_mb=1.0, max_size_ratio=0.15, min_speedup=2.0, max_acc_drop=5.0)
    assert b.limits(base) == (300_000, 2000.0)  # the tighter of the absolute and relative limits
    assert Budgets(max_size_mb=0.2, min_cpu_img_s=2500.0, min_speedup=2.0).limits(base) == (200_000, 2500.0)
    row = {"status": "ok", "size_bytes": 300_000, "cpu_img_s": 2000.0, "top1": 85.0}
    assert search_runner._feasible(row, b, base)
    for change in ({"size_bytes": 300_001}, {"cpu_img_s": 1999.0}, {"top1": 84.9}, {"status": "failed"}):
        assert not search_runner._feasible(row | change, b, base), change


def test_a_chain_already_tried_is_not_measured_again(tmp_path) -> None:
    d = _search_recipe()
    d["search"]["trials"] = 3  # but only two distinct chains exist
    d["search"]["chains"] = [[{"ptq.dynamic": {"per_channel": {"choice": [True, False]}}}]]
    logs: list[str] = []
    res = run_search(parse_recipe(d), tmp_path / "s", progress=False, log=logs.append)
    assert len(res.rows) == 2 and all(r["status"] == "ok" for r in res.rows)
    assert {r["params"]["c0.s0.ptq.dynamic.per_channel"] for r in res.rows} == {0, 1}
    assert sum("again; not counted" in m for m in logs) >= 20
    assert any(m.strip().startswith("stopping:") for m in logs)


def test_a_space_extended_with_a_new_setting_knows_the_chains_tried_before(tmp_path) -> None:
    prune = {"ratio": {"choice": [0.4, 0.5]}, "importance": "magnitude", "head_unit": "dim", "finetune_epochs": 0}
    d = _search_recipe()
    d["search"]["trials"] = 2
    d["search"]["chains"] = [[{"prune.structured": prune}]]
    first = run_search(parse_recipe(d), tmp_path / "s", progress=False, log=lambda m: None)
    assert len(first.rows) == 2
    # The same space with max_heads added (a setting whose default, null, is the old behaviour): a proposal
    # with max_heads null is a chain already tried, whatever the sampler's parameters now read.
    d["search"]["trials"] = 4
    d["search"]["chains"] = [[{"prune.structured": prune | {"max_heads": {"choice": [None, 1]}}}]]
    logs: list[str] = []
    res = run_search(parse_recipe(d), tmp_path / "s", progress=False, log=logs.append)
    assert len(res.rows) == 4 and all(r["status"] == "ok" for r in res.rows)
    new = res.rows[2:]
    assert all(r["steps"][0]["config"]["max_heads"] == 1 for r in new)
    assert sorted(r["steps"][0]["config"]["ratio"] for r in new) == [0.4, 0.5]
    assert any("again; not counted" in m for m in logs)


def test_refit_trains_the_chosen_chain_on_every_training_image(tmp_path, monkeypatch) -> None:
    d = _search_recipe()
    d["search"]["trials"] = 2
    d["search"]["refit"] = True
    d["search"]["chains"] = [[{"ptq.dynamic": {"per_channel": {"choice": [True, False]}}}]]
    fits: list[int] = []
    real_fit = study_runner.Study._materialize

    def spy(self, steps):
        if not steps and not (self._artifact_dir(steps) / "model.safetensors").exists():
            fits.append(len(self.train_ds))
        return real_fit(self, steps)

    monkeypatch.setattr(study_runner.Study, "_materialize", spy)
    res = run_search(parse_recipe(d), tmp_path / "s", progress=False, log=lambda m: None)
    assert res.best is not None and res.refit is not None
    assert fits == [60000 - 200, 60000]  # the search's baseline without the validation images, then all
    base, chain = res.refit.rows
    assert base["baseline"] and base["n_test"] == 256 and chain["status"] == "ok"
    assert [s["config"] for s in chain["steps"]] == [s["config"] for s in res.best["steps"]]
    # Not the search's baseline: the refit's chain starts from the model trained on all 60k.
    assert base["artifact"] != json.loads((tmp_path / "s" / "trials.jsonl").read_text().splitlines()[0])["artifact"]
    assert (tmp_path / "s" / "refit" / chain["artifact"]).stat().st_size == chain["size_bytes"]
    report = (tmp_path / "s" / "search_report.md").read_text()
    assert "refit on the whole training split" in report
    assert f"| {chain['name']} | {chain['top1']:.2f} |" in report and report.count("| yes |") >= 1  # no budgets
    again = run_search(parse_recipe(d), tmp_path / "s", progress=False, log=lambda m: None)
    assert fits == [60000 - 200, 60000]  # resumed: nothing trained again
    assert again.refit.rows[1]["top1"] == chain["top1"]
