"""How images become a model's input: size, resize, crop, interpolation, mean and std.

A pretrained or user model was trained on inputs prepared one particular way, and it only
gives its accuracy on inputs prepared that way; so its `Preprocess` comes from the model's
own configuration: timm's ``pretrained_cfg`` (what ``timm.data.resolve_data_config`` reads)
or a Hugging Face checkpoint's ``preprocessor_config.json``. A model trained here from
scratch is fed as the study always fed it: normalised with the training split's statistics.

How the fields are applied:

* files (an image folder, a Hugging Face dataset): each image is decoded by Pillow, converted
  to the model's channels, resized (``resize_mode`` "shortest": the shorter side to ``resize``,
  keeping the aspect ratio, as timm's ``crop_mode="center"``; "squash": to ``resize`` x
  ``resize``, as Hugging Face's ``size: {height, width}`` and timm's ``crop_mode="squash"``)
  with ``interpolation``, then centre-cropped to ``input_size``;
* the bundled datasets (28/32 px arrays): each image is scaled whole to ``input_size`` with
  ``interpolation`` (the usual way to feed CIFAR to a 224 px ViT); ``resize`` does not apply;
* then, for both, pixels are scaled to [0, 1] and normalised with ``mean`` and ``std``.

The artifact's meta stores it (``meta["preprocess"]``), the report prints it, and exports
carry it, so what a deployment must do to an image is written down once, next to the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from ..errors import VitcompressError

__all__ = ["INTERPOLATIONS", "LUMINANCE", "Preprocess", "dataset_preprocess", "from_hf_processor", "from_timm_config"]

# ITU-R BT.601 luma weights, the ones torchvision's rgb_to_grayscale uses.
LUMINANCE: tuple[float, float, float] = (0.299, 0.587, 0.114)

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
INTERPOLATIONS: tuple[str, ...] = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
# Pillow's resampling numbers, which Hugging Face image processors store as "resample".
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class Preprocess:
    """One model's input recipe; ``source`` says where it came from (dataset, timm, hf)."""

    input_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: Interpolation = "bilinear"
    resize: int | None = None  # files only: the size before the centre crop (None: input_size)
    resize_mode: Literal["shortest", "squash"] = "shortest"
    source: Literal["dataset", "timm", "hf"] = "dataset"

    def __post_init__(self) -> None:
        if int(self.input_size) != self.input_size or not 1 <= self.input_size <= 4096:
            raise VitcompressError(f"preprocess: input size must be an integer in [1, 4096], got {self.input_size!r}")
        if self.in_chans not in (1, 3):
            raise VitcompressError(f"preprocess: in_chans must be 1 or 3, got {self.in_chans!r}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise VitcompressError(f"preprocess: mean and std need {self.in_chans} values (one per channel), got "
                                   f"{list(self.mean)} and {list(self.std)}")
        if not all(math.isfinite(m) for m in self.mean) or not all(math.isfinite(s) and s > 0 for s in self.std):
            raise VitcompressError(f"preprocess: mean must be finite and std positive, got {list(self.mean)} and "
                                   f"{list(self.std)}")
        if self.interpolation not in INTERPOLATIONS:
            raise VitcompressError(f"preprocess: interpolation must be one of {', '.join(INTERPOLATIONS)}, got "
                                   f"{self.interpolation!r}")
        if self.resize is not None and self.resize < self.input_size:
            raise VitcompressError(f"preprocess: resize ({self.resize}) must be at least the input size "
                                   f"({self.input_size}): the centre crop cannot be larger than the image")

    @property
    def resize_to(self) -> int:
        return self.input_size if self.resize is None else int(self.resize)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VitcompressError(f"preprocess: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        kw = dict(data)
        kw["mean"], kw["std"] = tuple(float(v) for v in kw["mean"]), tuple(float(v) for v in kw["std"])
        return cls(**kw)

    def describe(self) -> str:
        """One line for logs and reports."""
        fmt = lambda vals: "(" + ", ".join(f"{v:.4g}" for v in vals) + ")"  # noqa: E731
        size = (f"resize {'shorter side to ' if self.resize_mode == 'shortest' else ''}{self.resize_to}"
                f"{'x' + str(self.resize_to) if self.resize_mode == 'squash' else ''}, centre crop "
                f"{self.input_size}" if self.resize_to != self.input_size else f"{self.input_size} px")
        return (f"{size}, {self.interpolation}, {self.in_chans} ch, mean {fmt(self.mean)}, std {fmt(self.std)} "
                f"(from {self.source})")


def dataset_preprocess(mean: tuple[float, ...], std: tuple[float, ...], input_size: int,
                       in_chans: int) -> Preprocess:
    """A from-scratch model's inputs: the training split's statistics, converted to the model's channels.

    1 -> 3 channels repeats the grey statistics; 3 -> 1 takes the luminance of the RGB ones: the
    mean of a weighted sum is the weighted sum of the means (exact); the std is the weighted sum of
    the stds only if the channels were perfectly correlated, an upper bound that is close for natural
    images.
    """
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) == 1 and in_chans == 3:
        mean, std = mean * 3, std * 3
    elif len(mean) == 3 and in_chans == 1:
        mean = (sum(w * m for w, m in zip(LUMINANCE, mean)),)
        std = (sum(w * s for w, s in zip(LUMINANCE, std)),)
    return Preprocess(int(input_size), int(in_chans), mean, std, "bilinear", None, "shortest", "dataset")


def from_timm_config(cfg: dict[str, Any], input_size: int, in_chans: int) -> Preprocess:
    """From timm's data config (``resolve_data_config`` / a ``pretrained_cfg``), at the model's input size.

    timm's eval transform resizes to ``floor(input_size / crop_pct)`` then crops ``input_size``
    (``timm.data.transforms_factory.transforms_imagenet_eval``); ``crop_mode`` "center" resizes the
    shorter side, "squash" both sides. "border" (crop then pad) is not a resize we do: refused.
    """
    mean = tuple(float(v) for v in cfg.get("mean") or (0.485, 0.456, 0.406))
    std = tuple(float(v) for v in cfg.get("std") or (0.229, 0.224, 0.225))
    if in_chans == 1 and len(mean) == 3:  # timm averages a pretrained RGB stem into one channel; so the stats
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    elif in_chans == 3 and len(mean) == 1:
        mean, std = mean * 3, std * 3
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    mode = cfg.get("crop_mode") or "center"
    if mode not in ("center", "squash"):
        raise VitcompressError(f"timm crop_mode {mode!r} is not supported (center or squash); set the model's "
                               "pretrained_cfg crop_mode, or preprocess: dataset")
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation not in INTERPOLATIONS:  # timm's "random" and the like are training-time choices
        interpolation = "bicubic"
    resize = math.floor(input_size / crop_pct) if crop_pct < 1 else None
    return Preprocess(int(input_size), int(in_chans), mean, std, interpolation, resize,
                      "shortest" if mode == "center" else "squash", "timm")


def _hf_size(size: Any, what: str) -> tuple[int, Literal["shortest", "squash"]]:
    if isinstance(size, int):
        return size, "squash"
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise VitcompressError(f"preprocessor {what} is {size['height']}x{size['width']}; only square "
                                       "inputs are supported")
            return int(size["height"]), "squash"
        if "shortest_edge" in size and "longest_edge" not in size:
            return int(size["shortest_edge"]), "shortest"
    raise VitcompressError(f"preprocessor {what} {size!r} is not supported (height/width or shortest_edge)")


def from_hf_processor(path: str | Path, in_chans: int, image_size: int) -> tuple[Preprocess, str | None]:
    """From a Hugging Face checkpoint's ``preprocessor_config.json``; and a warning when it is missing.

    Mirrors ``ViTImageProcessor`` / ``DeiTImageProcessor``: Pillow resize to ``size`` with
    ``resample``, then (``do_center_crop``) a centre crop to ``crop_size``, rescale by 1/255 and
    normalise. Without the file, ``ViTImageProcessor``'s defaults at the model's image size
    (mean and std 0.5, bilinear).
    """
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        return (Preprocess(image_size, in_chans, (0.5,) * in_chans, (0.5,) * in_chans, "bilinear", None, "squash",
                           "hf"),
                f"{path} has no preprocessor_config.json: inputs are prepared as ViTImageProcessor's defaults "
                f"({image_size} px, bilinear, mean and std 0.5)")
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise VitcompressError(f"cannot read {file}: {exc}; fix or delete it") from None
    if not isinstance(cfg, dict):
        raise VitcompressError(f"{file} is not a JSON object; fix or delete it")
    if cfg.get("do_rescale", True) is False or abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise VitcompressError(f"{file}: only the usual rescale by 1/255 is supported")
    resize, mode = (_hf_size(cfg.get("size", image_size), "size") if cfg.get("do_resize", True)
                    else (image_size, "squash"))
    crop = resize
    if cfg.get("do_center_crop"):
        crop, _ = _hf_size(cfg.get("crop_size", image_size), "crop_size")
    if crop != image_size:
        raise VitcompressError(f"{file} prepares {crop} px inputs but the model takes {image_size} px; fix one "
                               "of them")
    if cfg.get("do_normalize", True):
        mean = tuple(float(v) for v in cfg.get("image_mean", (0.5, 0.5, 0.5)))
        std = tuple(float(v) for v in cfg.get("image_std", (0.5, 0.5, 0.5)))
    else:
        mean, std = (0.0,) * in_chans, (1.0,) * in_chans
    if len(mean) != in_chans:
        if len(mean) == 3 and in_chans == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        elif len(mean) == 1:
            mean, std = mean * in_chans, std * in_chans
    interpolation = _PIL_RESAMPLE.get(int(cfg.get("resample", 2)), "bilinear")
    return Preprocess(int(crop), in_chans, mean, std, interpolation, resize if resize != crop else None, mode,
                      "hf"), None
