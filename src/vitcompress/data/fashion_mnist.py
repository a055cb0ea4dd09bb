"""Fashion-MNIST from its idx files (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747).

The idx format (from LeCun's MNIST page) is a big-endian header, then raw
bytes: magic ``0x00 0x00 <type> <ndim>``, ``ndim`` uint32 sizes, then the
values in row-major order. Type 0x08 is unsigned byte, the only type the
Fashion-MNIST files use. We read it ourselves so that a truncated download is
a clear error naming the file, not a numpy reshape failure.

Where the files are looked for, in order: ``root`` (directly, or in
``root/fashion-mnist/`` or torchvision's ``root/FashionMNIST/raw/``), the
Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
the download cache, and finally a download through torchvision's mirrors when
``download=True``.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

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

__all__ = ["SYSTEM_DIRS", "load_fashion_mnist", "read_idx"]

# Installed by `apt-get install dataset-fashion-mnist`; a module attribute so tests can point it elsewhere.
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

_PREFIX = {"train": "train", "test": "t10k"}
_UBYTE = 0x08


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an unsigned-byte idx file (plain, or gzip when the name ends in ``.gz``).

    Returns a uint8 array of the shape the header declares. A file whose header
    is not an unsigned-byte idx header, or whose payload is shorter or longer
    than the header says, raises `VitcompressError` naming the file.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise VitcompressError(
            f"{path} is truncated or not a gzip file ({e}); delete it and download Fashion-MNIST again"
        ) from e
    except OSError as e:
        raise VitcompressError(f"cannot read {path}: {e.strerror or e}; check the file's permissions") from e

    if len(raw) < 4:
        raise VitcompressError(f"{path} is truncated ({len(raw)} bytes); delete it and download it again")
    zero1, zero2, dtype, ndim = raw[:4]
    if zero1 != 0 or zero2 != 0 or dtype != _UBYTE or not 1 <= ndim <= 4:
        raise VitcompressError(
            f"{path} is not an unsigned-byte idx file (magic {raw[:4].hex()}); "
            "point --data-root at the original Fashion-MNIST files"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise VitcompressError(f"{path} is truncated inside its header; delete it and download it again")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise VitcompressError(
            f"{path} is {what} ({len(raw)} bytes, header says {expected}); delete it and download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        p = folder / name
        if p.is_file():
            return p
    return None


def _candidate_dirs(root: Path | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        dirs += [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    dirs += list(SYSTEM_DIRS)
    if root is None:
        # Where an earlier `download=True` without a root put the files.
        dirs.append(default_data_root() / "FashionMNIST" / "raw")
    return dirs


def _locate(split: str, root: Path | None) -> tuple[Path, Path] | None:
    prefix = _PREFIX[split]
    for folder in _candidate_dirs(root):
        images = _find_file(folder, f"{prefix}-images-idx3-ubyte")
        labels = _find_file(folder, f"{prefix}-labels-idx1-ubyte")
        if images is not None and labels is not None:
            return images, labels
    return None


def _download(root: Path | None) -> Path:
    """Fetch the four gzip files through torchvision's mirror list; return the folder they are in."""
    from urllib.error import URLError

    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import download_url

    folder = (root if root is not None else default_data_root()) / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for filename, md5 in FashionMNIST.resources:
        errors = []
        for mirror in FashionMNIST.mirrors:
            try:
                # Keep the .gz as is: read_idx reads gzip directly, so no unpacked copy is needed.
                # download_url skips a file already there whose md5 matches.
                download_url(f"{mirror}{filename}", root=str(folder), filename=filename, md5=md5)
                break
            except (URLError, RuntimeError, OSError) as e:
                errors.append(f"{mirror}: {e}")
        else:
            raise VitcompressError(
                f"could not download Fashion-MNIST file {filename} ({'; '.join(errors)}); "
                "check the network, or install the Debian package dataset-fashion-mnist "
                "(apt-get install dataset-fashion-mnist)"
            )
    return folder


def _not_found(root: Path | None) -> VitcompressError:
    searched = ", ".join(str(d) for d in _candidate_dirs(root))
    return VitcompressError(
        f"Fashion-MNIST not found in {searched}; install the Debian package dataset-fashion-mnist "
        "(apt-get install dataset-fashion-mnist), or pass --data-root DIR containing "
        "train-images-idx3-ubyte[.gz] and the other three idx files, or pass --download when online"
    )


def load_fashion_mnist(
    split: str, root: str | os.PathLike | None = None, download: bool = False
) -> ImageTensorDataset:
    """Load one Fashion-MNIST split: uint8 images (N, 1, 28, 28) and int64 labels in 0..9."""
    check_split(split)
    root_path = Path(root).expanduser() if root is not None else None
    found = _locate(split, root_path)
    if found is None and download:
        _download(root_path)
        found = _locate(split, root_path)
    if found is None:
        raise _not_found(root_path)
    images_path, labels_path = found

    key = ("fashion-mnist", split, file_key([images_path, labels_path]))
    cached = cache_get(key, split)
    if cached is not None:
        return cached

    info = DATASETS["fashion-mnist"]
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (info.img_size, info.img_size):
        raise VitcompressError(
            f"{images_path} holds images of shape {images.shape[1:]}, not 28x28; "
            "point --data-root at the Fashion-MNIST files"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise VitcompressError(
            f"{labels_path} holds {labels.shape} labels for the {images.shape[0]} images in {images_path}; "
            "the two files are from different downloads: download them again"
        )
    if labels.size and int(labels.max()) >= info.num_classes:
        raise VitcompressError(
            f"{labels_path} has label {int(labels.max())}, outside 0..{info.num_classes - 1}; "
            "it is not a Fashion-MNIST label file"
        )
    ds = ImageTensorDataset(
        images=torch.from_numpy(images.copy()).unsqueeze(1),  # (N, 1, 28, 28); copy: frombuffer is read-only
        labels=torch.from_numpy(labels.astype(np.int64)),
        info=info,
        split=split,
        source=str(images_path.parent),
    )
    cache_put(key, ds)
    return ds
