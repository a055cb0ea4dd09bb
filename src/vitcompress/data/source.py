"""Where a study's images come from: a bundled dataset, an image folder, or a Hugging Face dataset.

``open_source(DataConfig)`` gives a `DataSource`: its class names and native channels
(known before any model is built, since the model's head and stem depend on them),
and ``split("train" | "test", preprocess)``, the split prepared for one model's input.
"train" is what methods may learn from; "test" is what rows are measured on (an image
folder's ``val/`` or ``test/``, a Hugging Face dataset's validation or test split, or a
seeded ``val_split`` fraction carved out of train when there is none).

Image folders and Hugging Face datasets are decoded at the model's input size. A split
is held in memory when its decoded bytes (images x channels x size x size) fit
``memory_budget_mb`` (the test split first: it is read by every row and every runtime,
then train with what is left); otherwise it is streamed: decoded every epoch by worker
processes, in memory that does not grow with the dataset. The log says which.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import LATE, check
from ..errors import VitcompressError
from .cifar import load_cifar
from .dataset import DATASETS, DatasetInfo, ImageTensorDataset, dataset_info
from .fashion_mnist import load_fashion_mnist
from .files import FileImages, FolderReader, HFReader, check_headers, iter_decoded, scan_folder, to_memory
from .preprocess import Preprocess

__all__ = ["DATA_NAMES", "DataConfig", "DataSource", "data_config_from_arg", "load_split", "open_source"]

FILE_SOURCES = ("imagefolder", "hf")
DATA_NAMES: tuple[str, ...] = (*DATASETS, *FILE_SOURCES)
VAL_FOLDERS = ("val", "validation", "test")
HF_TEST_SPLITS = ("validation", "val", "test")
STATS_IMAGES = 2000  # training images whose pixels give a from-scratch model's mean and std


@dataclass(frozen=True)
class DataConfig:
    """A recipe's ``data:`` section (and ``vitcompress study --data``)."""

    name: str = "fashion-mnist"  # fashion-mnist | cifar10 | cifar100 | imagefolder | hf
    # bundled: the folder with their files; imagefolder: DIR with DIR/train/<class>/*, DIR/val/<class>/*;
    # hf: a folder saved with save_to_disk, a folder of images (the imagefolder builder) or a hub name.
    root: str | None = None
    download: bool = False
    calib_images: int = 256  # training images methods may use for calibration or importance scores
    # The fraction of train held out as the test split when the data has none (seeded by split_seed).
    val_split: float | None = field(default=None, metadata=LATE)
    split_seed: int = field(default=0, metadata=LATE)
    # hf: columns (None: the first Image feature, the first ClassLabel feature), splits, load_dataset's config.
    image_column: str | None = field(default=None, metadata=LATE)
    label_column: str | None = field(default=None, metadata=LATE)
    train_split: str = field(default="train", metadata=LATE)
    test_split: str | None = field(default=None, metadata=LATE)  # None: validation, val or test
    hf_config: str | None = field(default=None, metadata=LATE)
    # An image that does not decode: an error naming it (false), or skipped and counted (true).
    skip_bad_images: bool = field(default=False, metadata=LATE)
    # Decoded images held in memory at most (MB, both splits); a split that does not fit is streamed.
    memory_budget_mb: float = field(default=2048.0, metadata=LATE)
    workers: int | None = field(default=None, metadata=LATE)  # decoding processes (None: the cores, at most 8)

    def __post_init__(self) -> None:
        check(self.name in DATA_NAMES, f"unknown dataset '{self.name}'; known: {', '.join(DATA_NAMES)}")
        check(1 <= self.calib_images <= 10_000_000, "calib_images must be in [1, 10000000]")
        check(self.name not in FILE_SOURCES or bool(self.root),
              f"data.root is required for {self.name}: "
              + ("the folder holding train/<class>/ and val/<class>/" if self.name == "imagefolder"
                 else "a folder saved with save_to_disk, a folder of images or a hub dataset name"))
        check(self.val_split is None or 0 < self.val_split < 1, f"val_split must be in (0, 1), got {self.val_split}")
        check(self.split_seed >= 0, "split_seed must be >= 0")
        check(0 <= self.memory_budget_mb <= 1e8, f"memory_budget_mb must be in [0, 1e8], got {self.memory_budget_mb}")
        check(self.workers is None or 0 <= self.workers <= 64, "workers must be in [0, 64] or null")
        hf_only = [k for k in ("image_column", "label_column", "test_split", "hf_config")
                   if getattr(self, k) is not None] + (["train_split"] if self.train_split != "train" else [])
        check(self.name == "hf" or not hf_only, f"data.{hf_only[0] if hf_only else ''} applies to name: hf only")
        check(self.name in FILE_SOURCES or self.val_split is None,
              f"{self.name} has its own test split; drop val_split")


def load_split(
    name: str, split: str, root: str | os.PathLike | None = None, download: bool = False
) -> ImageTensorDataset:
    """Load split ``split`` ("train" or "test") of bundled dataset ``name`` into memory.

    ``root`` is where to look first (and where ``download=True`` puts the files);
    without it Fashion-MNIST comes from the Debian package location and CIFAR
    from the download cache (`default_data_root`). Anything missing or corrupt
    raises `VitcompressError` with a message saying how to get the data.
    """
    info = dataset_info(name)
    if info.name == "fashion-mnist":
        return load_fashion_mnist(split, root, download)
    return load_cifar(info.name, split, root, download)


class DataSource:
    """One dataset: what the model needs to know before it is built, and its splits for a model's input."""

    name: str
    classes: tuple[str, ...]
    channels: int  # the images' own channels (1 or 3)
    native_size: int | None  # their size, where all have one

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def statistics(self, preprocess: Preprocess) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the training images (at the channels ``preprocess`` decodes to)."""
        raise NotImplementedError

    def split(self, split: str, preprocess: Preprocess, *, progress: bool = False) -> ImageTensorDataset | FileImages:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def fingerprint(self, splits: tuple[str, ...] = ("train", "test")) -> str:
        """A short hash of the data a run reads: class names, and the ``splits``' sizes and content (bundled
        arrays) or index (files: which file or row, with which label). Two runs that share a folder must
        share this."""
        raise NotImplementedError


def _digest(parts: list[Any]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class BundledSource(DataSource):
    """Fashion-MNIST, CIFAR-10 or CIFAR-100: small arrays, always in memory, scaled whole to the model's size."""

    def __init__(self, cfg: DataConfig, root: str | None, download: bool) -> None:
        self.cfg, self.root, self.download = cfg, root, download
        info = DATASETS[cfg.name]
        self.name, self.classes, self.channels, self.native_size = info.name, info.classes, info.in_chans, info.img_size

    def _load(self, split: str) -> ImageTensorDataset:
        return load_split(self.cfg.name, split, self.root, self.download)

    def statistics(self, preprocess: Preprocess) -> tuple[tuple[float, ...], tuple[float, ...]]:
        info = DATASETS[self.cfg.name]
        assert info.mean is not None and info.std is not None
        return info.mean, info.std

    def split(self, split: str, preprocess: Preprocess, *, progress: bool = False) -> ImageTensorDataset:
        ds = self._load(split)
        if ds.info.classes != self.classes:  # CIFAR's class names come from its meta file
            self.classes = ds.info.classes
        return ds.with_preprocess(preprocess)

    def describe(self) -> str:
        return self.name

    def fingerprint(self, splits: tuple[str, ...] = ("train", "test")) -> str:
        parts: list[Any] = [self.name, list(self.classes)]
        for split in splits:
            ds = self._load(split)
            parts += [split, len(ds), ds.images.numpy().tobytes(), ds.labels.numpy().tobytes()]
        return _digest(parts)


class FileSource(DataSource):
    """Images read from files or table rows, decoded at the model's input size; in memory or streamed."""

    def __init__(self, cfg: DataConfig, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.log = log
        self.channels, self.native_size = 3, None
        self.workers = cfg.workers if cfg.workers is not None else min(8, len(os.sched_getaffinity(0)))
        self._plan: dict[str, str] = {}
        self._memory: dict[tuple[str, Preprocess], ImageTensorDataset] = {}
        self._checked = False
        # Filled by the subclass: a reader per split, the indices into it and their labels.
        self.readers: dict[str, Any] = {}
        self.index: dict[str, np.ndarray] = {}
        self.labels: dict[str, np.ndarray] = {}

    def _carve(self, what: str) -> None:
        """Hold out ``val_split`` of train (seeded) as the test split; an error when it is not set."""
        if self.cfg.val_split is None:
            raise VitcompressError(f"{what} has no validation split; add one ({self._val_hint()}) or set "
                                   "data.val_split: 0.1 to hold out a tenth of train")
        n = len(self.index["train"])
        n_val = max(1, int(round(self.cfg.val_split * n)))
        if n_val >= n:
            raise VitcompressError(f"val_split {self.cfg.val_split} of {n} training images leaves none to train on")
        g = torch.Generator().manual_seed(self.cfg.split_seed)
        perm = torch.randperm(n, generator=g).numpy()
        val, fit = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        self.readers["test"] = self.readers["train"]
        self.index["test"], self.labels["test"] = self.index["train"][val], self.labels["train"][val]
        self.index["train"], self.labels["train"] = self.index["train"][fit], self.labels["train"][fit]
        self.carved = True

    def _val_hint(self) -> str:
        return "a val/ folder"

    def fingerprint(self, splits: tuple[str, ...] = ("train", "test")) -> str:
        parts: list[Any] = [self.name, list(self.classes)]
        for split in splits:
            reader = self.readers[split]
            names = (reader.paths[self.index[split]].tobytes() if isinstance(reader, FolderReader)
                     else repr((getattr(reader.table, "_fingerprint", None), self.index[split].tobytes())).encode())
            parts += [split, len(self.index[split]), names, self.labels[split].tobytes()]
        return _digest(parts)

    def _info(self, preprocess: Preprocess) -> DatasetInfo:
        return DatasetInfo(self.name, self.num_classes, preprocess.in_chans, preprocess.input_size, None, None,
                           self.classes)

    def _streamed(self, split: str, preprocess: Preprocess) -> FileImages:
        index = self.index[split]
        return FileImages(self.readers[split], index, torch.from_numpy(self.labels[split]), self._info(preprocess),
                          split, self.describe(), preprocess, skip_bad=self.cfg.skip_bad_images,
                          workers=self.workers if len(index) >= 256 else 0)

    def statistics(self, preprocess: Preprocess) -> tuple[tuple[float, ...], tuple[float, ...]]:
        ds = self._streamed("train", preprocess)
        n = min(STATS_IMAGES, len(ds))
        g = torch.Generator().manual_seed(self.cfg.split_seed + 1)
        sample = ds.subset(torch.randperm(len(ds), generator=g)[:n].sort().values)
        total = torch.zeros(preprocess.in_chans, dtype=torch.float64)
        square = torch.zeros_like(total)
        pixels = 0
        batches = iter([list(range(i, min(i + 256, n))) for i in range(0, n, 256)])
        for x, _, _, _ in iter_decoded(sample, batches, sample.workers):
            if not len(x):
                continue
            v = x.double().div_(255).transpose(0, 1).reshape(preprocess.in_chans, -1)
            total += v.sum(1)
            square += (v * v).sum(1)
            pixels += v.shape[1]
        if pixels == 0:
            raise VitcompressError(f"no training image of {self.describe()} decodes; check the files")
        mean = total / pixels
        std = (square / pixels - mean * mean).clamp_min(1e-12).sqrt()
        self.log(f"data: mean {[round(float(m), 4) for m in mean]} std {[round(float(s), 4) for s in std]} "
                 f"from {n} training images (the from-scratch model's normalisation)")
        return tuple(float(m) for m in mean), tuple(max(float(s), 1e-3) for s in std)

    def plan(self, preprocess: Preprocess) -> dict[str, str]:
        """Which split is held in memory and which is streamed, by decoded bytes against the budget."""
        if not self._plan:
            per_image = preprocess.in_chans * preprocess.input_size ** 2
            budget = self.cfg.memory_budget_mb * 2**20
            left = budget
            sizes = {s: len(self.index[s]) * per_image for s in ("test", "train")}
            for s in ("test", "train"):  # the test split first: every row and runtime reads it
                self._plan[s] = "memory" if sizes[s] <= left else "stream"
                if self._plan[s] == "memory":
                    left -= sizes[s]
            parts = [f"{s} {len(self.index[s])} images {sizes[s] / 2**20:.0f} MB -> {self._plan[s]}"
                     for s in ("train", "test")]
            self.log(f"data: {self.describe()}: {self.num_classes} classes; decoded as uint8 "
                     f"{preprocess.in_chans}x{preprocess.input_size}x{preprocess.input_size}: {'; '.join(parts)} "
                     f"(memory budget {self.cfg.memory_budget_mb:g} MB, data.memory_budget_mb; streamed splits "
                     f"are decoded by {self.workers} worker process(es) every epoch)")
        return self._plan

    def split(self, split: str, preprocess: Preprocess, *, progress: bool = False) -> ImageTensorDataset | FileImages:
        if split not in ("train", "test"):
            raise VitcompressError(f"unknown split {split!r}; choose train or test")
        plan = self.plan(preprocess)
        if plan[split] == "stream":
            self._check_stream(split, progress)
            return self._streamed(split, preprocess)
        key = (split, preprocess)
        if key not in self._memory:
            self._memory[key] = to_memory(self._streamed(split, preprocess), progress=progress, log=self.log)
        return self._memory[key]

    def _check_stream(self, split: str, progress: bool) -> None:
        """Before a streamed split's first epoch, every file's header: a broken file stops the run now."""
        reader = self.readers[split]
        if not isinstance(reader, FolderReader) or getattr(reader, "_checked", False):
            return
        bad = check_headers(reader, progress=progress, desc=f"check {split} files")
        reader._checked = True  # type: ignore[attr-defined]
        if bad and not self.cfg.skip_bad_images:
            from .files import bad_image_error

            raise bad_image_error(bad[0][1] + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
        if bad:
            drop = {i for i, _ in bad}
            for s in ("train", "test"):
                if self.readers.get(s) is reader:
                    keep = np.array([int(i) not in drop for i in self.index[s]], dtype=bool)
                    self.index[s], self.labels[s] = self.index[s][keep], self.labels[s][keep]
            self.log(f"data: skipped {len(bad)} file(s) that are not readable images (data.skip_bad_images), "
                     f"e.g. {bad[0][1][:200]}")


class FolderSource(FileSource):
    """``root/train/<class>/...`` and ``root/val/<class>/...`` (or ``validation/``, ``test/``): torchvision's
    ``ImageFolder`` layout; classes are the train class folders in sorted order."""

    name = "imagefolder"

    def __init__(self, cfg: DataConfig, root: str, log: Callable[[str], None]) -> None:
        super().__init__(cfg, log)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise VitcompressError(f"image folder {self.root} does not exist or is not a folder; pass the folder "
                                   "holding train/<class>/ (and val/<class>/)")
        train_dir = self.root / "train"
        if not train_dir.is_dir():
            raise VitcompressError(f"{self.root} has no train/ folder; lay the images out as {self.root}/train/"
                                   f"<class>/*.png and {self.root}/val/<class>/*.png")
        classes, paths, labels, skipped, empty = scan_folder(train_dir)
        if not classes:
            raise VitcompressError(f"{train_dir} has no class folders; put each class's images in "
                                   f"{train_dir}/<class name>/")
        if not len(paths):
            raise VitcompressError(f"{train_dir} holds no image files ({len(skipped)} other files); "
                                   "Pillow-readable images (.png, .jpg, ...) go in train/<class>/")
        self.classes = classes
        self.readers["train"] = FolderReader(train_dir, paths)
        self.index["train"], self.labels["train"] = np.arange(len(paths)), labels
        val_dir = next((self.root / v for v in VAL_FOLDERS if (self.root / v).is_dir()), None)
        self.carved = False
        if val_dir is not None:
            _, vpaths, vlabels, vskipped, _ = scan_folder(val_dir, classes)
            if not len(vpaths):
                raise VitcompressError(f"{val_dir} holds no image files; put each class's images in "
                                       f"{val_dir}/<class name>/ or remove the folder and set data.val_split")
            self.readers["test"] = FolderReader(val_dir, vpaths)
            self.index["test"], self.labels["test"] = np.arange(len(vpaths)), vlabels
            skipped += [f"{val_dir.name}/{s}" for s in vskipped]
        else:
            self._carve(str(self.root))
        self.test_name = "val (carved from train)" if self.carved else val_dir.name  # type: ignore[union-attr]
        if skipped:
            shown = ", ".join(sorted({Path(s).name for s in skipped})[:4])
            self.log(f"data: skipped {len(skipped)} file(s) that are not images ({shown}{', ...' if len(skipped) > 4 else ''})")
        if empty:
            self.log(f"data: warning: class folder(s) with no training image: {', '.join(empty[:5])}; they keep "
                     "their label but nothing teaches them")

    def describe(self) -> str:
        return f"imagefolder {self.root} (test split: {self.test_name})"


class HFSource(FileSource):
    """A Hugging Face ``datasets`` dataset: ``load_from_disk`` for a saved folder, else ``load_dataset``."""

    name = "hf"

    def __init__(self, cfg: DataConfig, root: str, log: Callable[[str], None]) -> None:
        super().__init__(cfg, log)
        try:
            import datasets
        except ImportError:
            raise VitcompressError("data name 'hf' needs the datasets package: pip install 'vitcompress[hf]'") from None
        self.where = root
        path = Path(root).expanduser()
        saved = path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = (datasets.load_from_disk(str(path)) if saved
                        else datasets.load_dataset(str(path) if path.is_dir() else root, cfg.hf_config))
        except Exception as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise VitcompressError(f"cannot load Hugging Face dataset {root!r} ({type(exc).__name__}: {first}); "
                                   "pass a folder saved with save_to_disk, a folder of images, or (online) a hub "
                                   "dataset name") from None
        splits = dict(data) if isinstance(data, datasets.DatasetDict) else {"train": data}
        if cfg.train_split not in splits:
            raise VitcompressError(f"{root} has no split {cfg.train_split!r} (it has {', '.join(splits)}); set "
                                   "data.train_split")
        train = splits[cfg.train_split]
        test_name = cfg.test_split or next((s for s in HF_TEST_SPLITS if s in splits), None)
        if cfg.test_split is not None and cfg.test_split not in splits:
            raise VitcompressError(f"{root} has no split {cfg.test_split!r} (it has {', '.join(splits)}); set "
                                   "data.test_split")
        self.image_column = cfg.image_column or next(
            (k for k, f in train.features.items() if isinstance(f, datasets.Image)), None)
        if self.image_column is None or self.image_column not in train.features:
            raise VitcompressError(f"{root}: no image column{' ' + repr(cfg.image_column) if cfg.image_column else ''}"
                                   f" (columns: {', '.join(train.features)}); set data.image_column")
        self.label_column = cfg.label_column or next(
            (k for k, f in train.features.items() if isinstance(f, datasets.ClassLabel)),
            "label" if "label" in train.features else None)
        if self.label_column is None or self.label_column not in train.features:
            raise VitcompressError(f"{root}: no label column (columns: {', '.join(train.features)}); set "
                                   "data.label_column")
        feature = train.features[self.label_column]
        train_labels = _labels(train, self.label_column, root)
        if isinstance(feature, datasets.ClassLabel):
            self.classes = tuple(str(n) for n in feature.names)
        else:
            top = int(train_labels.max()) if len(train_labels) else -1
            self.classes = tuple(str(i) for i in range(top + 1))
        self.readers["train"] = HFReader(train, self.image_column, f"{root} {cfg.train_split}")
        self.index["train"], self.labels["train"] = np.arange(len(train)), train_labels
        self.carved = False
        if test_name is not None:
            test = splits[test_name]
            self.readers["test"] = HFReader(test, self.image_column, f"{root} {test_name}")
            self.index["test"], self.labels["test"] = np.arange(len(test)), _labels(test, self.label_column, root)
        else:
            self._carve(root)
        self.test_name = f"{test_name}" if test_name else "val (carved from train)"
        for s in ("train", "test"):
            bad = self.labels[s][(self.labels[s] < 0) | (self.labels[s] >= self.num_classes)]
            if len(bad):
                raise VitcompressError(f"{root} {s}: label {int(bad[0])} is outside 0..{self.num_classes - 1}; "
                                       "fix the label column or its ClassLabel names")

    def _val_hint(self) -> str:
        return "a validation or test split"

    def describe(self) -> str:
        return f"hf {self.where} (test split: {self.test_name})"


def _labels(table: Any, column: str, root: str) -> np.ndarray:
    try:
        labels = np.asarray(table.data.column(column).to_numpy(zero_copy_only=False))
    except Exception as exc:
        raise VitcompressError(f"{root}: cannot read label column {column!r} ({type(exc).__name__}); set "
                               "data.label_column to an integer class column") from None
    if labels.dtype.kind not in "iu":
        raise VitcompressError(f"{root}: label column {column!r} holds {labels.dtype} values, not class numbers; "
                               "set data.label_column to an integer or ClassLabel column")
    return labels.astype(np.int64)


def open_source(cfg: DataConfig, *, root: str | None = None, download: bool | None = None,
                log: Callable[[str], None] | None = None) -> DataSource:
    """The dataset ``cfg`` names; ``root`` and ``download`` override the config's (the CLI's flags).

    ``log`` gets what a user should read (files skipped, in memory or streamed); without one it goes to
    the ``vitcompress.data`` logger."""
    log = log or logging.getLogger("vitcompress.data").warning
    root = root if root is not None else cfg.root
    download = cfg.download if download is None else download
    if cfg.name == "imagefolder":
        if not root:
            raise VitcompressError("imagefolder needs data.root (or --data-root): the folder holding train/<class>/")
        return FolderSource(cfg, root, log)
    if cfg.name == "hf":
        if not root:
            raise VitcompressError("hf needs data.root (or --data-root): a saved folder or a hub dataset name")
        return HFSource(cfg, root, log)
    return BundledSource(cfg, root, download)


def data_config_from_arg(text: str, base: DataConfig | None = None) -> DataConfig:
    """What ``--data`` names: a bundled dataset (``fashion-mnist``), an image folder (``DIR`` or
    ``imagefolder:DIR``) or a Hugging Face dataset (``hf:PATH_OR_HUB_NAME``, or a folder saved with
    ``save_to_disk``); the other settings are ``base``'s (a recipe's ``data:``)."""
    from dataclasses import replace

    base = base or DataConfig()
    keep = {"calib_images": base.calib_images, "download": base.download}
    if text.startswith("hf:"):
        return replace(DataConfig(), **keep, name="hf", root=text[3:], val_split=base.val_split)
    if text.startswith("imagefolder:"):
        return replace(DataConfig(), **keep, name="imagefolder", root=text[len("imagefolder:"):],
                       val_split=base.val_split)
    path = Path(text).expanduser()
    if path.is_dir():
        saved = any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))
        return replace(DataConfig(), **keep, name="hf" if saved else "imagefolder", root=text,
                       val_split=base.val_split)
    try:
        name = dataset_info(text).name
    except VitcompressError:
        raise VitcompressError(f"--data {text!r} is not a folder or a known dataset; pass {', '.join(DATASETS)}, an "
                               "image folder (DIR/train/<class>/...), or hf:PATH for a Hugging Face dataset") from None
    return replace(DataConfig(), **keep, name=name, root=base.root if base.name == name else None)
