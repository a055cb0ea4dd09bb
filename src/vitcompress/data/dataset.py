"""What a dataset is: its constants (`DatasetInfo`) and one split held in memory.

The bundled datasets are small enough (at most 60,000 images of 32x32x3 bytes)
to sit in memory as one uint8 tensor, so batches are gathered by indexing and
transformed as whole batches instead of image by image. Images from files (an
image folder, a Hugging Face dataset, see :mod:`.files`) are held the same way
when they fit the memory budget, decoded once at the model's input size.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from vitcompress.data.preprocess import Preprocess
from vitcompress.errors import VitcompressError

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "ImageTensorDataset",
    "SPLITS",
    "dataset_info",
    "default_data_root",
]

SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Constants of one dataset, in its native resolution and channels.

    ``mean`` and ``std`` are per native channel in [0, 1] pixel units, computed
    on the training split (None where they were not computed: images from files
    fed to a model that brings its own); ``classes`` are indexed by label.
    For images decoded from files, ``in_chans`` and ``img_size`` are what they
    were decoded to.
    """

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"{self.name}: give both mean and std, or neither")
        if self.mean is not None and (len(self.mean) != self.in_chans or len(self.std or ()) != self.in_chans):
            raise ValueError(f"{self.name}: mean/std need {self.in_chans} values, one per channel")
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes")


_CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
    "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
    "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
    "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road "
    "rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower "
    "sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale "
    "willow_tree wolf woman worm"
).split()

DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        num_classes=10,
        in_chans=1,
        img_size=28,
        mean=(0.2860,),
        std=(0.3530,),
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        num_classes=10,
        in_chans=3,
        img_size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        classes=(
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        num_classes=100,
        in_chans=3,
        img_size=32,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        classes=tuple(_CIFAR100_CLASSES),
    ),
}


def _canonical(name: str) -> str:
    # "Fashion_MNIST", "fashionmnist" and "CIFAR-10" are what people type; they name the same thing.
    return name.lower().replace("-", "").replace("_", "")


def dataset_info(name: str) -> DatasetInfo:
    """Return the constants of dataset ``name`` (case, '-' and '_' are ignored)."""
    wanted = _canonical(name)
    for key, info in DATASETS.items():
        if _canonical(key) == wanted:
            return info
    raise VitcompressError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def check_split(split: str) -> str:
    """Return ``split`` if it is a known split name, else raise a `VitcompressError`."""
    if split not in SPLITS:
        raise VitcompressError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return split


def default_data_root() -> Path:
    """Where downloads go when no root is given: ``$XDG_CACHE_HOME/vitcompress`` or ``~/.cache/vitcompress``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "vitcompress"


class ImageTensorDataset(Dataset):
    """A whole split in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,).

    ``ds[i]`` is ``(uint8 (C, H, W), int)``. ``ds[idx]`` with a 1-D integer tensor
    is a whole batch ``(uint8 (B, C, H, W), int64 (B,))``; `make_loader` relies on
    it to gather a batch with one indexing operation instead of B.

    The tensors may be shared with other datasets of the same split (the loading
    cache and `subset` hand out the same storage); treat them as read-only.

    ``preprocess`` is the model input recipe the split is prepared for (see
    :mod:`.preprocess`); `make_loader` follows it. None: the dataset's own
    statistics at whatever size and channels the loader is asked for.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        info: DatasetInfo,
        split: str,
        source: str,
        preprocess: Preprocess | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] != info.in_chans:
            raise ValueError(f"{info.name} has {info.in_chans} channels, images have {images.shape[1]}")
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must be int64 ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels
        self.info = info
        self.split = split
        self.source = source
        self.preprocess = preprocess

    def with_preprocess(self, preprocess: Preprocess | None) -> ImageTensorDataset:
        """The same images (shared storage), prepared for a model's ``preprocess``."""
        return ImageTensorDataset(self.images, self.labels, self.info, self.split, self.source, preprocess)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int | torch.Tensor) -> tuple[torch.Tensor, int | torch.Tensor]:
        if isinstance(index, torch.Tensor) and index.dim() == 1:
            return self.images[index], self.labels[index]
        i = int(index)
        return self.images[i], int(self.labels[i])

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageTensorDataset:
        """Return a new dataset holding the images at ``indices`` (in that order), with the same info.

        A boolean tensor of length ``len(self)`` is taken as a mask.
        """
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise VitcompressError(f"subset mask has shape {tuple(idx.shape)}; it needs ({len(self)},)")
            idx = idx.nonzero().flatten()
        if idx.numel() == 0:
            idx = idx.reshape(0).long()
        if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex():
            raise VitcompressError("subset indices must be a 1-D sequence of integers")
        idx = idx.long()
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise VitcompressError(
                f"subset index out of range for the {n} images of {self.info.name} {self.split}; "
                f"use indices in 0..{n - 1}"
            )
        return ImageTensorDataset(self.images[idx], self.labels[idx], self.info, self.split, self.source,
                                  self.preprocess)

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return (
            f"ImageTensorDataset({self.info.name} {self.split}: {len(self)} images "
            f"{c}x{h}x{w}, source={self.source!r})"
        )


# Loading the 60k Fashion-MNIST train split means gunzipping 26 MB; callers (train,
# then evaluate, then calibrate) ask for it repeatedly in one process, so keep the
# tensors. Keyed by the files' size and mtime so an edited file is read again.
_CACHE_SIZE = 6
_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, DatasetInfo, str]] = OrderedDict()


def file_key(paths: Sequence[Path]) -> tuple:
    """A cache key part that changes when any of ``paths`` is replaced or edited."""
    key = []
    for p in paths:
        st = p.stat()
        key.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return tuple(key)


def cache_get(key: tuple, split: str) -> ImageTensorDataset | None:
    """Return a dataset built from the cached tensors under ``key``, or None."""
    hit = _cache.get(key)
    if hit is None:
        return None
    _cache.move_to_end(key)
    images, labels, info, source = hit
    return ImageTensorDataset(images, labels, info, split, source)


def cache_put(key: tuple, ds: ImageTensorDataset) -> None:
    """Remember ``ds``'s tensors under ``key``, evicting the least recently used entry."""
    _cache[key] = (ds.images, ds.labels, ds.info, ds.source)
    _cache.move_to_end(key)
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)


def clear_cache() -> None:
    """Forget every split loaded so far (tests use it; so can a caller short of memory)."""
    _cache.clear()
