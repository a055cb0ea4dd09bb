"""Batched input pipeline: uint8 batches in, normalized float batches out.

On a machine with two CPU cores, per-image PIL transforms in worker processes
would cost more than a small ViT's forward pass. A split in memory is gathered
with one indexing operation and transformed as one tensor; a split too large for
memory is decoded image by image by worker processes (only what must be done per
image: decode, resize, crop, see :mod:`.files`) and transformed the same way.

Augmentation is the usual small-image recipe (pad-and-random-crop plus
horizontal flip, as in He et al. 2016, "Deep Residual Learning", section 4.2),
applied at native resolution before resizing, so that a model that takes
larger inputs sees the same augmentation scaled up.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from vitcompress.data.dataset import DatasetInfo, ImageTensorDataset
from vitcompress.data.files import FileImages, bad_image_error, iter_decoded
from vitcompress.data.preprocess import LUMINANCE, Preprocess, dataset_preprocess
from vitcompress.errors import VitcompressError

__all__ = ["LUMINANCE", "BatchTransform", "make_loader"]

# A preprocess's interpolation on whole tensors (the bundled datasets' small arrays): F.interpolate's
# mode, and whether it may antialias. Pillow's box, hamming and lanczos filters have no tensor twin:
# antialiased bilinear and bicubic are the nearest.
_TENSOR_MODES: dict[str, tuple[str, bool]] = {
    "nearest": ("nearest", False), "bilinear": ("bilinear", True), "bicubic": ("bicubic", True),
    "box": ("bilinear", True), "hamming": ("bilinear", True), "lanczos": ("bicubic", True),
}


class BatchTransform:
    """uint8 (B, C, H, W) -> float32 (B, in_chans, img_size, img_size), normalized.

    Steps: random crop with zero padding and random horizontal flip (only when
    ``train``), scale to [0, 1], convert channels (1 -> 3 by repeating, 3 -> 1
    by luminance), normalize with the `Preprocess` mean and std (the dataset's own
    statistics when none is given), and resize with the preprocess's interpolation
    (antialiased when shrinking) if ``img_size`` is not the stored size.

    ``info`` describes the stored images (their channels and native size); images
    decoded from files are stored at the model's input size already, so for them the
    resize does nothing.

    Randomness comes from the ``generator`` passed to the call, or else from one
    the transform owns, seeded with ``seed``; either way a run is repeatable.
    """

    def __init__(
        self, info: DatasetInfo, img_size: int, in_chans: int, train: bool, *, seed: int = 0,
        preprocess: Preprocess | None = None,
    ) -> None:
        if int(img_size) != img_size or img_size < 1:
            raise VitcompressError(f"image size must be a positive integer, got {img_size!r}")
        if in_chans != info.in_chans and (info.in_chans, in_chans) not in ((1, 3), (3, 1)):
            raise VitcompressError(
                f"{info.name} has {info.in_chans} channel(s) and the model wants {in_chans}; "
                "only 1 <-> 3 channel conversion is supported: use a model with in_chans 1 or 3"
            )
        if preprocess is None:
            if info.mean is None or info.std is None:
                raise VitcompressError(f"{info.name} has no statistics of its own; pass the model's preprocess")
            preprocess = dataset_preprocess(info.mean, info.std, img_size, in_chans)
        if (preprocess.input_size, preprocess.in_chans) != (int(img_size), in_chans):
            raise VitcompressError(
                f"the preprocess prepares {preprocess.in_chans}x{preprocess.input_size} inputs but "
                f"{in_chans}x{img_size} were asked for; the data and the model disagree"
            )
        self.info = info
        self.img_size = int(img_size)
        self.in_chans = in_chans
        self.train = train
        self.preprocess = preprocess
        self.pad = max(2, info.img_size // 8)
        mean = torch.tensor(preprocess.mean, dtype=torch.float32)
        std = torch.tensor(preprocess.std, dtype=torch.float32)
        self._luminance = (torch.tensor(LUMINANCE, dtype=torch.float32).view(1, 3, 1, 1)
                           if info.in_chans == 3 and in_chans == 1 else None)
        # 1 -> 3 channels with equal statistics per channel: normalize the one channel, then repeat (cheaper).
        self._repeat_first = info.in_chans == 1 and in_chans == 3 and not (
            bool((mean == mean[0]).all()) and bool((std == std[0]).all()))
        if info.in_chans == 1 and in_chans == 3 and not self._repeat_first:
            mean, std = mean[:1], std[:1]
        self._mean = mean.view(1, -1, 1, 1)
        self._std = std.view(1, -1, 1, 1)
        self._mode, self._antialias_ok = _TENSOR_MODES[preprocess.interpolation]
        self._generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != self.info.in_chans:
            raise ValueError(
                f"expected uint8 (B, {self.info.in_chans}, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if self.train:
            images = self._random_crop_flip(images, generator if generator is not None else self._generator)
        x = images.float().div_(255.0)
        if self._luminance is not None:
            x = (x * self._luminance).sum(dim=1, keepdim=True)  # (B, 1, H, W)
        if self._repeat_first:
            x = x.expand(-1, 3, -1, -1).contiguous()  # (B, 3, H, W)
        x = x.sub_(self._mean).div_(self._std)
        h, w = x.shape[-2:]
        if (h, w) != (self.img_size, self.img_size):
            # Interpolation weights sum to one, so resizing after normalizing equals resizing before.
            x = F.interpolate(
                x,
                size=(self.img_size, self.img_size),
                mode=self._mode,
                align_corners=False if self._mode != "nearest" else None,
                antialias=self._antialias_ok and self.img_size < min(h, w),
            )
        if self.in_chans == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()  # (B, 3, S, S)
        return x

    def _random_crop_flip(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = images.shape
        p = self.pad
        padded = F.pad(images, (p, p, p, p))  # zeros: black border, as torchvision's RandomCrop(padding=p)
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        flip = torch.rand(b, generator=generator) < 0.5
        rows = dy[:, None] + torch.arange(h)  # (B, H)
        cols = dx[:, None] + torch.arange(w)  # (B, W)
        # Reading the crop's columns right to left is the horizontal flip; crop and flip in one gather.
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        return (
            f"BatchTransform({self.info.name}: {self.info.in_chans}x{self.info.img_size} -> "
            f"{self.in_chans}x{self.img_size}, train={self.train}, pad={self.pad})"
        )


def _derive_seed(*parts: int) -> int:
    # A stable hash (unlike hash(), the same in every process) so (seed, epoch) fixes the stream.
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class _EpochBatches(Sampler):
    """Yields the index tensor of each batch of one epoch, and transforms the gathered batch.

    Both the order and the augmentation are reseeded from (seed, epoch) at the
    start of every pass, so iterating the loader again, or building a new one
    for the same epoch after a resume, gives the same batches.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        epoch: int,
        transform: BatchTransform,
    ) -> None:
        self.n = n
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = epoch
        self.transform = transform
        self._aug = torch.Generator()

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.shuffle:
            order_gen = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch, 0))
            order = torch.randperm(self.n, generator=order_gen)
        else:
            order = torch.arange(self.n)
        self._aug.manual_seed(_derive_seed(self.seed, self.epoch, 1))
        for i in range(len(self)):
            yield order[i * self.batch_size : (i + 1) * self.batch_size]

    def collate(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        return self.transform(images, generator=self._aug), labels


class _StreamedLoader:
    """Batches of a `FileImages` split: worker processes decode the images of each batch of indices
    (in the sampler's order), the main process augments and normalizes the whole batch, with the
    same generator and in the same order as for an in-memory split, so both give the same batches."""

    def __init__(self, ds: FileImages, batches: _EpochBatches) -> None:
        self.ds = ds
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        skipped: list[str] = []
        index_batches = (b.tolist() for b in self.batches)  # iterating the sampler reseeds the augmentation
        for images, labels, _, errors in iter_decoded(self.ds, index_batches, self.ds.workers):
            if errors and not self.ds.skip_bad:
                raise bad_image_error(errors[0])
            skipped += errors
            if len(labels):
                yield self.batches.transform(images, generator=self.batches._aug), labels
        if skipped:
            warnings.warn(f"skipped {len(skipped)} image(s) of {self.ds.info.name} {self.ds.split} that do not "
                          f"decode (data.skip_bad_images), e.g. {skipped[0][:200]}", stacklevel=2)


def make_loader(
    ds: ImageTensorDataset | FileImages,
    batch_size: int,
    *,
    train: bool,
    img_size: int | None = None,
    in_chans: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool | None = None,
    augment: bool | None = None,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """A loader of ``(x float32 (B, in_chans, img_size, img_size), y int64 (B,))`` batches.

    ``train=True`` shuffles and augments, with the order and augmentation of
    epoch ``epoch`` fixed by ``(seed, epoch)``; ``train=False`` keeps the
    dataset order and does not augment. ``drop_last`` and ``augment`` default to ``train``.

    The inputs are prepared as ``ds.preprocess`` says (the model's own recipe); without one,
    with the dataset's statistics at ``img_size`` and ``in_chans``. A split in memory is
    gathered and transformed whole in the main process, with no workers; a streamed split
    (`FileImages`) is decoded by its worker processes, then transformed the same way.
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise VitcompressError(f"batch size must be a positive integer, got {batch_size!r}")
    preprocess = ds.preprocess
    if preprocess is not None:
        img_size = preprocess.input_size if img_size is None else img_size
        in_chans = preprocess.in_chans if in_chans is None else in_chans
    if img_size is None or in_chans is None:
        raise VitcompressError(f"{ds.info.name} {ds.split} is not prepared for a model: pass img_size and in_chans")
    drop_last = train if drop_last is None else drop_last
    augment = train if augment is None else augment
    transform = BatchTransform(ds.info, img_size, in_chans, augment, seed=seed, preprocess=preprocess)
    batches = _EpochBatches(
        len(ds),
        int(batch_size),
        shuffle=train,
        drop_last=drop_last,
        seed=seed,
        epoch=epoch,
        transform=transform,
    )
    if len(batches) == 0 and len(ds) > 0:
        raise VitcompressError(
            f"{ds.info.name} {ds.split} has {len(ds)} images, fewer than the batch size {batch_size}, "
            "and the last partial batch is dropped, so there is nothing to train on; lower --batch-size"
        )
    if isinstance(ds, FileImages):
        return _StreamedLoader(ds, batches)
    # batch_size=None: the sampler already yields whole batches of indices, and
    # ImageTensorDataset gathers a batch from an index tensor in one operation.
    return DataLoader(ds, batch_size=None, sampler=batches, collate_fn=batches.collate, num_workers=0)
