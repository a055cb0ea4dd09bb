"""``vitcompress search``: explore chains of methods under size / speed / accuracy budgets.

No toolkit we know of searches *across* techniques (NNCF's accuracy control,
INC and ModelOpt's AutoQuantize each tune one technique), so the loop is ours;
the optimizer is Optuna's (multi-objective TPE or NSGA-II, with the budgets as
constraints). Every candidate is a chain like a study experiment, built with
the same runner (prefixes cached, training resumable) and measured by the same
code. Accuracy during the search is measured on a validation split carved from
the training split; the chains train on the rest. The test split is loaded once,
after the search, to re-evaluate the chosen candidate.

Outputs in the run folder: ``trials.jsonl`` (every trial as a row),
``search_report.md`` (trials, Pareto front, the best candidate under the
budgets with its test accuracy), ``plots/search_*.png``, ``best.json``; with
``search.refit``, ``refit/``: a study of the chosen chain re-trained from a
baseline that saw every training image (validation split included).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..artifact import load_artifact
from ..config import key_dict
from ..data import FileImages, ImageTensorDataset
from ..errors import VitcompressError, raise_if_storage
from ..measure import evaluate_accuracy
from ..methods import parse_steps
from ..study.recipe import Experiment, Recipe
from ..study.results import append_row, load_rows
from ..study.retime import needs_retime, retime_rows, write_rows
from ..study.runner import RunLock, Study, StudyResult
from .pareto import mark_pareto
from .report import reference_img_s, speedup
from .space import SearchConfig, suggest_steps

TRIALS_FILE = "trials.jsonl"


@functools.cache
def _new_constraints() -> bool:
    """Whether this Optuna takes constraints from the trial (``Trial.set_constraint``, Optuna >= 5)."""
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


class SearchStudy(Study):
    """A study whose 'test' split is a validation slice of the training split."""

    data_splits = ("train",)  # the test split is read once, after the trials, for the final check

    def __init__(self, recipe: Recipe, run_dir: Path, val_images: int, **kwargs: Any) -> None:
        super().__init__(recipe, run_dir, **kwargs)
        self.results_path = run_dir / TRIALS_FILE  # the rows a search keeps (and checks for its run key)
        self.val_images = val_images
        self.val_indices: torch.Tensor | None = None
        self.fit_indices: torch.Tensor | None = None

    def _artifact_dir(self, steps: tuple[Any, ...]) -> Path:
        # Trained on fewer images than a study's models: never share their artifacts.
        return self.run_dir / "artifacts" / f"val-{self.recipe.prefix_key(steps)}"

    def _split(self) -> None:
        full = self.source.split("train", self.preprocess, progress=self.progress)
        if self.val_images >= len(full):
            raise VitcompressError(f"search.val_images ({self.val_images}) must be below the {len(full)} training "
                                   "images; lower it")
        g = torch.Generator().manual_seed(self.recipe.seed + 7919)
        perm = torch.randperm(len(full), generator=g)
        self.val_indices, self.fit_indices = perm[: self.val_images], perm[self.val_images:]
        self._train = full.subset(self.fit_indices)
        self._test = full.subset(self.val_indices)

    @property
    def train_ds(self) -> ImageTensorDataset | FileImages:
        if self._train is None:
            self._split()
        assert self._train is not None
        return self._train

    @property
    def test_ds(self) -> ImageTensorDataset | FileImages:
        if self._test is None:
            self._split()
        assert self._test is not None
        return self._test


@dataclass
class SearchResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    report: Path
    refit: StudyResult | None = None


def _feasible(row: dict[str, Any], budgets: Any, base: dict[str, Any]) -> bool:
    return row.get("status") == "ok" and all(v <= 0 for v in _violations(row, budgets, base))


def _violations(row: dict[str, Any], budgets: Any, base: dict[str, Any]) -> list[float]:
    # Optuna's constraint convention: a value <= 0 means satisfied (sizes in MB, speeds in images/s).
    base = base | {"cpu_img_s": reference_img_s(row, base)}
    max_bytes, min_img_s = budgets.limits(base)
    img_s = speedup(row, base) * base["cpu_img_s"]  # the row's speed as its (paired) speed-up says
    return [
        (row["size_bytes"] - max_bytes) / 1e6 if max_bytes is not None else -1.0,
        (min_img_s - img_s) if min_img_s is not None else -1.0,
        ((base["top1"] - row["top1"]) - budgets.max_acc_drop) if budgets.max_acc_drop is not None else -1.0,
    ]


def _chain_key(steps: tuple[Any, ...]) -> str:
    """What identifies a chain: its methods and their settings, less the late-added settings at their defaults
    (as a study's cache key). Keyed on the settings, not on the sampler's parameter names, a space extended
    with a new setting still knows the chains tried before it: the new setting at its default is the old chain."""
    return json.dumps([[s.method, key_dict(s.config)] for s in steps], sort_keys=True, default=str)


def _row_key(row: dict[str, Any]) -> str:
    """A trials.jsonl row's :func:`_chain_key`. A measured row stores its steps as ``{"method", "config"}``,
    a failed one as the raw ``{method: settings}`` proposed."""
    try:
        raw = [{s["method"]: s["config"]} if set(s) == {"method", "config"} else s for s in row["steps"]]
        return _chain_key(parse_steps(raw, "trial"))
    except (VitcompressError, KeyError, TypeError, ValueError):
        return json.dumps(row.get("params"), sort_keys=True, default=str)  # a row whose steps no longer parse


def _sampler(cfg: SearchConfig, seed: int) -> Any:
    import optuna

    def constraints(trial: Any) -> list[float]:
        return trial.user_attrs.get("violations", [1.0, 1.0, 1.0])

    # Optuna >= 5 reads constraints a trial sets itself (Trial.set_constraint, see the loop); older
    # versions take a function of the finished trial.
    kw = {} if _new_constraints() else {"constraints_func": constraints}
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **kw)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, **kw)


def _set_constraints(trial: Any, violations: list[float]) -> None:
    trial.set_user_attr("violations", violations)
    if _new_constraints():
        for name, value in zip(("size", "speed", "accuracy"), violations, strict=True):
            trial.set_constraint(name, value)


def run_search(recipe: Recipe, out_dir: str | Path | None = None, *, trials: int | None = None,
               data_root: str | None = None, progress: bool = True, log: Any = None) -> SearchResult:
    """Run (or resume) the search a recipe's ``search`` section describes."""
    try:
        import optuna
        from optuna.trial import TrialState
    except ImportError:
        raise VitcompressError("vitcompress search needs Optuna: pip install 'vitcompress[search]'") from None

    if recipe.search is None:
        raise VitcompressError(f"recipe '{recipe.name}' has no 'search' section; add one (see README: Search)")
    cfg = recipe.search
    n_trials = trials or cfg.trials
    run_dir = Path(out_dir) if out_dir is not None else Path("runs") / f"{recipe.name}-search"
    run_dir.mkdir(parents=True, exist_ok=True)
    study = SearchStudy(recipe, run_dir, cfg.val_images, data_root=data_root, progress=progress, log=log)
    say = study.log
    trials_path = run_dir / TRIALS_FILE
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with RunLock(run_dir):
        study._check_run_dir()
        study._repair_results()
        study._check_data()
        rows = load_rows(trials_path)
        base = next((r for r in rows if r.get("trial") == -1 and r.get("status") == "ok"), None)
        if base is None:
            say("▶ baseline (validation split)")
            model, art = study._materialize(())
            base = study._measure(Experiment(recipe.baseline.name, ()), model, art, 0.0) | {"trial": -1}
            append_row(trials_path, base)
        opt = optuna.create_study(
            study_name=recipe.name, storage=f"sqlite:///{run_dir / 'optuna.db'}", load_if_exists=True,
            directions=["maximize", "minimize", "maximize"], sampler=_sampler(cfg, recipe.seed),
        )
        for t in opt.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # A trial the last run was killed in: its saved prefixes are reused by the next ones.
            opt._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        # A sampler may propose a chain it has tried (TPE does, once it settles): such a trial is told to
        # Optuna as pruned, so it does not count, and the search goes on to a chain not tried yet; if the
        # space holds fewer distinct chains than `trials`, it stops after many repeats in a row.
        tried = {_row_key(r): r["trial"] for r in load_rows(trials_path) if r.get("trial", -1) >= 0}
        repeats = 0
        while len(opt.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))) < n_trials:
            trial = opt.ask()
            steps_raw = suggest_steps(trial, cfg)
            try:
                steps = parse_steps(steps_raw, f"trial {trial.number}")
                key = _chain_key(steps)
            except (VitcompressError, RuntimeError, ValueError):
                steps, key = None, json.dumps(trial.params, sort_keys=True, default=str)  # fails below, recorded
            if key in tried:
                say(f"▶ trial {trial.number}: the chain of trial {tried[key]} again; not counted")
                opt.tell(trial, state=TrialState.PRUNED)
                repeats += 1
                if repeats >= max(20, 2 * n_trials):
                    say(f"  stopping: {repeats} proposals in a row were chains already tried; the space may hold "
                        f"fewer than {n_trials} distinct chains")
                    break
                continue
            repeats = 0
            tried[key] = trial.number
            t0 = time.perf_counter()
            try:
                if steps is None:
                    steps = parse_steps(steps_raw, f"trial {trial.number}")
                exp = Experiment(f"trial {trial.number}", steps)
                say(f"▶ trial {trial.number}: {exp.method} {json.dumps(trial.params)}")
                model, art = study._materialize(steps)
                row = study._measure(exp, model, art, time.perf_counter() - t0)
            except (VitcompressError, RuntimeError, ValueError) as exc:
                raise_if_storage(exc, run_dir)  # the disk, not the chain: nothing recorded, the next run retries
                msg = " ".join(str(exc).split())[:300]
                say(f"  trial {trial.number} failed: {msg}")
                append_row(trials_path, {"trial": trial.number, "name": f"trial {trial.number}", "status": "failed",
                                         "error": msg, "steps": steps_raw, "params": trial.params})
                opt.tell(trial, state=TrialState.FAIL)
                continue
            row |= {"trial": trial.number, "params": trial.params}
            violations = _violations(row, cfg.budgets, base)
            _set_constraints(trial, violations)
            row["feasible"] = all(v <= 0 for v in violations)
            append_row(trials_path, row)
            opt.tell(trial, [row["top1"], row["size_bytes"] / 1e6, row["cpu_img_s"]])
            say(f"  val top1 {row['top1']:.2f}%  size {row['size_bytes'] / 1e6:.3f} MB  "
                f"cpu {row['cpu_img_s']:.0f} img/s  {'within' if row['feasible'] else 'outside'} budgets")

        every = load_rows(trials_path)
        base = next(r for r in every if r.get("trial") == -1 and r.get("status") == "ok")
        rows = [r for r in every if r.get("trial", -1) >= 0]
        if recipe.measure.interleave and needs_retime([base, *rows]):
            # Trials were timed one by one, minutes apart; the choice rests on speeds re-timed in rounds
            # with the baseline (see vitcompress.study.retime), as a study's rows are.
            retime_rows([base, *rows], run_dir, study._example(), recipe.measure, log=say)
            for r in rows:
                if r.get("status") == "ok":
                    r["feasible"] = _feasible(r, cfg.budgets, base)
            write_rows(trials_path, every)
        ok = mark_pareto([r for r in rows if r.get("status") == "ok"])
        feasible = [r for r in ok if _feasible(r, cfg.budgets, base)]
        best = max(feasible, key=lambda r: (r["top1"], -r["size_bytes"])) if feasible else None
        test_eval = _evaluate_on_test(study, [base] + ([best] if best else []), run_dir)
        refit = None
        if cfg.refit and best is not None:
            say(f"▶ refit: trial {best['trial']}'s chain from a baseline trained on all training images")
            refit = _refit(recipe, run_dir, best, data_root=data_root, progress=progress, log=say)
        from .report import write_search_report

        report = write_search_report(run_dir, recipe, base, rows, best, test_eval, refit)
    return SearchResult(run_dir, rows, best, report, refit)


REFIT_NAME = "Searched chain (refit)"


def _refit(recipe: Recipe, run_dir: Path, best: dict[str, Any], **kwargs: Any) -> StudyResult:
    """The chosen chain as a study on the full training split: a baseline trained on every training image
    (the search's baseline left the validation images out), the chain applied to it, both measured on the
    test split with a study's timing. Resumable like any study; a later search that chooses another chain
    adds its row to the same folder."""
    raw = [{s["method"]: s["config"]} for s in best["steps"]]
    name = f"{REFIT_NAME}: trial {best['trial']}"
    exp = Experiment(name, parse_steps(raw, f"search refit (trial {best['trial']})"))
    study_recipe = replace(recipe, name=f"{recipe.name}-refit", experiments=(exp,), search=None)
    return Study(study_recipe, run_dir / "refit", **kwargs).run()


def _evaluate_on_test(study: SearchStudy, rows: list[dict[str, Any]], run_dir: Path) -> dict[str, float]:
    """Test-split top-1 of the baseline and the chosen candidate: the only use of the test split."""
    path = run_dir / "best.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    wanted = {r["artifact"] for r in rows}
    if set(cached.get("test_top1", {})) == wanted:
        return cached["test_top1"]
    test = study.source.split("test", study.preprocess, progress=study.progress)
    out = {}
    for r in rows:
        model = load_artifact(run_dir / Path(r["artifact"]).parent)
        out[r["artifact"]] = evaluate_accuracy(model, test, img_size=study.spec.img_size,
                                               in_chans=study.spec.in_chans)["top1"]
    path.write_text(json.dumps({"test_top1": out, "best": rows[-1] if len(rows) > 1 else None}, indent=2,
                               default=str))
    return out
