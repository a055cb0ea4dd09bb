"""Experiment tracking through accelerate's trackers: TensorBoard, MLflow, Weights & Biases.

A study with tracking on logs, to each tracker it names: the recipe as parameters; every training
step's loss and learning rate and every epoch's validation accuracy, per training (the baseline, and
each step that trains: a fine-tune, a student, QAT) under ``train/<name>/...`` and ``val/<name>/top1``;
and every finished row's metrics under ``row/<row name>/...`` (top-1, size, speeds, speed-up).
Offline by default: TensorBoard and MLflow write into the run folder (``tracking/tensorboard``,
``tracking/mlflow.db``, MLflow's SQLite store; an ``MLFLOW_TRACKING_URI`` set by the user wins), Weights & Biases runs in its
offline mode unless ``WANDB_MODE`` says otherwise. With tracking off, nothing here is imported by the
study and no tracker library is loaded.

The validation accuracy is measured on the first ``val_images`` images of the split the rows are
measured on (a search's carved-out validation split): a curve to watch, which no decision reads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from .config import check
from .errors import VitcompressError

__all__ = ["TRACKERS", "TrackingConfig", "TrainLog", "Tracking"]

TRACKERS = ("tensorboard", "mlflow", "wandb")
_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")


@dataclass(frozen=True)
class TrackingConfig:
    """A recipe's ``tracking:`` section (and ``vitcompress study --log-with``)."""

    log_with: list[Literal["tensorboard", "mlflow", "wandb", "all"]] = field(default_factory=list)
    val_images: int = 1000  # test-split images the per-epoch validation accuracy is measured on (0: none)
    project: str | None = None  # the MLflow experiment / W&B project (None: the recipe's name)

    def __post_init__(self) -> None:
        check(0 <= self.val_images <= 1_000_000, "tracking.val_images must be in [0, 1000000]")

    def names(self) -> list[str]:
        return list(TRACKERS) if "all" in self.log_with else list(dict.fromkeys(self.log_with))


def metric_name(*parts: str) -> str:
    """A metric key every tracker takes: MLflow allows letters, digits, ``_-. /`` only."""
    return "/".join(_NAME.sub("_", " ".join(str(p).split())) for p in parts)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe as flat ``a/b`` parameters of scalars (lists and the rest as JSON, at most 500 chars)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{metric_name(str(key))}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "/"))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value if not isinstance(value, str) else value[:500]
        else:
            out[name] = json.dumps(value, default=str)[:500]
    return out


class Tracking:
    """The trackers a study logs to (none: every call does nothing)."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, project: str,
                 params: Mapping[str, Any]) -> None:
        self.trackers: list[Any] = []
        self.run_dir = run_dir
        for name in names:
            self.trackers.append(self._start(name, run_dir / "tracking", run_name, project))
        flat = flatten(params)
        for tracker in self.trackers:
            values = flat if tracker.name != "tensorboard" else {k: ("" if v is None else v) for k, v in flat.items()}
            tracker.store_init_configuration(values)

    @staticmethod
    def _start(name: str, where: Path, run_name: str, project: str) -> Any:
        from accelerate import tracking

        try:
            if name == "tensorboard":
                tracker = tracking.TensorBoardTracker(run_name, str(where / "tensorboard"))
            elif name == "mlflow":
                import mlflow

                if not os.environ.get("MLFLOW_TRACKING_URI"):  # MLflow's local store: SQLite (its file store is
                    where.mkdir(parents=True, exist_ok=True)      # frozen and refused by default since 3.x)
                    mlflow.set_tracking_uri(f"sqlite:///{(where / 'mlflow.db').resolve()}")
                tracker = tracking.MLflowTracker(experiment_name=project, run_name=run_name)
            elif name == "wandb":
                import wandb  # noqa: F401 - a clear error here, before the tracker's own import

                tracker = tracking.WandBTracker(run_name, project=project, dir=str(where),
                                                mode=os.environ.get("WANDB_MODE", "offline"))
            else:
                raise VitcompressError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)} or all")
        except ImportError as exc:
            extra = "wandb" if name == "wandb" else "tracking"
            raise VitcompressError(f"--log-with {name} needs {exc.name or name}: pip install "
                                   f"'vitcompress[{extra}]'") from None
        tracker.start()
        return tracker

    def log(self, values: Mapping[str, float], step: int | None = None) -> None:
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_row(self, row: Mapping[str, Any], speed_ref: Any) -> None:
        """A finished row's metrics, under ``row/<its name>/``; its CPU speed-up over ``speed_ref`` (the report's
        ``speed_reference`` of the baseline) by the report's own rule."""
        from .report.table import cpu_speedup, same_round_reference

        if row.get("status") != "ok":
            return
        speedup = cpu_speedup(row, same_round_reference(row, speed_ref))
        values = {"top1": row.get("top1"), "size_mb": (row.get("size_bytes") or 0) / 1e6,
                  "cpu_img_s": row.get("cpu_img_s"), "cpu_img_s_b1": row.get("cpu_img_s_b1"),
                  "gpu_img_s": row.get("gpu_img_s"), "cpu_speedup": speedup, "params": row.get("params")}
        self.log({metric_name("row", row["name"], k): v for k, v in values.items() if v is not None})

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


@dataclass
class TrainLog:
    """What one training reports to the trackers: each step's loss and learning rate, each epoch's
    validation accuracy (``validate`` measures it on the model; None: not measured)."""

    tracking: Tracking
    name: str
    validate: Callable[[nn.Module], float] | None = None

    def step(self, step: int, loss: float, lr: float) -> None:
        self.tracking.log({metric_name("train", self.name, "loss"): loss, metric_name("train", self.name, "lr"): lr},
                          step=step)

    def epoch(self, epoch: int, model: nn.Module, loss: float) -> None:
        values = {metric_name("train", self.name, "epoch_loss"): loss}
        if self.validate is not None:
            values[metric_name("val", self.name, "top1")] = self.validate(model)
        self.tracking.log(values, step=epoch)
