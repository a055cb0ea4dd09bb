"""CIFAR-10 and CIFAR-100 from the "python version" batch files (Krizhevsky 2009,
"Learning Multiple Layers of Features from Tiny Images").

Layout, as the CIFAR site's archives and torchvision unpack it::

    ROOT/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta
    ROOT/cifar-100-python/train, test, meta

Each batch is a pickled dict with bytes keys: ``b"data"`` a uint8 array
(N, 3072) holding the red, green and blue 32x32 planes of each image in
row-major order, and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"``
(CIFAR-100), a list of N ints.

A pickle can run any code it names when it is loaded, and these files come
from a download or from whatever folder the user points at. So they are read
with `_CifarUnpickler`, which only lets a pickle name the few numpy functions
that rebuild an array; anything else is refused before it can run.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitcompress.data.dataset import (
    DATASETS,
    ImageTensorDataset,
    cache_get,
    cache_put,
    check_split,
    default_data_root,
    file_key,
)
from vitcompress.errors import VitcompressError

__all__ = ["load_cifar", "safe_load_pickle"]


@dataclass(frozen=True)
class _Layout:
    folder: str
    splits: dict[str, tuple[str, ...]]
    meta: str
    label_key: bytes
    names_key: bytes
    site_name: str


_LAYOUTS: dict[str, _Layout] = {
    "cifar10": _Layout(
        folder="cifar-10-batches-py",
        splits={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        meta="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        site_name="CIFAR-10 python version (cifar-10-python.tar.gz)",
    ),
    "cifar100": _Layout(
        folder="cifar-100-python",
        splits={"train": ("train",), "test": ("test",)},
        meta="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        site_name="CIFAR-100 python version (cifar-100-python.tar.gz)",
    ),
}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes under protocol 2 as _codecs.encode(str, "latin1"); allow
    # exactly that, not the other codecs _codecs.encode could reach.
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not used by CIFAR batch files")
    return text.encode("latin1")


def _numpy_reconstruct() -> Any:
    # numpy 2 moved numpy.core to numpy._core and left a deprecated alias; import the real one.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED: dict[tuple[str, str], Any] = {
    # The originals were written by Python 2 with numpy 1.x: numpy.core.*; files
    # pickled by numpy 2 name numpy._core.* instead.
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays, dicts, lists and strings, and nothing else."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        # encoding="bytes": the Python 2 originals hold str keys that must stay b"data" etc.
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise VitcompressError(
                f"{self._path}: vitcompress refuses to unpickle {module}.{name}: not a CIFAR batch file; "
                "delete it and download CIFAR again"
            )
        return allowed


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` allowing only what a CIFAR batch file needs (numpy arrays, dicts, lists, bytes).

    Any other global (``os.system``, a class, a module) raises `VitcompressError`
    before it is called; a truncated or corrupt file raises `VitcompressError` too.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _CifarUnpickler(f, path).load()
    except VitcompressError:
        raise
    except OSError as e:
        raise VitcompressError(f"cannot read {path}: {e.strerror or e}; check the file's permissions") from e
    except Exception as e:  # any failure inside a corrupt pickle is the file's fault
        raise VitcompressError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {e}); delete it and download CIFAR again"
        ) from e


def _read_batch(path: Path, layout: _Layout, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_load_pickle(path)
    if not isinstance(batch, dict):
        raise VitcompressError(
            f"{path} holds a {type(batch).__name__}, not a CIFAR batch dict; download CIFAR again"
        )
    # Files re-pickled by Python 3 code may have str keys; the originals have bytes.
    batch = {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}
    data = batch.get(b"data")
    labels = batch.get(layout.label_key)
    if not isinstance(data, np.ndarray) or labels is None:
        raise VitcompressError(
            f"{path} has no {b'data'!r} array or no {layout.label_key!r}; it is not a batch of this dataset"
        )
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise VitcompressError(
            f"{path}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072); download CIFAR again"
        )
    # The structure first: np.asarray on a list nesting shared lists (a few kB of pickle) would build billions
    # of entries before any shape check.
    flat = (isinstance(labels, list) and len(labels) == data.shape[0]
            and all(type(v) is int or isinstance(v, np.integer) for v in labels)) or (
        isinstance(labels, np.ndarray) and labels.shape == (data.shape[0],))
    if not flat:
        kind = f"{type(labels).__name__} of {len(labels)}" if isinstance(labels, (list, np.ndarray)) else \
            type(labels).__name__
        raise VitcompressError(f"{path}: labels are a {kind}, expected a flat list of {data.shape[0]} integers "
                               "(one per image); download CIFAR again")
    labels_arr = np.asarray(labels)
    if labels_arr.shape != (data.shape[0],) or (labels_arr.size and labels_arr.dtype.kind not in "iu"):
        raise VitcompressError(
            f"{path}: labels are {labels_arr.dtype} {labels_arr.shape}, expected {data.shape[0]} integers "
            "(one per image); download CIFAR again"
        )
    labels_arr = labels_arr.astype(np.int64)
    if labels_arr.size and (labels_arr.min() < 0 or labels_arr.max() >= num_classes):
        raise VitcompressError(
            f"{path}: labels outside 0..{num_classes - 1}; is this a batch of the other CIFAR dataset?"
        )
    return data, labels_arr


def _read_class_names(path: Path, layout: _Layout, num_classes: int) -> tuple[str, ...] | None:
    if not path.is_file():
        return None  # the batches alone are enough to train; keep the built-in names
    meta = safe_load_pickle(path)
    if not isinstance(meta, dict):
        raise VitcompressError(
            f"{path} holds a {type(meta).__name__}, not a CIFAR meta dict; download CIFAR again"
        )
    meta = {k.encode() if isinstance(k, str) else k: v for k, v in meta.items()}
    names = meta.get(layout.names_key)
    if not isinstance(names, list) or len(names) != num_classes:
        raise VitcompressError(
            f"{path}: {layout.names_key!r} should list {num_classes} class names; download CIFAR again"
        )
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names)


def _find_folder(layout: _Layout, split: str, root: Path) -> Path | None:
    # Accept ROOT holding the dataset folder, or ROOT being that folder itself.
    for folder in (root / layout.folder, root):
        if (folder / layout.splits[split][0]).is_file() or (folder / layout.meta).is_file():
            return folder
    return None


def _how_to_get(layout: _Layout, root: Path, *, offer_download: bool = True) -> str:
    advice = (
        f"download the {layout.site_name} from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it "
        f"into {root} (giving {root / layout.folder})"
    )
    return advice + (", or pass --download when online" if offer_download else "")


def _download(name: str, root: Path) -> None:
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    source = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        root.mkdir(parents=True, exist_ok=True)
        # The archive's md5 is checked before unpacking, so what we unpickle afterwards is the original.
        download_and_extract_archive(
            source.url, download_root=str(root), filename=source.filename, md5=source.tgz_md5
        )
    except (OSError, RuntimeError) as e:
        raise VitcompressError(
            f"could not download {name} into {root} ({e}); check the network, or "
            f"{_how_to_get(_LAYOUTS[name], root, offer_download=False)}"
        ) from e


def load_cifar(
    name: str, split: str, root: str | os.PathLike | None = None, download: bool = False
) -> ImageTensorDataset:
    """Load one split of ``name`` ("cifar10" or "cifar100"): uint8 images (N, 3, 32, 32), int64 labels."""
    if name not in _LAYOUTS:
        raise VitcompressError(f"unknown CIFAR dataset {name!r}; choose cifar10 or cifar100")
    check_split(split)
    layout = _LAYOUTS[name]
    info = DATASETS[name]
    root_path = Path(root).expanduser() if root is not None else default_data_root()

    folder = _find_folder(layout, split, root_path)
    missing = [f for f in layout.splits[split] if folder is None or not (folder / f).is_file()]
    if missing and download:
        _download(name, root_path)
        folder = _find_folder(layout, split, root_path)
        missing = [f for f in layout.splits[split] if folder is None or not (folder / f).is_file()]
    if folder is None:
        raise VitcompressError(f"{name} not found in {root_path}; {_how_to_get(layout, root_path)}")
    if missing:
        raise VitcompressError(
            f"{name} in {folder} is incomplete: {', '.join(missing)} missing; "
            f"{_how_to_get(layout, root_path)}"
        )

    files = [folder / f for f in layout.splits[split]]
    meta_path = folder / layout.meta
    key = (name, split, file_key(files + ([meta_path] if meta_path.is_file() else [])))
    cached = cache_get(key, split)
    if cached is not None:
        return cached

    parts = [_read_batch(p, layout, info.num_classes) for p in files]
    # concatenate copies even a single part: the result is contiguous, writable and ours.
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    names = _read_class_names(meta_path, layout, info.num_classes)
    if names is not None and names != info.classes:
        info = dataclasses.replace(info, classes=names)
    ds = ImageTensorDataset(
        # Each row is the R, G, B planes of 32x32 in turn, so a plain reshape gives (N, C, H, W).
        images=torch.from_numpy(data.reshape(-1, 3, 32, 32)),
        labels=torch.from_numpy(labels),
        info=info,
        split=split,
        source=str(folder),
    )
    cache_put(key, ds)
    return ds
