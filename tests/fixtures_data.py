"""Write small dataset files in the exact on-disk formats the loaders read.

CIFAR batches are pickled the way the originals are: a dict with bytes keys,
``b"data"`` a numpy uint8 (N, 3072) array, labels a list of ints, protocol 2.
idx files follow the MNIST header layout. Pixel values follow `pixel_value`,
so a test can check that every byte lands at the right (c, h, w).
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_TRAIN_BATCHES = 5
CIFAR10_PER_BATCH = 6
CIFAR10_TEST = 10
CIFAR100_TRAIN = 20
CIFAR100_TEST = 10


def pixel_value(image: int, c: int, h: int, w: int) -> int:
    """The byte written at channel c, row h, column w of image number ``image`` (global index)."""
    return (image * 7 + c * 50 + h * 3 + w) % 256


def cifar_images(first: int, n: int) -> np.ndarray:
    """uint8 (n, 3072) rows in CIFAR order: the R, G, B 32x32 planes, each row-major."""
    i, c, h, w = np.meshgrid(
        np.arange(first, first + n), np.arange(3), np.arange(32), np.arange(32), indexing="ij"
    )
    return ((i * 7 + c * 50 + h * 3 + w) % 256).astype(np.uint8).reshape(n, 3072)


def _dump(path: Path, obj: object) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar10_train_label(i: int) -> int:
    return i % 10


def cifar10_test_label(i: int) -> int:
    return (9 - i) % 10


def write_cifar10(root: Path, names: list[str] | None = None) -> Path:
    """Write ``root/cifar-10-batches-py`` (5 train batches of 6 images, a test batch of 10, meta)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(CIFAR10_TRAIN_BATCHES):
        first = b * CIFAR10_PER_BATCH
        _dump(
            folder / f"data_batch_{b + 1}",
            {
                b"batch_label": f"training batch {b + 1} of 5".encode(),
                b"labels": [cifar10_train_label(i) for i in range(first, first + CIFAR10_PER_BATCH)],
                b"data": cifar_images(first, CIFAR10_PER_BATCH),
                b"filenames": [f"img_{i}.png".encode() for i in range(first, first + CIFAR10_PER_BATCH)],
            },
        )
    _dump(
        folder / "test_batch",
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": [cifar10_test_label(i) for i in range(CIFAR10_TEST)],
            b"data": cifar_images(1000, CIFAR10_TEST),
            b"filenames": [f"test_{i}.png".encode() for i in range(CIFAR10_TEST)],
        },
    )
    _dump(
        folder / "batches.meta",
        {
            b"num_cases_per_batch": CIFAR10_PER_BATCH,
            b"label_names": [n.encode() for n in (names or CIFAR10_NAMES)],
            b"num_vis": 3072,
        },
    )
    return folder


def cifar100_train_label(i: int) -> int:
    return (i * 5) % 100


def write_cifar100(root: Path) -> Path:
    """Write ``root/cifar-100-python`` (train of 20 images, test of 10, meta with names fine_000..)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, first, n in (("train", 0, CIFAR100_TRAIN), ("test", 500, CIFAR100_TEST)):
        fine = [cifar100_train_label(i) if split == "train" else 99 - i for i in range(n)]
        _dump(
            folder / split,
            {
                b"filenames": [f"{split}_{i}.png".encode() for i in range(n)],
                b"batch_label": f"{split} batch".encode(),
                b"fine_labels": fine,
                b"coarse_labels": [f // 5 for f in fine],
                b"data": cifar_images(first, n),
            },
        )
    _dump(
        folder / "meta",
        {
            b"fine_label_names": [f"fine_{k:03d}".encode() for k in range(100)],
            b"coarse_label_names": [f"coarse_{k:02d}".encode() for k in range(20)],
        },
    )
    return folder


class ShellPayload:
    """Unpickling this runs ``command`` in a shell: what a poisoned batch file would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def write_malicious_batch(path: Path, command: str) -> None:
    """A file shaped like a CIFAR batch whose unpickling runs ``command``."""
    _dump(path, {b"data": ShellPayload(command), b"labels": [0]})


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 idx file (gzip when ``path`` ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def idx_images(n: int) -> np.ndarray:
    """uint8 (n, 28, 28) with a value that depends on image, row and column."""
    i, h, w = np.meshgrid(np.arange(n), np.arange(28), np.arange(28), indexing="ij")
    return ((i * 11 + h * 5 + w) % 256).astype(np.uint8)


def _py2_str(b: bytes) -> bytes:
    # SHORT_BINSTRING: how Python 2 pickled a str; encoding="bytes" reads it back as bytes.
    return b"U" + bytes([len(b)]) + b


def py2_style_batch(data: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> bytes:
    """A batch pickled opcode by opcode as Python 2's cPickle with numpy 1.x wrote the originals.

    Python 3 cannot produce this itself (it writes bytes via _codecs.encode and
    numpy 2 names numpy._core), so it is assembled by hand: numpy.core.multiarray
    globals, Python 2 strings, the array's raw bytes as one BINSTRING.
    """
    n, m = data.shape
    raw = np.ascontiguousarray(data, dtype=np.uint8).tobytes()
    out = b"\x80\x02}q\x00("  # PROTO 2, EMPTY_DICT, BINPUT, MARK
    out += _py2_str(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
    out += b"(K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", m) + b"\x86"  # version, shape
    out += b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # dtype state
    out += b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb"  # not Fortran order, raw bytes, BUILD
    out += _py2_str(label_key) + b"](" + b"".join(b"K" + bytes([y]) for y in labels) + b"e"
    return out + b"u."


FOLDER_CLASSES = ["bird", "Cat", "dog"]  # sorted: "Cat" < "bird" < "dog" (upper case first)


def folder_image(i: int, size: tuple[int, int]) -> Image.Image:
    """An RGB image whose colours depend on ``i`` and on the position: distinct per image."""
    w, h = size
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    base = np.stack([(xx * 3 + i * 17) % 256, (yy * 5 + i * 29) % 256, ((xx + yy) * 2 + i * 7) % 256], -1)
    return Image.fromarray(base.astype(np.uint8), mode="RGB")


def write_image_folder(root: Path, per_class: dict[str, int] | None = None, val_per_class: int = 2,
                       classes: list[str] | None = None) -> Path:
    """``root/train/<class>/`` and ``root/val/<class>/`` with images of mixed sizes, modes and formats
    (greyscale PNG, RGBA PNG, palette GIF, JPEG with .JPG and .jpeg, RGB .png), plus stray files."""
    classes = classes or FOLDER_CLASSES
    per_class = per_class or {c: 5 for c in classes}
    k = 0
    for split, counts in (("train", per_class), ("val", {c: val_per_class for c in classes})):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for j in range(counts.get(c, 0)):
                img = folder_image(k, (20 + (k * 7) % 30, 18 + (k * 11) % 40))
                kind = k % 6
                name = d / f"img{j}"
                if kind == 0:
                    img.convert("L").save(name.with_suffix(".png"))
                elif kind == 1:
                    img.convert("RGBA").save(name.with_suffix(".PNG"))
                elif kind == 2:
                    img.convert("P").save(name.with_suffix(".gif"))
                elif kind == 3:
                    img.save(name.with_suffix(".JPG"), quality=95)
                elif kind == 4:
                    img.save(name.with_suffix(".jpeg"), quality=95)
                else:
                    img.save(name.with_suffix(".png"))
                k += 1
    (root / "train" / classes[0] / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "val" / classes[-1] / "notes.txt").write_text("not an image")
    return root
