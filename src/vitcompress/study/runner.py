"""Run a study: baseline, then each experiment's chain, each measured the same way.

The run folder holds everything, so re-running the same command resumes:

* ``artifacts/<key>/`` one saved model per chain prefix (``key`` hashes the
  baseline and the steps), written before any row that uses it; two experiments
  that share a prefix share the artifact, and a killed training resumes from
  ``artifacts/<key>/work/train/train_state.pt``;
* ``results.jsonl`` one row per finished experiment (see :mod:`.results`);
  experiments with an ``ok`` row for the same steps are skipped;
* ``report.md``, ``results.csv``, ``plots/`` re-rendered at the end.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import dist
from ..artifact import (
    META_FILE,
    ArtifactChanged,
    load_artifact,
    read_meta,
    save_artifact,
    size_on_disk,
    upgrade_artifact,
    verify_artifact,
)
from ..config import to_dict
from ..data import (
    DataSource,
    FileImages,
    ImageTensorDataset,
    Preprocess,
    dataset_preprocess,
    make_loader,
    open_source,
)
from ..errors import VitcompressError, raise_if_storage
from ..measure import (
    count_macs,
    count_params,
    cpu_speed,
    environment,
    evaluate_accuracy,
    gpu_speed,
    uses_integer_kernels,
)
from ..methods import get_method, parse_config
from ..models import ModelSpec, load_model, model_preprocess
from ..train import CKPT_FILE
from .context import StepContext
from .recipe import Experiment, Recipe, Step
from .results import RESULTS_FILE, add_warning, append_row, load_rows, repair_results
from .retime import needs_retime, primary_runtime, retime_rows, write_rows

RUN_INFO = "run.json"


@dataclass
class StudyResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    report: dict[str, Any]


def _final_model_name(meta: dict[str, Any], default: str) -> str:
    """The architecture a chain ends with: the last step that built a new model (a student) names it, by the
    name the recipe gave it where there is one (a transformers folder converts to a generic ``vitc_vit``)."""
    name = default
    for step in meta.get("steps", []):
        step_meta = step.get("meta") or {}
        student = step_meta.get("student")
        if isinstance(student, dict) and student.get("name"):
            name = step_meta.get("student_from") or student["name"]
    return name


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """What a study wrote in ``run_dir/run.json`` (recipe, command, run keys); {} when there is none.

    A damaged one is an error: it says which study the folder holds, and guessing (stamping it anew) would
    let another study's rows pass for this one's.
    """
    path = run_dir / RUN_INFO
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        return info
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise VitcompressError(
            f"{path} is damaged ({type(exc).__name__}: {str(exc)[:80]}); it records which study {run_dir} holds: "
            "restore it, or pass --out NEW_DIR for a new folder (the rows stay readable: vitcompress report)"
        ) from None


def _step_keys(stored: Any) -> list[dict[str, Any]] | None:
    """The ``Step.key_dict`` of each step a finished row stored (written by this or an earlier version);
    None when one no longer parses (a removed or renamed option): the row is then re-run."""
    try:
        return [Step(s["method"], parse_config(s["method"], s["config"], "results")).key_dict() for s in stored]
    except (VitcompressError, KeyError, TypeError):
        return None


def small_tensor_storage(steps: tuple[Step, ...]) -> str:
    """How a chain's artifact stores the float tensors left in it (``save_artifact``'s ``small_tensors``).

    float32 for a float chain; float16 after a step that produced integer weights (biases, norms,
    scales, embeddings: next to 8-bit or fewer weights their rounding is noise, and the file is what
    ships); uint8 codes where a step's config asks for them (``qat.lsq``'s ``small_tensors``).
    """
    asked = {getattr(s.config, "small_tensors", None) for s in steps}
    if "uint8" in asked:
        return "uint8"
    if "float16" in asked or any(get_method(s.method).produces_int_weights for s in steps):
        return "float16"
    return "float32"


def _check_finite(model: nn.Module, example: torch.Tensor, what: str) -> None:
    """Refuse (before it is saved) a model whose outputs are NaN or inf: a diverged or broken step."""
    with torch.inference_mode():
        finite = bool(torch.isfinite(model(example)).all())
    if not finite:
        raise VitcompressError(f"{what} gave a model with non-finite (NaN or inf) outputs; it diverged or broke "
                               "the weights (try a lower learning rate or turn off mixed precision)")


def _non_finite(row: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys of ``row`` (nested dicts included) holding NaN or inf, which a JSON row cannot hold."""
    bad = []
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(prefix + key)
        elif isinstance(value, dict):
            bad += _non_finite(value, f"{prefix}{key}.")
    return bad


class RunLock:
    """One study per run folder at a time (a second would interleave rows and checkpoints)."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = run_dir / ".lock"
        self.enabled = enabled

    def __enter__(self) -> RunLock:
        if not self.enabled:  # the other processes of an `accelerate launch` study
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise VitcompressError(f"another vitcompress study is running in {self.path.parent}; wait for it "
                                   "or pass --out NEW_DIR") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class Study:
    data_splits: tuple[str, ...] = ("train", "test")  # the splits a run reads (its data fingerprint covers them)

    def __init__(self, recipe: Recipe, run_dir: Path, *, data_root: str | None = None, download: bool | None = None,
                 progress: bool = True, debug: bool = False, log: Callable[[str], None] | None = None,
                 keep_train_state: bool = False) -> None:
        self.recipe = recipe
        # Training checkpoints (train_state.pt) are removed once the model they would resume is saved.
        self.keep_train_state = keep_train_state
        self.run_dir = run_dir
        self.data_root = data_root if data_root is not None else recipe.data.root
        self.download = recipe.data.download if download is None else download
        self.progress = progress
        self.debug = debug
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.results_path = run_dir / RESULTS_FILE
        self._source: DataSource | None = None
        self._spec: ModelSpec | None = None
        self._preprocess: Preprocess | None = None
        self._train: ImageTensorDataset | FileImages | None = None
        self._test: ImageTensorDataset | FileImages | None = None
        self._baseline: nn.Module | None = None
        self.run_key: str | None = None  # baseline and data fingerprint, set when the run checks its folder
        self.tracking: Any = None  # vitcompress.track.Tracking while a run logs to trackers
        self._building: str | None = None  # the experiment being built (names its trainings in the trackers)

    # ---- data -------------------------------------------------------------------------------
    @property
    def source(self) -> DataSource:
        """The recipe's dataset (its class names are known once it is open; its files are read on demand)."""
        if self._source is None:
            self._source = open_source(self.recipe.data, root=self.data_root, download=self.download, log=self.log)
        return self._source

    @property
    def spec(self) -> ModelSpec:
        """The baseline as the recipe names it, with the data's class count and its input size resolved."""
        if self._spec is None:
            self._spec = self.recipe.model_spec(self.source.num_classes, self.source.channels)
        return self._spec

    @property
    def preprocess(self) -> Preprocess:
        """How images become the models' inputs: as the baseline's artifact says once it exists (runs made
        before inputs followed the model used the dataset's statistics), else the baseline's own recipe or the
        training split's statistics (``baseline.preprocess``)."""
        if self._preprocess is None:
            art = self._artifact_dir(())
            meta = read_meta(art) if (art / META_FILE).is_file() else None
            if meta is not None and meta.get("preprocess"):
                self._preprocess = Preprocess.from_dict(meta["preprocess"])
            elif meta is not None:
                self._preprocess = self._dataset_preprocess()
            else:
                self._preprocess = self._resolve_preprocess()
        return self._preprocess

    def _dataset_preprocess(self) -> Preprocess:
        geometry = dataset_preprocess((0.5,) * self.spec.in_chans, (0.5,) * self.spec.in_chans, self.spec.img_size,
                                      self.spec.in_chans)
        mean, std = self.source.statistics(geometry)
        return dataset_preprocess(mean, std, self.spec.img_size, self.spec.in_chans)

    def _resolve_preprocess(self) -> Preprocess:
        b, spec = self.recipe.baseline, self.spec
        mode = b.preprocess
        own = None
        if mode != "dataset":
            own = model_preprocess(spec.name, pretrained=b.pretrained, checkpoint=b.checkpoint, img_size=spec.img_size,
                                   in_chans=spec.in_chans)
            if own is None and mode == "model":
                raise VitcompressError(f"baseline.preprocess is 'model', but {spec.name} brings no input recipe (no "
                                       "pretrained config or preprocessor_config.json); use 'dataset' or 'auto'")
        return own if own is not None else self._dataset_preprocess()

    @property
    def train_ds(self) -> ImageTensorDataset | FileImages:
        if self._train is None:
            self._train = self.source.split("train", self.preprocess, progress=self.progress)
        return self._train

    @property
    def test_ds(self) -> ImageTensorDataset | FileImages:
        if self._test is None:
            ds = self.source.split("test", self.preprocess, progress=self.progress)
            n = self.recipe.measure.test_subset
            self._test = ds.subset(torch.arange(min(n, len(ds)))) if n else ds
        return self._test

    # ---- chains -----------------------------------------------------------------------------
    def _artifact_dir(self, steps: tuple[Step, ...]) -> Path:
        return self.run_dir / "artifacts" / self.recipe.prefix_key(steps)

    def _example(self) -> torch.Tensor:
        loader = make_loader(self.test_ds, self.recipe.measure.batch_size, train=False,
                             img_size=self.spec.img_size, in_chans=self.spec.in_chans)
        return next(iter(loader))[0]

    def _context(self, work_dir: Path, name: str) -> StepContext:
        return StepContext(
            train_ds=self.train_ds, img_size=self.spec.img_size, in_chans=self.spec.in_chans,
            num_classes=self.spec.num_classes, seed=self.recipe.seed, work_dir=work_dir,
            baseline_train=self.recipe.baseline.train, teacher=self.baseline_model(),
            calib_images=self.recipe.data.calib_images, progress=self.progress, name=name,
            train_log=self._train_log if self.tracking is not None else None,
        )

    def _train_log(self, name: str) -> Any:
        """What a training reports to the trackers; its name says which experiment's step it is."""
        from ..track import TrainLog

        cfg = self.recipe.tracking
        val = self.test_ds.subset(torch.arange(min(cfg.val_images, len(self.test_ds)))) if cfg.val_images else None

        def validate(model: nn.Module) -> float:
            device = next(model.parameters()).device
            return evaluate_accuracy(model, val, img_size=self.spec.img_size, in_chans=self.spec.in_chans,
                                     batch_size=self.recipe.measure.eval_batch_size, device=str(device))["top1"]

        label = name if self._building is None or name == "baseline" else f"{self._building}/{name}"
        assert self.tracking is not None
        return TrainLog(self.tracking, label, validate if val is not None else None)

    def baseline_model(self) -> nn.Module:
        if self._baseline is None:
            self._baseline, _ = self._materialize(())
        return self._baseline

    def _materialize(self, steps: tuple[Step, ...]) -> tuple[nn.Module, Path]:
        """The model a chain prefix produces: loaded from its artifact if saved, else built and saved."""
        art = self._artifact_dir(steps)
        if (art / "meta.json").exists() and (art / "model.safetensors").exists():
            try:
                verify_artifact(art)
            except ArtifactChanged as exc:
                aside = self._set_aside(art)
                self.log(f"  {exc.file} of artifact {art.name} changed since it was written: rebuilding it from "
                         f"its chain (the changed copy is kept as {aside.name})")
            else:
                if upgrade_artifact(art):
                    self.log(f"  rewrote {art.name}/model.safetensors in the standard safetensors layout (same "
                             "tensors, one entry each)")
                return load_artifact(art, verify=False), art
        t0 = time.perf_counter()
        if not steps:
            model, parent_meta = self._build_baseline(art)
            step_meta: list[dict[str, Any]] = []
        else:
            parent, parent_art = self._materialize(steps[:-1])
            parent_meta = read_meta(parent_art)
            step = steps[-1]
            method = get_method(step.method)
            torch.manual_seed(self.recipe.seed)
            self.log(f"  step {len(steps)}: {step.method}")
            ctx = self._context(art / "work", step.method)
            out = method.apply(parent, step.config, ctx)
            model = out.model
            step_meta = [{"method": step.method, "config": to_dict(step.config), "meta": out.meta}]
            if ctx.warnings:
                step_meta[0]["warnings"] = list(ctx.warnings)
                for text in ctx.warnings:
                    self.log(f"  warning: {step.method}: {text}")
        model = model.eval()
        example = self._example()
        _check_finite(model, example, f"step {len(steps)} ({steps[-1].method})" if steps else "the baseline")
        # Quantization keeps the MAC count, and the counter sees some quantized parts and not others:
        # after a step that produced integer weights, keep the float model's count.
        quantized = bool(steps) and get_method(steps[-1].method).produces_int_weights
        macs = None if quantized or uses_integer_kernels(model) else count_macs(model, example)
        meta = {
            "model": parent_meta["model"],
            # What every model of the chain takes in and predicts: carried to each artifact and export.
            **{k: parent_meta[k] for k in ("preprocess", "classes") if k in parent_meta},
            "steps": list(parent_meta["steps"]) + step_meta,
            "seconds": float(parent_meta.get("seconds") or 0.0) + (time.perf_counter() - t0),
            "step_seconds": time.perf_counter() - t0,
            # Quantization keeps the MAC count; the counter cannot see quantized modules.
            "macs": macs if macs is not None else parent_meta.get("macs"),
        }
        if dist.is_main():
            save_artifact(model, art, meta, small_tensors=small_tensor_storage(steps))
            if not self.keep_train_state:  # the saved model is what they would resume; they are most of the bytes
                for state in (art / "work").rglob(CKPT_FILE):
                    state.unlink()
        dist.barrier()
        return load_artifact(art), art

    def _build_baseline(self, art: Path) -> tuple[nn.Module, dict[str, Any]]:
        """The recipe's baseline: the user's model loaded (and its head fitted to the data's classes), then
        trained where the recipe says so; and the meta that describes it."""
        b, spec = self.recipe.baseline, self.spec
        torch.manual_seed(self.recipe.seed)
        preprocess = self.preprocess  # before the model: a bad input recipe fails first, and fast
        loaded = load_model(spec.name, num_classes=spec.num_classes, img_size=spec.img_size, in_chans=spec.in_chans,
                            pretrained=spec.pretrained, checkpoint=spec.checkpoint, kwargs=spec.kwargs,
                            dataset_classes=self.source.classes)
        for note in loaded.notes:
            self.log(f"baseline: {note}")
        train = b.train
        if loaded.head_reset and train.epochs == 0:
            raise VitcompressError(f"baseline.train.epochs is 0 (evaluate {spec.name} as it is), but its head was "
                                   "re-initialised for this data's classes; train it (epochs > 0) or pass a model "
                                   f"fine-tuned on these {spec.num_classes} classes")
        model = loaded.model
        if train.epochs > 0:
            self.log(f"training baseline {spec.name} for {train.epochs} epochs")
            from ..train import fit

            model = fit(model, self.train_ds, train, work_dir=art / "work" / "train", img_size=spec.img_size,
                        in_chans=spec.in_chans, seed=self.recipe.seed, desc="baseline", progress=self.progress,
                        train_log=self._train_log("baseline") if self.tracking is not None else None).model
        meta = {"model": loaded.spec.to_dict() | {"checkpoint": None, "pretrained": False},
                "preprocess": preprocess.to_dict(), "classes": list(self.source.classes),
                "steps": [], "seconds": 0.0, "macs": None}
        return model, meta

    # ---- rows -------------------------------------------------------------------------------
    def _measure(self, exp: Experiment, model: nn.Module, art: Path, seconds: float) -> dict[str, Any]:
        """Accuracy and speed of ``model`` in each runtime the recipe asks for; the fastest one makes the row."""
        from ..measure.runtimes import as_module, deploy, resolve

        m = self.recipe.measure
        threads = m.resolved_threads()
        meta = read_meta(art)
        t0 = time.perf_counter()
        example = self._example()
        with torch.inference_mode():
            reference = model(example)
        per_runtime: dict[str, dict[str, Any]] = {}
        for name in resolve(m.runtimes, model):
            try:
                dep = deploy(name, model, example, threads, art / "deploy")
                fn = as_module(dep)
                with torch.inference_mode():
                    out = fn(example)
                acc = evaluate_accuracy(fn, self.test_ds, img_size=self.spec.img_size, in_chans=self.spec.in_chans,
                                        batch_size=m.eval_batch_size, progress=self.progress,
                                        desc=f"eval {exp.name} [{dep.runtime}]")
                speed = cpu_speed(fn, example, m)
            except Exception as exc:  # this runtime cannot run this model: say so in the row, go on
                per_runtime[name] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
                continue
            per_runtime[dep.runtime] = {
                **acc, **speed, "int_arithmetic": dep.int_arithmetic, "float_parts": dep.float_parts,
                # How closely this runtime follows the PyTorch model on the timing batch.
                "max_abs_logit_err": float((out - reference).abs().max()),
                "top1_agreement": float((out.argmax(-1) == reference.argmax(-1)).float().mean()),
                **dep.info,
            }
        if all("error" in v for v in per_runtime.values()):
            raise RuntimeError(f"no runtime could run this model: {json.dumps(per_runtime)[:300]}")
        primary, best = primary_runtime(per_runtime)
        gpu = gpu_speed(model, example, m)
        return {
            "name": exp.name, "method": exp.method, "steps": [s.to_dict() for s in exp.steps],
            "dataset": self.recipe.data.name, "model": _final_model_name(meta, self.spec.name),
            "baseline": not exp.steps, "status": "ok", "error": None,
            "top1": best["top1"], "top5": best["top5"], "n_test": best["n_test"],
            "size_bytes": size_on_disk(art), "params": count_params(model), "macs": meta.get("macs"),
            "cpu_img_s": best["cpu_img_s"], "cpu_img_s_b1": best["cpu_img_s_b1"],
            "latency_ms_p50": best["latency_ms_p50"], "latency_ms_p95": best["latency_ms_p95"],
            "batch_size": m.batch_size, "threads": threads,
            "gpu_img_s": gpu, "runtime": primary, "int_arithmetic": best["int_arithmetic"],
            "float_parts": best["float_parts"], "runtimes": per_runtime,
            # Bits per stored weight where a quantization step says so (LSQ, DiffQ's learned bits).
            "avg_bits": next((st["meta"]["avg_bits"] for st in reversed(meta.get("steps", []))
                              if "avg_bits" in (st.get("meta") or {})), None),
            "seconds": seconds, "measure_seconds": time.perf_counter() - t0,
            "artifact": str((art / "model.safetensors").relative_to(self.run_dir)),
            "env": environment(threads),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_key": self.run_key,
            **self._warnings(best["n_test"], meta),
        }

    def _warnings(self, n_test: int, meta: dict[str, Any]) -> dict[str, Any]:
        """The row's warnings: an accuracy resting on few test images, and what its steps warned about."""
        row: dict[str, Any] = {}
        minimum = self.recipe.measure.min_test_images
        if n_test < minimum:
            from ..report.table import accuracy_se

            se = accuracy_se(50.0, n_test)
            add_warning(row, f"its accuracy rests on {n_test} test images, fewer than measure.min_test_images "
                             f"({minimum}): one standard error is up to ±{se:.1f} points")
        for step in meta.get("steps", []):
            for text in step.get("warnings") or ():
                add_warning(row, f"{step['method']}: {text}")
        return row

    def _failed_row(self, exp: Experiment, message: str, seconds: float) -> dict[str, Any]:
        return {"name": exp.name, "method": exp.method, "steps": [s.to_dict() for s in exp.steps],
                "dataset": self.recipe.data.name, "model": self.spec.name, "baseline": not exp.steps,
                "status": "failed", "error": message, "seconds": seconds,
                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run_key": self.run_key}

    def _check_run_dir(self) -> None:
        """One run folder, one study: the recipe's baseline, dataset and seed (before the data is read)."""
        key = self.recipe.baseline_key()
        info = read_run_info(self.run_dir)
        if info.get("baseline_key") not in (None, key):
            raise VitcompressError(
                f"{self.run_dir} holds a study with another dataset, baseline or seed "
                f"(recipe '{info.get('recipe')}'); pass --out NEW_DIR or delete the folder"
            )
        self._write_run_info(info | {"recipe": self.recipe.name, "source": self.recipe.source, "baseline_key": key,
                                     "command": " ".join(["vitcompress", *sys.argv[1:]])})

    def _check_data(self) -> None:
        """...and the data actually read: its fingerprint (class names, split sizes, content or file index, the
        test subset) joins the run key, which every row carries. Rows measured on other data are refused."""
        info = read_run_info(self.run_dir)
        data_key = f"{self.source.fingerprint(self.data_splits)}-{self.recipe.measure.test_subset or 'all'}"
        if info.get("data_key") not in (None, data_key):
            held = info.get("data") or "a different dataset"
            raise VitcompressError(
                f"{self.run_dir} holds rows measured on other data than this run reads ({held}: other files, class "
                "names, split sizes or test subset); pass --out NEW_DIR")
        self.run_key = f"{self.recipe.baseline_key()}-{data_key}"
        other = next((r for r in load_rows(self.results_path) if r.get("run_key") not in (None, self.run_key)), None)
        if other is not None:
            raise VitcompressError(f"{self.results_path} holds row '{other.get('name')}' of another run (run key "
                                   f"{other.get('run_key')}, this one {self.run_key}); pass --out NEW_DIR")
        if info.get("data_key") is None and self.results_path.exists():
            self.log(f"run.json had no data fingerprint (written by an earlier version): recording {data_key}")
        self._write_run_info(info | {"data_key": data_key, "run_key": self.run_key} | self._data_meta())

    def _repair_results(self) -> None:
        """Lines of the results file that are not rows go to ``<file>.bad`` (kept); their experiments run again."""
        problems = repair_results(self.results_path)
        if problems:
            number, why = problems[0]
            self.log(f"set aside {len(problems)} damaged line(s) of {self.results_path.name} in "
                     f"{self.results_path.name}.bad (line {number}: {why}); their experiments run again")

    def _write_run_info(self, info: dict[str, Any]) -> None:
        path = self.run_dir / RUN_INFO
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, path)

    def _data_meta(self) -> dict[str, Any]:
        """Where the images came from and how they became inputs, for run.json and the report."""
        return {"data": self.source.describe(), "classes": len(self.source.classes),
                "inputs": self.preprocess.describe()}

    def run_experiment(self, exp: Experiment) -> dict[str, Any]:
        """Build (or load) ``exp``'s model and measure it; a failure becomes a 'failed' row.

        A failed baseline raises instead: nothing else can run without it.
        """
        t0 = time.perf_counter()
        self._building = exp.name
        missing = next((m for m in (get_method(s.method).missing_package() for s in exp.steps) if m), None)
        if missing is not None:  # an opt-in package: the row says how to get it, and nothing failed
            return self._failed_row(exp, missing, 0.0) | {"status": "skipped"}
        try:
            model, art = self._materialize(exp.steps)
            if not dist.is_main():
                return {}  # under accelerate launch only the main process measures and writes
            meta = read_meta(art)
            seconds = meta["seconds"]
            if exp.steps:  # the baseline's training is shared: count this chain's own steps only
                seconds -= read_meta(self._artifact_dir(()))["seconds"]
            row = self._measure(exp, model, art, seconds)
            bad = _non_finite(row)
            if bad:
                raise VitcompressError(f"the measurement gave non-finite numbers ({', '.join(bad[:5])})")
            return row
        except Exception as exc:
            raise_if_storage(exc, self.run_dir)  # the disk, not the method: no failed row, the next run retries
            if self.debug or not exp.steps or not isinstance(exc, (VitcompressError, RuntimeError, ValueError)):
                raise
            msg = " ".join(str(exc).split())[:300]
            if not isinstance(exc, VitcompressError):
                msg = f"{type(exc).__name__}: {msg}"
                self.log(traceback.format_exc(limit=3))
            return self._failed_row(exp, msg, time.perf_counter() - t0)

    def _record(self, row: dict[str, Any]) -> None:
        if not dist.is_main():
            return
        if row.get("run_key") is None:  # a row measured by a Ray worker, whose Study did not check the folder
            row["run_key"] = self.run_key
        try:
            append_row(self.results_path, row)
        except OSError as exc:
            raise_if_storage(exc, self.results_path)
            raise
        status = (f"top1 {row['top1']:.2f}%  size {row['size_bytes'] / 1e6:.2f} MB  "
                  f"cpu {row['cpu_img_s']:.1f} img/s" if row["status"] == "ok" else
                  f"{'skipped' if row['status'] == 'skipped' else 'FAILED'}: {row['error']}")
        self.log(f"  {row['name']}: {status}")

    def _set_aside(self, art: Path) -> Path:
        """Move a changed artifact out of the way (kept, never deleted) so its chain can be built again."""
        aside = art.with_name(f"{art.name}.changed-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}")
        if dist.is_main():
            os.replace(art, aside)
        dist.barrier()
        return aside

    def _artifact_intact(self, row: dict[str, Any]) -> str | None:
        """Why a finished row's artifact cannot stand for it any more (missing, changed), or None."""
        try:
            verify_artifact(self.run_dir / Path(row["artifact"]).parent)
        except VitcompressError as exc:
            return str(exc)
        return None

    def pending(self) -> list[Experiment]:
        """Experiments without an ok row for their current steps, baseline first. A finished row whose
        artifact is missing or changed since it was written is run again (its artifact rebuilt from the
        chain), so the speed pass and later steps never read a model other than the one measured."""
        done = {r["name"]: r for r in load_rows(self.results_path) if r.get("status") == "ok"}
        out = []
        for exp in (Experiment(self.recipe.baseline.name, ()), *self.recipe.experiments):
            prev = done.get(exp.name)
            if prev is not None and _step_keys(prev.get("steps")) == [s.key_dict() for s in exp.steps]:
                problem = self._artifact_intact(prev)
                if problem is None:
                    self.log(f"✓ {exp.name}: already measured, skipped")
                    continue
                self.log(f"↻ {exp.name}: measured before, but {problem.split(';')[0]}: building and measuring it "
                         "again")
            out.append(exp)
        return out

    def run(self, executor: str = "local", address: str | None = None) -> StudyResult:
        from ..train import resolve_mixed_precision

        dist.init_if_launched(resolve_mixed_precision(self.recipe.baseline.train.mixed_precision))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.run_dir, enabled=dist.is_main()):
            if dist.is_main():
                self._check_run_dir()
                self._repair_results()
            _ = self.train_ds, self.test_ds  # a missing dataset fails here, before any work
            if dist.is_main():
                self._check_data()
                self.log(f"inputs: {self.preprocess.describe()}")
                self._start_tracking()
            try:
                return self._run_experiments(executor, address)
            finally:
                if self.tracking is not None:
                    self.tracking.finish()
                    self.tracking = None

    def _run_experiments(self, executor: str, address: str | None) -> StudyResult:
        todo = self.pending()
        progress = _Progress(len(todo), self.log)
        # The baseline runs here in every executor: each chain starts from its saved model.
        if todo and not todo[0].steps:
            progress.start(todo[0].name, baseline=True)
            self._record(self.run_experiment(todo.pop(0)))
        if executor == "ray" and todo:
            from .executors import run_on_ray

            run_on_ray(self, todo, address, self._record)
        else:
            for exp in todo:
                progress.start(exp.name)
                self._record(self.run_experiment(exp))
        dist.barrier()
        rows = load_rows(self.results_path)
        if not dist.is_main():
            return StudyResult(self.run_dir, rows, {})
        wanted = {self.recipe.baseline.name, *(e.name for e in self.recipe.experiments)}
        every, rows = rows, [r for r in rows if r.get("name") in wanted]
        if _set_notes(rows, {e.name: e.note for e in self.recipe.experiments if e.note}):
            write_rows(self.results_path, every)  # the recipe's notes, also for rows finished before
        if self.recipe.measure.interleave and needs_retime(rows):
            # Updates the dicts of `rows` in place (they are also in `every`); then every row goes back.
            retime_rows(rows, self.run_dir, self._example(), self.recipe.measure, log=self.log)
            write_rows(self.results_path, every)
        if self.tracking is not None:  # the final numbers, after the speed pass
            from ..report.table import reference_row, speed_reference

            speed_ref = speed_reference(reference_row(rows))
            for row in rows:
                self.tracking.log_row(row, speed_ref)
        meta = {"recipe": self.recipe.name, "command": " ".join(["vitcompress", *sys.argv[1:]]) or None,
                "dataset": self.recipe.data.name, **self._data_meta()}
        report = render_run(self.run_dir, rows, meta)
        return StudyResult(self.run_dir, rows, report)

    def _start_tracking(self) -> None:
        """Start the recipe's trackers, the recipe as their parameters; nothing is imported when there are none."""
        names = self.recipe.tracking.names()
        if not names:
            return
        from ..track import Tracking

        params = {"recipe": self.recipe.name, "seed": self.recipe.seed, "data": to_dict(self.recipe.data),
                  "baseline": to_dict(self.recipe.baseline), "measure": to_dict(self.recipe.measure),
                  "experiments": {e.name: [s.to_dict() for s in e.steps] for e in self.recipe.experiments},
                  "run_key": self.run_key}
        self.tracking = Tracking(names, self.run_dir, f"{self.recipe.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}",
                                 self.recipe.tracking.project or self.recipe.name, params)
        self.log(f"tracking: {', '.join(names)} (in {self.run_dir / 'tracking'} unless configured otherwise)")


class _Progress:
    """The study's overall progress line: experiment k of n, time elapsed, and the time left at the pace of the
    experiments so far (the baseline's training left out: it is no guide to the rows after it)."""

    def __init__(self, total: int, log: Callable[[str], None]) -> None:
        self.total, self.log, self.done = total, log, 0
        self.t0 = time.perf_counter()
        self.rows_from: float | None = None  # when the first experiment after the baseline started
        self.rows_done = 0

    def start(self, name: str, baseline: bool = False) -> None:
        now = time.perf_counter()
        if not baseline:
            if self.rows_from is None:
                self.rows_from = now
            else:
                self.rows_done += 1  # the row before this one has finished
        left = ""
        if self.rows_done and self.rows_from is not None:
            pace = (now - self.rows_from) / self.rows_done
            left = f", ~{_clock(pace * (self.total - self.done))} left"
        self.done += 1
        self.log(f"▶ [{self.done}/{self.total}] {name}  ({_clock(now - self.t0)} elapsed{left})")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def _set_notes(rows: list[dict[str, Any]], notes: dict[str, str]) -> bool:
    """Give each row its recipe note (none where the recipe has none); whether any row changed."""
    changed = False
    for r in rows:
        want = notes.get(r.get("name", ""))
        if r.get("note") != want:
            if want is None:
                r.pop("note", None)
            else:
                r["note"] = want
            changed = True
    return changed


def render_run(run_dir: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The study's report of ``rows``: Pareto marks, ``report.md``, ``results.csv``, plots and Figure 3."""
    from ..report import write_report
    from ..search.pareto import mark_pareto

    report = write_report(run_dir, mark_pareto(rows), meta=meta)
    report["importance_plots"] = _importance_plots(run_dir, rows, report["report"])
    return report


def _importance_plots(run_dir: Path, rows: list[dict[str, Any]], report_path: Path) -> list[Path]:
    """The study's Figure 3 (parameters vs importance score) for every row that pruned by importance."""
    from ..methods.prune import plot_importance

    paths = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        slug = "".join(c if c.isalnum() else "_" for c in r["name"]).strip("_").lower()
        art = run_dir / Path(r["artifact"]).parent
        if not (art / META_FILE).is_file():
            # A run folder copied without its artifacts (docs/results/): keep the plots drawn before.
            paths += sorted((run_dir / "plots").glob(f"importance_{slug}_*.png"))
            continue
        for i, st in enumerate(read_meta(art).get("steps", [])):
            if "importance" in (st.get("meta") or {}):
                path = run_dir / "plots" / f"importance_{slug}_{i}.png"
                plot_importance(st["meta"], path)
                paths.append(path)
    if paths:
        lines = ["", "## Importance scores (the study's Figure 3)", ""]
        lines += [f"![{p.stem}]({p.relative_to(run_dir).as_posix()})" for p in paths]
        with open(report_path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return paths


def run_study(recipe: Recipe, out_dir: str | os.PathLike | None = None, *, executor: str = "local",
              address: str | None = None, **kwargs: Any) -> StudyResult:
    """Run (or resume) ``recipe`` into ``out_dir`` (default ``runs/<recipe name>``).

    ``executor="ray"`` sends the experiments after the baseline to a Ray cluster
    (``address``, or a local Ray instance when None).
    """
    run_dir = Path(out_dir) if out_dir is not None else Path("runs") / recipe.name
    return Study(recipe, run_dir, **kwargs).run(executor, address)
