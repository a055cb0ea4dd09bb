"""Tests for vitcompress.data: loaders on files in the real formats, the safe unpickler, the batch pipeline."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import fixtures_data as fx
import numpy as np
import pytest
import torch

from vitcompress.data import (
    DATASETS,
    BatchTransform,
    ImageTensorDataset,
    dataset_info,
    load_split,
    make_loader,
)
from vitcompress.data import fashion_mnist as fm
from vitcompress.data.transforms import LUMINANCE
from vitcompress.errors import VitcompressError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# --- dataset constants -------------------------------------------------------------------------


def test_dataset_table() -> None:
    assert set(DATASETS) == {"fashion-mnist", "cifar10", "cifar100"}
    for key, info in DATASETS.items():
        assert info.name == key
        assert len(info.classes) == info.num_classes
        assert len(info.mean) == len(info.std) == info.in_chans
    assert (DATASETS["cifar100"].num_classes, DATASETS["fashion-mnist"].img_size) == (100, 28)


@pytest.mark.parametrize(
    ("alias", "name"), [("CIFAR-10", "cifar10"), ("fashion_mnist", "fashion-mnist"), ("cifar100", "cifar100")]
)
def test_dataset_info_aliases(alias: str, name: str) -> None:
    assert dataset_info(alias) is DATASETS[name]


def test_dataset_info_unknown_lists_known() -> None:
    with pytest.raises(VitcompressError) as err:
        dataset_info("imagenet")
    msg = _one_line(err)
    assert "imagenet" in msg and "fashion-mnist" in msg and "cifar100" in msg


def test_unknown_split(tmp_path: Path) -> None:
    fx.write_cifar10(tmp_path)
    with pytest.raises(VitcompressError, match="unknown split 'val'"):
        load_split("cifar10", "val", root=tmp_path)


# --- CIFAR ---------------------------------------------------------------------------------------


def test_cifar10_train_from_fixture(tmp_path: Path) -> None:
    folder = fx.write_cifar10(tmp_path)
    ds = load_split("cifar10", "train", root=tmp_path)
    n = fx.CIFAR10_TRAIN_BATCHES * fx.CIFAR10_PER_BATCH
    assert len(ds) == n
    assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64
    assert ds.labels.tolist() == [fx.cifar10_train_label(i) for i in range(n)]
    assert ds.info.name == "cifar10" and ds.split == "train" and ds.source == str(folder)
    assert ds.info.classes == tuple(fx.CIFAR10_NAMES)
    # Image 13 lives in data_batch_3; its green plane, row 5, column 30.
    assert int(ds.images[13, 1, 5, 30]) == fx.pixel_value(13, 1, 5, 30)
    i, c, h, w = np.meshgrid(np.arange(n), np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    expected = torch.from_numpy(((i * 7 + c * 50 + h * 3 + w) % 256).astype(np.uint8))
    assert torch.equal(ds.images, expected)
    image, label = ds[7]
    assert image.shape == (3, 32, 32) and label == 7 and isinstance(label, int)


def test_cifar10_test_split_and_direct_folder(tmp_path: Path) -> None:
    folder = fx.write_cifar10(tmp_path)
    ds = load_split("cifar10", "test", root=folder)  # root pointing at the batches folder itself
    assert len(ds) == fx.CIFAR10_TEST
    assert ds.labels.tolist() == [fx.cifar10_test_label(i) for i in range(fx.CIFAR10_TEST)]
    assert int(ds.images[4, 2, 31, 0]) == fx.pixel_value(1004, 2, 31, 0)


def test_cifar10_class_names_come_from_meta(tmp_path: Path) -> None:
    names = [f"class_{k}" for k in range(10)]
    fx.write_cifar10(tmp_path, names=names)
    ds = load_split("cifar10", "test", root=tmp_path)
    assert ds.info.classes == tuple(names)
    assert ds.info.mean == DATASETS["cifar10"].mean


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    fx.write_cifar100(tmp_path)
    train = load_split("cifar100", "train", root=tmp_path)
    test = load_split("CIFAR-100", "test", root=tmp_path)
    assert train.images.shape == (fx.CIFAR100_TRAIN, 3, 32, 32)
    assert train.labels.tolist() == [fx.cifar100_train_label(i) for i in range(fx.CIFAR100_TRAIN)]
    assert test.labels.tolist() == [99 - i for i in range(fx.CIFAR100_TEST)]
    assert train.info.num_classes == 100 and train.info.classes[42] == "fine_042"
    assert int(test.images[3, 0, 10, 20]) == fx.pixel_value(503, 0, 10, 20)


def test_python2_pickled_batch_loads(tmp_path: Path) -> None:
    # The real files were written by Python 2 with numpy 1.x; make sure that form passes the
    # restricted unpickler under the numpy installed here.
    folder = fx.write_cifar10(tmp_path)
    data = fx.cifar_images(2000, 3)
    (folder / "test_batch").write_bytes(fx.py2_style_batch(data, [7, 0, 9]))
    assert b"numpy.core.multiarray" in (folder / "test_batch").read_bytes()
    ds = load_split("cifar10", "test", root=tmp_path)
    assert ds.labels.tolist() == [7, 0, 9]
    assert int(ds.images[2, 2, 17, 9]) == fx.pixel_value(2002, 2, 17, 9)


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    # The payload really runs when unpickled normally: this is what the loader must prevent.
    proof = tmp_path / "proof"
    fx.write_malicious_batch(tmp_path / "evil_check", f"touch {proof}")
    with (tmp_path / "evil_check").open("rb") as f:
        pickle.load(f)
    assert proof.exists()

    folder = fx.write_cifar10(tmp_path / "data")
    marker = tmp_path / "marker"
    fx.write_malicious_batch(folder / "data_batch_1", f"touch {marker}")
    with pytest.raises(VitcompressError) as err:
        load_split("cifar10", "train", root=tmp_path / "data")
    msg = _one_line(err)
    assert "refuses to unpickle" in msg and "system" in msg and "not a CIFAR batch file" in msg
    assert "data_batch_1" in msg
    assert not marker.exists()


def test_pickle_naming_builtins_eval_is_refused(tmp_path: Path) -> None:
    folder = fx.write_cifar10(tmp_path)
    # Protocol 2 GLOBAL opcode for builtins.eval, applied to a string: a hand-made poisoned pickle.
    payload = b"\x80\x02cbuiltins\neval\nX\x0c\x00\x00\x00__import__()\x85R."
    (folder / "test_batch").write_bytes(payload)
    with pytest.raises(VitcompressError, match=r"refuses to unpickle builtins\.eval"):
        load_split("cifar10", "test", root=tmp_path)


def test_truncated_cifar_batch(tmp_path: Path) -> None:
    folder = fx.write_cifar10(tmp_path)
    data = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(data[: len(data) // 2])
    with pytest.raises(VitcompressError) as err:
        load_split("cifar10", "test", root=tmp_path)
    msg = _one_line(err)
    assert "test_batch" in msg and "truncated or corrupt" in msg


def test_missing_cifar_root(tmp_path: Path) -> None:
    with pytest.raises(VitcompressError) as err:
        load_split("cifar10", "train", root=tmp_path / "nowhere")
    msg = _one_line(err)
    assert "cifar10 not found" in msg and "cifar-10-python.tar.gz" in msg and "--download" in msg


def test_incomplete_cifar_names_missing_batch(tmp_path: Path) -> None:
    folder = fx.write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(VitcompressError) as err:
        load_split("cifar10", "train", root=tmp_path)
    msg = _one_line(err)
    assert "incomplete" in msg and "data_batch_3" in msg


def test_cifar100_batch_in_cifar10_folder_is_rejected(tmp_path: Path) -> None:
    folder = fx.write_cifar10(tmp_path)
    # A batch whose labels are out of CIFAR-10's range must not load as CIFAR-10.
    bad = {b"data": fx.cifar_images(0, 2), b"labels": [3, 57]}
    with (folder / "test_batch").open("wb") as f:
        pickle.dump(bad, f, protocol=2)
    with pytest.raises(VitcompressError, match="labels outside 0..9"):
        load_split("cifar10", "test", root=tmp_path)


# --- Fashion-MNIST ---------------------------------------------------------------------------------


@needs_fashion
def test_real_fashion_mnist() -> None:
    train = load_split("fashion-mnist", "train")
    test = load_split("fashion-mnist", "test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(train.labels.bincount(minlength=10), torch.full((10,), 6000))
    assert int(test.labels.min()) == 0 and int(test.labels.max()) == 9
    assert train.source == str(FASHION_DIR)
    # Loading again comes from the in-process cache: same storage, not a second decode.
    again = load_split("fashion-mnist", "train")
    assert again.images.data_ptr() == train.images.data_ptr()


@pytest.mark.parametrize("layout", ["", "fashion-mnist", "FashionMNIST/raw"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_fixture_loads(tmp_path: Path, layout: str, suffix: str) -> None:
    folder = tmp_path / layout
    folder.mkdir(parents=True, exist_ok=True)
    images = fx.idx_images(5)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    fx.write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", images)
    fx.write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", labels)
    ds = load_split("fashion-mnist", "test", root=tmp_path)
    assert ds.source == str(folder)
    assert ds.images.shape == (5, 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels.tolist() == [3, 1, 4, 1, 5]


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_truncated_idx(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"t10k-images-idx3-ubyte{suffix}"
    fx.write_idx(path, fx.idx_images(5))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    fx.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))
    with pytest.raises(VitcompressError) as err:
        fm.read_idx(path)
    assert path.name in _one_line(err) and "truncated" in str(err.value)
    with pytest.raises(VitcompressError, match="truncated"):
        load_split("fashion-mnist", "test", root=tmp_path)


def test_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + b"\x00" * 40))  # type 0x0d is float
    with pytest.raises(VitcompressError, match="not an unsigned-byte idx file"):
        fm.read_idx(path)


def test_fashion_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "SYSTEM_DIRS", (tmp_path / "system",))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(VitcompressError) as err:
        load_split("fashion-mnist", "train", root=tmp_path / "mine")
    msg = _one_line(err)
    assert "Fashion-MNIST not found" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "--data-root" in msg and str(tmp_path / "mine") in msg


# --- datasets and loaders ----------------------------------------------------------------------------


def _index_dataset(n: int = 100) -> ImageTensorDataset:
    """Image i is filled with the value i, so a batch tells which images it holds."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 28, 28).contiguous()
    return ImageTensorDataset(images, torch.arange(n) % 10, DATASETS["fashion-mnist"], "train", "memory")


def _recover_indices(x: torch.Tensor) -> list[int]:
    info = DATASETS["fashion-mnist"]
    centre = x[:, 0, 14, 14] * info.std[0] + info.mean[0]  # crops move at most 3 px: the centre stays inside
    return torch.round(centre * 255).long().tolist()


def test_subset() -> None:
    ds = _index_dataset()
    sub = ds.subset([5, 2, 99])
    assert len(sub) == 3 and sub.info is ds.info
    assert sub.images[:, 0, 0, 0].tolist() == [5, 2, 99] and sub.labels.tolist() == [5, 2, 9]
    assert len(ds.subset(torch.arange(100) < 10)) == 10
    assert len(ds.subset([])) == 0
    with pytest.raises(VitcompressError, match="out of range"):
        ds.subset([100])


@needs_fashion
def test_loader_normalizes_fashion_test() -> None:
    loader = make_loader(load_split("fashion-mnist", "test"), 2500, train=False, img_size=28, in_chans=1)
    batches = list(loader)
    assert len(batches) == 4
    x, y = batches[0]
    assert x.shape == (2500, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs = torch.cat([b[0] for b in batches])
    assert abs(float(xs.mean())) < 0.02 and abs(float(xs.std()) - 1.0) < 0.03


def test_eval_loader_is_sequential() -> None:
    loader = make_loader(_index_dataset(), 16, train=False, img_size=28, in_chans=1)
    batches = list(loader)
    assert len(loader) == len(batches) == 7  # ceil(100 / 16): eval keeps the last partial batch
    assert batches[-1][0].shape[0] == 4
    assert sum((_recover_indices(x) for x, _ in batches), []) == list(range(100))
    assert torch.cat([y for _, y in batches]).tolist() == [i % 10 for i in range(100)]


def test_train_order_depends_on_seed_and_epoch() -> None:
    ds = _index_dataset()

    def run(seed: int, epoch: int) -> tuple[list[int], torch.Tensor]:
        loader = make_loader(ds, 16, train=True, img_size=28, in_chans=1, seed=seed, epoch=epoch)
        batches = list(loader)
        assert len(loader) == len(batches) == 6  # drop_last defaults to True for training
        return sum((_recover_indices(x) for x, _ in batches), []), torch.cat([x for x, _ in batches])

    order0, x0 = run(0, 0)
    order0_again, x0_again = run(0, 0)
    order1, _ = run(0, 1)
    order_seed, _ = run(1, 0)
    assert order0 == order0_again and torch.equal(x0, x0_again)  # augmentation reproduced too
    assert len(set(order0)) == 96 and order0 != sorted(order0)
    assert order1 != order0 and order_seed != order0

    # Iterating one loader twice gives the same epoch again (resume builds a fresh loader, same result).
    loader = make_loader(ds, 16, train=True, img_size=28, in_chans=1, epoch=3)
    first, second = list(loader), list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))
    loader_all = make_loader(ds, 16, train=True, img_size=28, in_chans=1, drop_last=False)
    assert sorted(sum((_recover_indices(x) for x, _ in loader_all), [])) == list(range(100))


def test_train_augmentation_is_crop_and_flip() -> None:
    info = DATASETS["cifar10"]
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=gen)
    transform = BatchTransform(info, 32, 3, train=True, seed=1)
    out = transform(images)
    # Undo normalization exactly enough to compare bytes.
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    back = torch.round((out * std + mean) * 255).to(torch.uint8)
    p = transform.pad
    assert p == 4
    padded = torch.nn.functional.pad(images, (p, p, p, p))
    found = []
    for k in range(images.shape[0]):
        matches = [
            (dy, dx, flip)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            for flip in (False, True)
            if torch.equal(
                back[k],
                padded[k, :, dy : dy + 32, dx : dx + 32].flip(-1)
                if flip
                else padded[k, :, dy : dy + 32, dx : dx + 32],
            )
        ]
        assert len(matches) == 1, f"image {k} is not one padded crop (flipped or not) of its input"
        found.append(matches[0])
    # Offsets and flips are drawn independently per image: with 32 images, all of
    # these hold except with negligible probability (and the seed is fixed).
    assert sum(m != (p, p, False) for m in found) >= 28
    assert 4 <= sum(flip for _, _, flip in found) <= 28
    assert sum(dy != dx for dy, dx, _ in found) >= 16


def test_resize_and_channel_repeat() -> None:
    ds = _index_dataset()
    loader = make_loader(ds, 8, train=False, img_size=56, in_chans=3)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 56, 56) and x.dtype == torch.float32 and y.shape == (8,)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    # Uniform images stay uniform under bilinear upsampling.
    info = DATASETS["fashion-mnist"]
    assert torch.allclose(x[5], torch.full((3, 56, 56), (5 / 255 - info.mean[0]) / info.std[0]), atol=1e-5)


def test_rgb_to_luminance(tmp_path: Path) -> None:
    fx.write_cifar10(tmp_path)
    ds = load_split("cifar10", "test", root=tmp_path)
    x = BatchTransform(ds.info, 16, 1, train=False)(ds.images[:2])
    assert x.shape == (2, 1, 16, 16)
    info = ds.info
    lum = torch.tensor(LUMINANCE)
    small = BatchTransform(ds.info, 32, 1, train=False)(ds.images[:1])
    rgb = torch.tensor([fx.pixel_value(1000, c, 3, 4) for c in range(3)], dtype=torch.float32) / 255
    gray_mean = float((lum * torch.tensor(info.mean)).sum())
    gray_std = float((lum * torch.tensor(info.std)).sum())
    expected = (float((lum * rgb).sum()) - gray_mean) / gray_std
    assert float(small[0, 0, 3, 4]) == pytest.approx(expected, abs=1e-5)


def test_unsupported_channels_and_batch_size() -> None:
    with pytest.raises(VitcompressError, match="only 1 <-> 3"):
        BatchTransform(DATASETS["cifar10"], 32, 2, train=False)
    with pytest.raises(VitcompressError, match="lower --batch-size"):
        make_loader(_index_dataset(10), 16, train=True, img_size=28, in_chans=1)
    with pytest.raises(VitcompressError, match="batch size"):
        make_loader(_index_dataset(10), 0, train=False, img_size=28, in_chans=1)
