"""Images from files: an image folder or a Hugging Face dataset, decoded by Pillow at the model's input size.

A split is an index (which image, which label) over a *reader* that opens image
``i``: `FolderReader` (paths under a root) or `HFReader` (rows of a ``datasets``
table). `FileImages` decodes on the fly: ``ds[i]`` opens the image, converts it to
the model's channels, resizes and centre-crops it as the model's `Preprocess` says,
and returns uint8 (C, S, S), the same thing an in-memory split holds; so the two
paths feed the same batches to the same transform (augmentation and normalisation
run on whole batches in the main process, see :mod:`.transforms`).

Which path a split takes is decided by a byte budget (``DataConfig.memory_budget_mb``,
see :mod:`.source`): decoded, it is held in memory (`to_memory`, one pass with worker
processes) when it fits; otherwise it stays streamed, read by a ``DataLoader`` with
worker processes every epoch, in memory that does not grow with the dataset (the
index holds paths as one numpy bytes array, so forked workers share it without
copy-on-write of Python objects).

A file that is not an image by extension (``.DS_Store``, ``Thumbs.db``, notes) is
skipped and counted. An image that cannot be decoded is an error naming it; with
``skip_bad_images`` it is dropped and counted instead. Streamed splits check every
file's header before the first epoch, so a broken file stops the run before any
training, not in the middle of it.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import VitcompressError
from .dataset import DatasetInfo, ImageTensorDataset
from .preprocess import Preprocess

__all__ = ["FileImages", "FolderReader", "HFReader", "decode_image", "image_extensions", "scan_folder",
           "to_memory"]

IGNORED_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions Pillow can open (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ...)."""
    from PIL import Image

    Image.init()
    return frozenset(ext.lower() for ext in Image.registered_extensions())


class ImageReader(Protocol):
    def open(self, i: int) -> Any: ...  # a PIL image (not yet decoded)

    def name(self, i: int) -> str: ...  # the file or row, for messages


class FolderReader:
    """Image ``i`` is the file ``root / paths[i]``; paths are kept as one numpy bytes array."""

    def __init__(self, root: Path, paths: np.ndarray) -> None:
        self.root = root
        self.paths = paths

    def name(self, i: int) -> str:
        return str(self.root / os.fsdecode(self.paths[i]))

    def open(self, i: int) -> Any:
        from PIL import Image

        return Image.open(self.name(i))


class HFReader:
    """Image ``i`` is row ``i`` of a Hugging Face ``datasets`` table, read undecoded (bytes or a path)."""

    def __init__(self, table: Any, column: str, what: str) -> None:
        from datasets import Image as HFImage

        self.table = table.select_columns([column]).cast_column(column, HFImage(decode=False))
        self.column = column
        self.what = what

    def name(self, i: int) -> str:
        return f"{self.what} row {i}"

    def open(self, i: int) -> Any:
        from PIL import Image

        cell = self.table[int(i)][self.column]
        if cell is None:
            raise ValueError("the row holds no image")
        if cell.get("bytes") is not None:
            return Image.open(io.BytesIO(cell["bytes"]))
        if cell.get("path"):
            return Image.open(cell["path"])
        raise ValueError("the row holds neither image bytes nor a path")


def decode_image(img: Any, p: Preprocess) -> torch.Tensor:
    """A PIL image as the model's uint8 (C, S, S): channels, then resize and centre crop as ``p`` says.

    The resize and crop are timm's eval transform (torchvision's ``Resize`` + ``CenterCrop`` on a
    PIL image) or, for a Hugging Face preprocess, the image processor's (Pillow resize, then a crop
    whose offset rounds down); both resize with Pillow, as they do, so pixels match theirs.
    """
    from PIL import Image

    mode = "L" if p.in_chans == 1 else "RGB"
    if img.mode != mode:
        if img.mode in ("P", "PA"):  # a palette with transparency warns unless it goes through RGBA
            img = img.convert("RGBA")
        img = img.convert(mode)  # RGBA -> RGB drops alpha; 16-bit and float greys scale as Pillow does
    w, h = img.size
    r, s = p.resize_to, p.input_size
    if p.resize_mode == "squash":
        size = (r, r)
    elif w <= h:
        size = (r, int(r * h / w))
    else:
        size = (int(r * w / h), r)
    if size != (w, h):
        img = img.resize(size, resample=getattr(Image.Resampling, p.interpolation.upper()))
    w, h = img.size
    if (w, h) != (s, s):
        if p.source == "hf":
            top, left = (h - s) // 2, (w - s) // 2
        else:  # torchvision's CenterCrop
            top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (C, S, S)


class FileImages(Dataset):
    """One split of images read from files (or table rows) and decoded on the fly.

    ``ds[i]`` is ``(uint8 (C, S, S) or None, label, error or None)``: a decoding error is
    returned, not raised, so that `make_loader` raises it in the main process as one line
    (or counts it, with ``skip_bad``) instead of a worker's traceback.
    """

    def __init__(self, reader: ImageReader, index: np.ndarray, labels: torch.Tensor, info: DatasetInfo,
                 split: str, source: str, preprocess: Preprocess, *, skip_bad: bool = False,
                 workers: int = 0) -> None:
        if labels.dtype != torch.int64 or labels.shape != (len(index),):
            raise ValueError(f"labels must be int64 ({len(index)},), got {labels.dtype} {tuple(labels.shape)}")
        self.reader = reader
        self.index = np.asarray(index, dtype=np.int64)
        self.labels = labels
        self.info = info
        self.split = split
        self.source = source
        self.preprocess = preprocess
        self.skip_bad = skip_bad
        self.workers = workers

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str | None]:
        j = int(self.index[int(i)])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's warnings on odd files; errors are what count
                img = self.reader.open(j)
                with img:
                    x = decode_image(img, self.preprocess)
        except Exception as exc:  # any reason a file does not decode: truncated, not an image, a bomb
            return None, int(self.labels[int(i)]), f"{self.reader.name(j)}: {type(exc).__name__}: {exc}"
        return x, int(self.labels[int(i)]), None

    def subset(self, indices: Sequence[int] | torch.Tensor) -> FileImages:
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.reshape(-1).long()
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise VitcompressError(f"subset index out of range for the {n} images of {self.info.name} {self.split}")
        np_idx = idx.numpy()
        return FileImages(self.reader, self.index[np_idx], self.labels[idx], self.info, self.split, self.source,
                          self.preprocess, skip_bad=self.skip_bad, workers=self.workers)

    def with_preprocess(self, preprocess: Preprocess) -> FileImages:
        if (preprocess.input_size, preprocess.in_chans) != (self.info.img_size, self.info.in_chans):
            raise VitcompressError("a streamed split is decoded for one input size and channel count; load it "
                                   "again for another")
        return FileImages(self.reader, self.index, self.labels, self.info, self.split, self.source, preprocess,
                          skip_bad=self.skip_bad, workers=self.workers)

    def __repr__(self) -> str:
        return (f"FileImages({self.info.name} {self.split}: {len(self)} images decoded to "
                f"{self.info.in_chans}x{self.info.img_size}x{self.info.img_size}, source={self.source!r})")


def collate_decoded(items: list[tuple[torch.Tensor | None, int, str | None]]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """A batch of `FileImages` items: the decoded images stacked, their labels, which items decoded
    (bool, one per item) and the errors of those that did not."""
    ok = torch.tensor([err is None for _, _, err in items], dtype=torch.bool)
    errors = [err for _, _, err in items if err is not None]
    good = [(x, y) for x, y, err in items if err is None]
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), ok, errors
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.int64), ok, errors


def bad_image_error(error: str) -> VitcompressError:
    return VitcompressError(f"cannot decode image {error[:300]}; replace or remove the file, or set "
                            "data.skip_bad_images: true to skip such images")


def iter_decoded(ds: FileImages, batches: Iterator[Any], workers: int, *, desc: str | None = None,
                 progress: bool = False, total: int | None = None,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]]:
    """`collate_decoded` batches of ``ds`` for the index batches ``batches`` yields, in their order, with
    ``workers`` processes decoding ahead (none: in this process)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=collate_decoded,
                        persistent_workers=False, prefetch_factor=2 if workers else None)
    with tqdm(total=total, desc=desc, leave=False, disable=not progress, mininterval=1.0) as bar:
        for batch in loader:
            bar.update(len(batch[2]))
            yield batch


def to_memory(ds: FileImages, *, progress: bool = False, batch_size: int = 256,
              log: Callable[[str], None] | None = None) -> ImageTensorDataset:
    """Decode every image of ``ds`` once (worker processes decoding) into an in-memory split.

    Bad images raise (one line, naming the first), or with ``skip_bad`` are left out and counted.
    """
    n = len(ds)
    c, s = ds.info.in_chans, ds.info.img_size
    images = torch.empty((n, c, s, s), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    keep = torch.ones(n, dtype=torch.bool)
    order = [torch.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    bad: list[str] = []
    decoded = iter_decoded(ds, iter([o.tolist() for o in order]), ds.workers, desc=f"decode {ds.split}",
                           progress=progress, total=n)
    for (x, y, ok, errors), idx in zip(decoded, order):
        if errors and not ds.skip_bad:
            raise bad_image_error(errors[0])
        keep[idx[~ok]] = False
        bad += errors
        images[idx[ok]] = x
        labels[idx[ok]] = y
    if bad:
        (log or _warn)(f"skipped {len(bad)} image(s) of {ds.info.name} {ds.split} that do not decode "
                       f"(data.skip_bad_images), e.g. {bad[0][:200]}")
        images, labels = images[keep], labels[keep]
    return ImageTensorDataset(images, labels, ds.info, ds.split, ds.source, ds.preprocess)


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def check_headers(reader: FolderReader, *, threads: int = 8, progress: bool = False,
                  desc: str = "check") -> list[tuple[int, str]]:
    """Open every file's header (not its pixels): the files that are not images Pillow can read, with why."""
    from PIL import Image
    from tqdm.auto import tqdm

    def one(i: int) -> tuple[int, str] | None:
        try:
            with Image.open(reader.name(i)) as img:
                img.size  # noqa: B018 - reading the header is the check
        except Exception as exc:
            return i, f"{reader.name(i)}: {type(exc).__name__}: {exc}"
        return None

    n = len(reader.paths)
    out = []
    # One catch_warnings around the threads: entered in each thread, it would restore another's filters.
    # Chunks: Executor.map submits every item at once, a future per file (200 MB for 200k files).
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=threads) as pool, \
            tqdm(total=n, desc=desc, leave=False, disable=not progress, mininterval=1.0) as bar:
        warnings.simplefilter("ignore")  # Pillow's warnings on odd headers; the errors are what count
        for start in range(0, n, 4096):
            chunk = range(start, min(start + 4096, n))
            out += [res for res in pool.map(one, chunk) if res is not None]
            bar.update(len(chunk))
    return out


def scan_folder(split_dir: Path, classes: Sequence[str] | None = None
                ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, list[str], list[str]]:
    """The images under ``split_dir/<class>/`` (any depth): classes, relative paths, labels, skipped files,
    and the classes that hold no image.

    ``classes`` None: the class folders found, in sorted order (torchvision's ``ImageFolder`` rule);
    given (a validation split), a class folder not in it is an error.
    """
    exts = image_extensions()
    found = sorted(d.name for d in os.scandir(split_dir) if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = tuple(found)
    else:
        extra = [c for c in found if c not in classes]
        if extra:
            raise VitcompressError(f"{split_dir} has class folder {extra[0]!r}, which train/ does not have; the "
                                   "splits must share their classes: add it to train/ or remove it")
    skipped: list[str] = []
    paths: list[bytes] = []
    labels: list[int] = []
    empty: list[str] = []
    for entry in os.scandir(split_dir):
        if not entry.is_dir():
            skipped.append(entry.name)  # a file beside the class folders belongs to no class
    for label, name in enumerate(classes):
        folder = split_dir / name
        before = len(paths)
        if folder.is_dir():
            for dirpath, dirnames, filenames in os.walk(folder):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel = os.path.relpath(dirpath, split_dir)
                for f in sorted(filenames):
                    if f.lower() in IGNORED_NAMES or f.startswith(".") or os.path.splitext(f)[1].lower() not in exts:
                        skipped.append(os.path.join(rel, f))
                        continue
                    paths.append(os.fsencode(os.path.join(rel, f)))
                    labels.append(label)
        if len(paths) == before:
            empty.append(name)
    arr = np.array(paths, dtype=f"S{max((len(p) for p in paths), default=1)}")
    return tuple(classes), arr, np.asarray(labels, dtype=np.int64), skipped, empty
