"""What a method step may use: training data, a calibration slice, the teacher, the training loop.

The test split is deliberately absent: no method can look at it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import FileImages, ImageTensorDataset, make_loader
from ..train import LossFn, TrainConfig, TrainResult, fit

CALIB_MIN_STD = 1.0  # pixel standard deviation (0..255) under which a calibration slice is called degenerate


@dataclass
class StepContext:
    train_ds: ImageTensorDataset | FileImages  # prepared for the models' input (``train_ds.preprocess``)
    img_size: int
    in_chans: int
    num_classes: int
    seed: int
    work_dir: Path
    baseline_train: TrainConfig
    teacher: nn.Module | None = None
    calib_images: int = 256
    progress: bool = True
    name: str = "step"
    # What the step met that its row should say (a degenerate calibration set, ...); the study keeps them in
    # the artifact's meta and the row.
    warnings: list[str] = field(default_factory=list)
    # Experiment tracking: a training's name -> what it reports to (a vitcompress.track.TrainLog); None: off.
    train_log: Callable[[str], Any] | None = None

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def calib_dataset(self, n: int | None = None) -> ImageTensorDataset | FileImages:
        """A fixed, seeded slice of the training split for calibration or importance scores.

        Images with next to no variation (all one grey, say) calibrate scales that fit no real input: such a
        slice is used, but the step warns.
        """
        n = min(n or self.calib_images, len(self.train_ds))
        g = torch.Generator().manual_seed(self.seed + 1)
        ds = self.train_ds.subset(torch.randperm(len(self.train_ds), generator=g)[:n])
        if isinstance(ds, ImageTensorDataset) and len(ds):
            spread = float(ds.images.float().std())
            if spread < CALIB_MIN_STD:
                self.warn(f"its {len(ds)} calibration images have near-zero variance (pixel std {spread:.2f} of "
                          "255): scales or importances computed on them may not fit real inputs")
        return ds

    def calib_loader(self, n: int | None = None, batch_size: int = 64) -> Any:
        return make_loader(self.calib_dataset(n), batch_size, train=False, img_size=self.img_size,
                           in_chans=self.in_chans)

    def fit(self, model: nn.Module, cfg: TrainConfig | None = None, *, loss_fn: LossFn | None = None,
            desc: str | None = None, extra_modules: tuple[nn.Module, ...] = (), **overrides: Any) -> TrainResult:
        """Train through the shared loop; checkpoints go to this step's work folder so a kill resumes."""
        cfg = cfg or self.baseline_train
        if overrides:
            cfg = replace(cfg, **overrides)
        return fit(model, self.train_ds, cfg, work_dir=self.work_dir / "train", img_size=self.img_size,
                   in_chans=self.in_chans, seed=self.seed, loss_fn=loss_fn, desc=desc or self.name,
                   progress=self.progress, extra_modules=extra_modules,
                   train_log=self.train_log(self.name) if self.train_log is not None else None)
