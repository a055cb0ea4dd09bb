"""A user's images: image folders (layout, stray files, bad files, every Pillow mode), Hugging Face datasets,
the in-memory and streamed paths giving the same batches, and inputs prepared as the model says."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import FOLDER_CLASSES, folder_image, write_image_folder
from PIL import Image

from vitcompress.data import (
    DataConfig,
    FileImages,
    ImageTensorDataset,
    Preprocess,
    data_config_from_arg,
    from_hf_processor,
    from_timm_config,
    make_loader,
    open_source,
)
from vitcompress.data.files import decode_image
from vitcompress.errors import VitcompressError

PRE = Preprocess(24, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic", 28, "shortest", "timm")


def _source(root: Path, logs: list[str] | None = None, **cfg) -> object:
    return open_source(DataConfig(name="imagefolder", root=str(root), **cfg),
                       log=(logs.append if logs is not None else None))


def _batches(ds, bs: int = 4, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*make_loader(ds, bs, **kw))
    return torch.cat(xs), torch.cat(ys)


def test_folder_classes_modes_formats_and_stray_files(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", per_class={"bird": 5, "Cat": 4, "dog": 3})
    logs: list[str] = []
    src = _source(root, logs)
    assert src.classes == tuple(sorted(FOLDER_CLASSES)) == ("Cat", "bird", "dog")
    skipped = [m for m in logs if "not images" in m]
    # .DS_Store, Thumbs.db (beside the class folders) and notes.txt (in val): one line, counted.
    assert len(skipped) == 1 and "skipped 3 file(s)" in skipped[0], logs
    train, val = src.split("train", PRE), src.split("test", PRE)
    assert isinstance(train, ImageTensorDataset) and isinstance(val, ImageTensorDataset)
    assert len(train) == 12 and len(val) == 6
    assert train.images.shape == (12, 3, 24, 24) and train.images.dtype == torch.uint8
    # Labels follow the sorted class folders: Cat 0, bird 1, dog 2, in that order of files.
    assert train.labels.tolist() == [0] * 4 + [1] * 5 + [2] * 3
    # Every mode decoded to RGB: the greyscale PNG has equal channels, the colour ones do not.
    grey = [i for i in range(12) if bool((train.images[i, 0] == train.images[i, 1]).all())]
    assert 0 < len(grey) < 12


def test_decode_matches_timm_and_transformers_preprocessing(tmp_path: Path) -> None:
    import timm.data
    from transformers import ViTImageProcessor

    img = folder_image(3, (41, 29))
    # timm's eval transform: resize the shorter side to floor(24 / 0.875) = 27, centre crop 24, bicubic.
    cfg = {"input_size": (3, 24, 24), "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
           "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    pre = from_timm_config(cfg, 24, 3)
    assert (pre.resize, pre.resize_mode, pre.interpolation, pre.source) == (27, "shortest", "bicubic", "timm")
    ours = decode_image(img, pre).float().div(255)
    ours = (ours - torch.tensor(pre.mean).view(3, 1, 1)) / torch.tensor(pre.std).view(3, 1, 1)
    theirs = timm.data.create_transform(**timm.data.resolve_data_config(cfg), is_training=False)(img)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # transformers' ViTImageProcessor: squash to 24x24 with Pillow, rescale, normalise.
    proc = ViTImageProcessor(size={"height": 24, "width": 24}, resample=3, image_mean=[0.5, 0.4, 0.3],
                             image_std=[0.2, 0.25, 0.3])
    proc.save_pretrained(tmp_path)
    pre, warn = from_hf_processor(tmp_path, 3, 24)
    assert warn is None and (pre.resize_mode, pre.interpolation, pre.source) == ("squash", "bicubic", "hf")
    ours = decode_image(img, pre).float().div(255)
    ours = (ours - torch.tensor(pre.mean).view(3, 1, 1)) / torch.tensor(pre.std).view(3, 1, 1)
    theirs = torch.as_tensor(proc(images=img, return_tensors="np")["pixel_values"][0])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_streamed_and_in_memory_give_the_same_batches(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", per_class={"bird": 7, "Cat": 6, "dog": 6}, val_per_class=3)
    mem = _source(root)
    stream = _source(root, memory_budget_mb=0, workers=1)
    for split in ("train", "test"):
        a, b = mem.split(split, PRE), stream.split(split, PRE)
        assert isinstance(a, ImageTensorDataset) and isinstance(b, FileImages)
        for kw in ({"train": False}, {"train": True, "seed": 3, "epoch": 2}):
            xa, ya = _batches(a, **kw)
            xb, yb = _batches(b, **kw)
            assert torch.equal(xa, xb) and torch.equal(ya, yb), (split, kw)
    # Subsets (calibration slices, the search's carve-out) stream too.
    sub = stream.split("train", PRE).subset(torch.tensor([4, 0, 9]))
    assert isinstance(sub, FileImages) and len(sub) == 3
    torch.testing.assert_close(_batches(sub, train=False)[0],
                               _batches(mem.split("train", PRE).subset(torch.tensor([4, 0, 9])), train=False)[0])


def test_memory_budget_decides_and_the_log_says_which(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", per_class={"bird": 4, "Cat": 4, "dog": 4}, val_per_class=2)
    per_image = 3 * 24 * 24
    logs: list[str] = []
    # Room for the test split only: it is held in memory first (every row reads it), train streams.
    src = _source(root, logs, memory_budget_mb=(6 * per_image + 10) / 2**20)
    assert isinstance(src.split("test", PRE), ImageTensorDataset)
    assert isinstance(src.split("train", PRE), FileImages)
    plan = [m for m in logs if "memory budget" in m]
    assert len(plan) == 1 and "train 12 images" in plan[0] and "-> stream" in plan[0] and "-> memory" in plan[0]


def test_a_corrupt_image_is_named_or_skipped_and_counted(tmp_path: Path, caplog) -> None:
    root = write_image_folder(tmp_path / "d", per_class={"bird": 4, "Cat": 4, "dog": 4})
    bad = root / "train" / "dog" / "broken.png"
    good = next((root / "train" / "dog").glob("*.png"))
    bad.write_bytes(good.read_bytes()[:60])  # a truncated PNG: the header reads, the pixels do not
    (root / "train" / "Cat" / "empty.jpg").write_bytes(b"")
    for budget in (2048.0, 0.0):  # in memory: found while decoding; streamed: the header check, then decoding
        with pytest.raises(VitcompressError, match=r"cannot decode image .*(broken\.png|empty\.jpg).*skip_bad_images"):
            src = _source(root, memory_budget_mb=budget, workers=0)
            _batches(src.split("train", PRE), train=False)
    logs: list[str] = []
    src = _source(root, logs, memory_budget_mb=2048, skip_bad_images=True)
    ds = src.split("train", PRE)
    assert len(ds) == 12  # 14 files, 2 that do not decode
    assert any("skipped 2 image(s)" in m for m in logs), logs
    # Streamed: the unreadable header is dropped before the first epoch, the truncated one when read.
    logs = []
    src = _source(root, logs, memory_budget_mb=0, skip_bad_images=True, workers=0)
    with pytest.warns(UserWarning, match="skipped 1 image"):
        x, y = _batches(src.split("train", PRE), train=False)
    assert len(y) == 12 and any("skipped 1 file(s) that are not readable" in m for m in logs), logs


def test_layout_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(VitcompressError, match="does not exist"):
        _source(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(VitcompressError, match="no train/ folder"):
        _source(tmp_path / "flat")
    root = write_image_folder(tmp_path / "d")
    (root / "val" / "zebra").mkdir()
    with pytest.raises(VitcompressError, match="class folder 'zebra', which train/ does not have"):
        _source(root)
    with pytest.raises(VitcompressError, match="data.root is required"):
        DataConfig(name="imagefolder")


def test_an_empty_class_keeps_its_label_and_no_val_folder_needs_val_split(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d", per_class={"bird": 6, "Cat": 0, "dog": 6})
    import shutil

    shutil.rmtree(root / "val")
    with pytest.raises(VitcompressError, match="val_split: 0.1"):
        _source(root)
    logs: list[str] = []
    src = _source(root, logs, val_split=0.25)
    assert src.classes == ("Cat", "bird", "dog")  # "Cat" has no image and keeps label 0
    assert any("no training image: Cat" in m for m in logs), logs
    train, val = src.split("train", PRE), src.split("test", PRE)
    assert (len(train), len(val)) == (9, 3)
    assert set(train.labels.tolist()) | set(val.labels.tolist()) == {1, 2}
    again = _source(root, val_split=0.25).split("test", PRE)  # seeded: the same carve every time
    assert torch.equal(again.images, val.images)


def test_data_argument(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d")
    assert data_config_from_arg(str(root)).name == "imagefolder"
    assert data_config_from_arg(f"hf:{root}").name == "hf"
    assert data_config_from_arg("Fashion_MNIST").name == "fashion-mnist"
    with pytest.raises(VitcompressError, match="not a folder or a known dataset"):
        data_config_from_arg(str(tmp_path / "missing"))


def test_hugging_face_dataset_saved_to_disk_matches_the_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    logging.getLogger("datasets").setLevel(logging.ERROR)
    root = write_image_folder(tmp_path / "d", per_class={"bird": 4, "Cat": 4, "dog": 4}, val_per_class=2)
    folder = _source(root)
    built = datasets.load_dataset("imagefolder", data_dir=str(root))
    built.save_to_disk(str(tmp_path / "saved"))
    hf = open_source(DataConfig(name="hf", root=str(tmp_path / "saved")))
    assert hf.classes == folder.classes
    for split in ("train", "test"):
        a, b = folder.split(split, PRE), hf.split(split, PRE)
        # The same images, possibly in another order: compare as sorted sets of (label, bytes).
        key = lambda ds: sorted((int(y), bytes(x.numpy().tobytes())) for x, y in zip(ds.images, ds.labels))  # noqa: E731
        assert key(a) == key(b), split
    # A dataset without a test split needs val_split; a bad column name is one line.
    with pytest.raises(VitcompressError, match="no image column 'pixels'"):
        open_source(DataConfig(name="hf", root=str(tmp_path / "saved"), image_column="pixels"))
    only_train = datasets.DatasetDict({"train": built["train"]})
    only_train.save_to_disk(str(tmp_path / "train_only"))
    with pytest.raises(VitcompressError, match="val_split"):
        open_source(DataConfig(name="hf", root=str(tmp_path / "train_only")))
    carved = open_source(DataConfig(name="hf", root=str(tmp_path / "train_only"), val_split=0.25))
    assert len(carved.split("test", PRE)) == 3


def test_from_scratch_model_on_a_folder_uses_its_statistics(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "d")
    src = _source(root)
    geometry = Preprocess(24, 3, (0.5,) * 3, (0.5,) * 3)
    mean, std = src.statistics(geometry)
    pixels = src.split("train", geometry).images.double().div(255)
    assert np.allclose(mean, pixels.mean(dim=(0, 2, 3)).numpy(), atol=1e-6)
    assert np.allclose(std, pixels.std(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-6)
