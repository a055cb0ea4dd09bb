"""Datasets held in memory as uint8 tensors, and a batched, seeded input pipeline.

``load_split(name, split)`` returns an `ImageTensorDataset`; ``make_loader``
turns it into normalized float batches at the size and channel count a model
wants. Supported: Fashion-MNIST (idx files, e.g. from the Debian package
dataset-fashion-mnist), CIFAR-10 and CIFAR-100 (python batch files, read with
a restricted unpickler).
"""

from __future__ import annotations

import os

from vitcompress.data.cifar import load_cifar
from vitcompress.data.dataset import (
    DATASETS,
    SPLITS,
    DatasetInfo,
    ImageTensorDataset,
    clear_cache,
    dataset_info,
    default_data_root,
)
from vitcompress.data.fashion_mnist import load_fashion_mnist
from vitcompress.data.transforms import BatchTransform, make_loader

__all__ = [
    "DATASETS",
    "SPLITS",
    "BatchTransform",
    "DatasetInfo",
    "ImageTensorDataset",
    "clear_cache",
    "dataset_info",
    "default_data_root",
    "load_split",
    "make_loader",
]


def load_split(
    name: str, split: str, root: str | os.PathLike | None = None, download: bool = False
) -> ImageTensorDataset:
    """Load split ``split`` ("train" or "test") of dataset ``name`` into memory.

    ``root`` is where to look first (and where ``download=True`` puts the files);
    without it Fashion-MNIST comes from the Debian package location and CIFAR
    from the download cache (`default_data_root`). Anything missing or corrupt
    raises `VitcompressError` with a message saying how to get the data.
    """
    info = dataset_info(name)
    if info.name == "fashion-mnist":
        return load_fashion_mnist(split, root, download)
    return load_cifar(info.name, split, root, download)
