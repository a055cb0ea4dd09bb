"""Models: any timm model by name (pretrained tags and ``hf-hub:`` names included), a Hugging Face
transformers ViT/DeiT classifier (converted to timm, :mod:`.hf`), and the small presets in :mod:`.presets`.

Weights come from the hub when ``pretrained`` is set and the machine is online, from
a transformers model folder, or from a local file (``checkpoint``): a ``.safetensors``
file, or a ``.pth``/``.pt``/``.bin`` file loaded with ``torch.load(weights_only=True)``
so that a checkpoint cannot run code. A local file for a timm model goes through timm's
own loading path, which resamples the position embedding to another ``img_size`` and
re-initialises a head of another class count.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..data.preprocess import Preprocess
from ..errors import VitcompressError, not_a_file
from . import presets as _presets  # noqa: F401  (registers the presets with timm)
from .hf import is_hf_folder, looks_like_hub_id
from .presets import PRESETS


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model: a timm name and the arguments that shape it."""

    name: str
    num_classes: int = 10
    img_size: int = 28
    in_chans: int = 1
    pretrained: bool = False
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_vitcompress_model(name: str) -> bool:
    """A model registered by vitcompress (the presets, the generic ``vitc_vit`` / ``vitc_deit``, the students)."""
    try:
        return timm.models.model_entrypoint(name).__module__.startswith("vitcompress.")
    except (RuntimeError, KeyError, ValueError):
        return False


def model_kind(name: str) -> str | None:
    """Where a model name points: "vitcompress" (a preset or a student entry point), "timm" (any timm model,
    a pretrained tag included), "timm-hub" (``hf-hub:org/name``, online), "hf" (a transformers folder, or a
    hub id ``org/name`` that is fetched when online), or None for nothing known."""
    if not isinstance(name, str) or not name:
        return None
    if name in PRESETS or is_vitcompress_model(name):
        return "vitcompress"
    if name.startswith("hf-hub:") and len(name) > len("hf-hub:"):
        return "timm-hub"
    if is_hf_folder(name):
        return "hf"
    if timm.is_model(name):
        return "timm"
    if looks_like_hub_id(name):
        return "hf"
    return None


def is_known_model(name: str) -> bool:
    return model_kind(name) is not None


def unknown_model_error(name: str, what: str = "model") -> VitcompressError:
    """The one-line error for a name that points nowhere, with similar timm names."""
    stem = name.split("_")[0].split(".")[0].split("/")[-1]
    close = timm.list_models(f"*{stem}*")[:5] if stem else []
    hint = f" (similar: {', '.join(close)})" if close else ""
    path = Path(name).expanduser()
    if path.is_dir():
        return VitcompressError(f"{what} folder {name} has no transformers config.json (with model_type); pass a "
                                "folder written by save_pretrained")
    if path.exists():
        return VitcompressError(f"{what} {name} is a file; pass a model name and set its checkpoint to the file")
    return VitcompressError(f"unknown {what} '{name}'{hint}; use a timm model name (a pretrained tag such as "
                            f"'.augreg_in21k' allowed), hf-hub:org/name, a transformers model folder, or a preset: "
                            f"{', '.join(PRESETS)}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    problem = not_a_file(path)
    if problem is not None:
        raise VitcompressError(f"checkpoint {path} {problem}; pass the path of a .safetensors or .pth file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():
                # torch warns about pickle protocols on stderr before refusing a file; the error says it all.
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or a pickle that wants to run code
        if "Weights only load failed" in str(exc):  # torch's words; its advice (weights_only=False) is not ours
            raise VitcompressError(
                f"cannot read checkpoint {path}: it holds Python objects other than tensors, which are not "
                "loaded (that could run code); pass a .safetensors file or a torch.save'd state dict of tensors"
            ) from None
        raise VitcompressError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {(str(exc).splitlines() or ['empty or truncated file'])[0][:200]}; "
            "pass a .safetensors file or a torch.save'd state dict of tensors"
        ) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_ema"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise VitcompressError(f"checkpoint {path} holds no state dict of tensors; save one with model.state_dict()")
    check_finite(state, f"checkpoint {path}")
    return state


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN or inf, naming them: a damaged file or a training that diverged, which every
    later step would otherwise blame on itself (a study once told the user to lower the learning rate)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise VitcompressError(f"{what} holds non-finite values (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[0]}; "
                               "the file is damaged or its training diverged: pass another one")


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Load a state dict from ``path`` into ``model``; a shape or key mismatch is a one-line error."""
    state = _read_state_dict(Path(path))
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        first = str(exc).split("\n")[0]
        detail = " ".join(str(exc).split("\n")[1:3]).strip()
        raise VitcompressError(
            f"checkpoint {path} does not fit model {type(model).__name__}: {first} {detail[:200]}; "
            "check the model name, num_classes, img_size and in_chans of the recipe"
        ) from None
    return model


def create_model(spec: ModelSpec) -> nn.Module:
    """Build the model a spec names; weights from the hub (online) or the spec's checkpoint.

    The spec's architecture is rebuilt as is (an artifact's structure); for a model brought by a
    user (a transformers folder, ``hf-hub:``) use :func:`load_model`, which also reads its input
    recipe and class names.
    """
    kind = model_kind(spec.name)
    if kind is None:
        raise unknown_model_error(spec.name)
    if kind in ("hf", "timm-hub"):
        return load_model(spec.name, num_classes=spec.num_classes, img_size=spec.img_size, in_chans=spec.in_chans,
                          pretrained=spec.pretrained, checkpoint=spec.checkpoint, kwargs=spec.kwargs).model
    kwargs = dict(num_classes=spec.num_classes, img_size=spec.img_size, in_chans=spec.in_chans, **spec.kwargs)
    if kind == "timm" and spec.checkpoint is not None:
        return _timm_from_file(spec.name, spec.checkpoint, kwargs)[0]
    pretrained = spec.pretrained and spec.checkpoint is None and kind == "timm"
    model = _timm_create(spec.name, pretrained, kwargs)
    if spec.checkpoint is not None:
        _load_own_checkpoint(model, spec.name, Path(spec.checkpoint))
    return model


def _timm_create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    from .hf import hub_reachable

    try:
        if pretrained and not hub_reachable():
            raise ConnectionError("the hub is not reachable")
        return _create_sized(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise VitcompressError(f"model '{name}' rejects its arguments: {exc}; check the recipe's model kwargs") from None
    except Exception as exc:
        if pretrained:
            raise VitcompressError(
                f"cannot fetch pretrained weights for '{name}' ({type(exc).__name__}); when offline, download "
                "the weights elsewhere and set the checkpoint to the local .safetensors/.pth file"
            ) from None
        raise


def _create_sized(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model``; a model that takes any input size (a CNN) has no ``img_size`` argument: drop it."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc) or "img_size" not in kwargs:
            raise
        kwargs.pop("img_size")
        return timm.create_model(name, **kwargs)


def _load_own_checkpoint(model: nn.Module, name: str, path: Path) -> None:
    """A vitcompress model's weights from a file: a head of another class count is re-initialised."""
    state = _read_state_dict(path)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        for key in ("head.weight", "head.bias"):
            if key in state and state[key].shape != model.state_dict()[key].shape:
                state.pop(key)
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if not bad:
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith("head.")] + list(unexpected)
    if bad:
        raise VitcompressError(
            f"checkpoint {path} does not fit model '{name}' ({len(bad)} mismatched keys, e.g. {bad[0]}); "
            "check the model name and img_size"
        )


def checkpoint_head_classes(path: str | Path) -> int | None:
    """Rows of a checkpoint's classifier (``head.weight``, timm's name), or None where it has none."""
    state = _read_state_dict(Path(path))
    for key in ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight"):
        if key in state and state[key].dim() == 2:
            return int(state[key].shape[0])
    return None


def _timm_from_file(name: str, checkpoint: str, kwargs: dict[str, Any]) -> tuple[nn.Module, int | None]:
    """A timm model with weights from a local file, through timm's own loading parts: ``load_checkpoint``
    reads the file (safetensors, or ``torch.load(weights_only=True)``; ``state_dict`` / ``model`` / EMA keys),
    the model family's ``checkpoint_filter_fn`` converts it (resampling the position embedding for another
    img_size), a head of another class count is dropped (re-initialised) and a patch projection for other
    channels adapted (``adapt_input_conv``). Unlike timm's ``pretrained=True`` path, every other tensor must
    match: a file of another depth or width is refused instead of leaving blocks at random. Returns the model
    and the file's head rows."""
    import sys

    from timm.models import adapt_input_conv, load_checkpoint

    path = Path(checkpoint).expanduser()
    rows = checkpoint_head_classes(path)  # reads the file: one-line errors for a missing, unsafe or corrupt one
    model = _timm_create(name, False, dict(kwargs))
    family_filter = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    own = model.state_dict()
    heads = _classifier_keys(model)
    dropped: list[str] = []

    def fit(state: dict[str, torch.Tensor], mdl: nn.Module) -> dict[str, torch.Tensor]:
        if family_filter is not None:
            state = family_filter(state, mdl)
        for key in list(state):
            if key in heads and key in own and state[key].shape != own[key].shape:
                del state[key]
                dropped.append(key)
        conv = next((k for k in ("patch_embed.proj.weight", "conv1.weight", "stem.conv.weight") if k in state), None)
        if conv and conv in own and state[conv].dim() == 4 and state[conv].shape[1] != own[conv].shape[1]:
            state[conv] = adapt_input_conv(own[conv].shape[1], state[conv])
        return state

    try:
        result = load_checkpoint(model, str(path), strict=False, filter_fn=fit)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise VitcompressError(f"checkpoint {path} does not fit model '{name}' ({first}); check the model name, "
                               "img_size and in_chans") from None
    missing = [k for k in result.missing_keys if k not in dropped]
    bad = missing + list(result.unexpected_keys)
    if bad:
        raise VitcompressError(f"checkpoint {path} does not fit model '{name}' ({len(missing)} of its tensors missing, "
                               f"{len(result.unexpected_keys)} unknown, e.g. {bad[0]}); check the model name and "
                               "model_kwargs (depth, width) against the file")
    return model, rows


def _classifier_keys(model: nn.Module) -> set[str]:
    """The classifier's tensor names, from timm's pretrained config (``classifier``: "head" or several)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return {f"{n}.{p}" for n in names for p in ("weight", "bias")}


@dataclass
class LoadedModel:
    """A model brought by a user, with what the study needs to know about it.

    ``spec`` rebuilds its architecture without weights (what an artifact's meta holds);
    ``preprocess`` is its own input recipe (None: it has none, feed it dataset statistics);
    ``classes`` the class names its head was trained on, where the checkpoint says;
    ``head_reset`` whether its head was re-initialised for the dataset's class count.
    """

    model: nn.Module
    spec: ModelSpec
    preprocess: Preprocess | None = None
    classes: tuple[str, ...] | None = None
    head_reset: bool = False
    notes: list[str] = field(default_factory=list)


def load_model(name: str, *, num_classes: int, img_size: int | None = None, in_chans: int | None = None,
               pretrained: bool = False, checkpoint: str | None = None, kwargs: dict[str, Any] | None = None,
               dataset_classes: tuple[str, ...] | None = None) -> LoadedModel:
    """Any model a recipe, ``distill.student`` or the CLI can name, with ``num_classes`` outputs.

    * a vitcompress preset, or any timm name (a pretrained tag such as
      ``vit_base_patch16_224.augreg2_in21k_ft_in1k`` allowed): random init, hub weights
      (``pretrained``, online) or a local ``checkpoint`` read through timm's loading path;
    * ``hf-hub:org/name``: timm's hub weights (online);
    * a transformers ``ViTForImageClassification`` / ``DeiTForImageClassification[WithTeacher]``
      folder (or hub id, online), converted to the equal timm ViT (:mod:`.hf`).

    A head trained on other classes is re-initialised; where the checkpoint names its classes
    and they are ``dataset_classes`` in another order, the head's rows are reordered instead.
    """
    kind = model_kind(name)
    if kind is None:
        raise unknown_model_error(name)
    extra = dict(kwargs or {})
    if kind == "hf":
        if checkpoint is not None or pretrained:
            raise VitcompressError(f"{name} is a transformers model: its weights come from its folder; drop "
                                   "checkpoint / pretrained")
        return _load_hf(name, num_classes, img_size, in_chans, extra, dataset_classes)
    if img_size is None:
        img_size = _default_img_size(name, kind)
    if in_chans is None:
        in_chans = 3
    arch = dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans, **extra)
    notes: list[str] = []
    if kind == "vitcompress":
        model = create_model(ModelSpec(name, num_classes, img_size, in_chans, False, checkpoint, extra))
        return LoadedModel(model, ModelSpec(name, num_classes, img_size, in_chans, kwargs=extra))
    rows: int | None = None
    if checkpoint is not None:
        model, rows = _timm_from_file(name, checkpoint, arch)
    else:
        model = _timm_create(name, pretrained or kind == "timm-hub", arch)
        if pretrained or kind == "timm-hub":
            rows = int((getattr(model, "pretrained_cfg", None) or {}).get("num_classes") or 0) or None
    loaded_weights = checkpoint is not None or pretrained or kind == "timm-hub"
    preprocess = None
    if loaded_weights:
        from ..data.preprocess import from_timm_config

        preprocess = from_timm_config(dict(getattr(model, "pretrained_cfg", None) or {}), img_size, in_chans)
    head_reset = loaded_weights and rows is not None and rows != num_classes
    if head_reset:
        notes.append(f"the weights' head has {rows} classes and the data {num_classes}: the head was "
                     "re-initialised (train it: baseline.train.epochs > 0)")
    base = name
    if kind == "timm-hub":  # an artifact must rebuild it offline: timm's architecture name and its arguments
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        base = str(cfg.get("architecture") or name)
    spec = ModelSpec(base, num_classes, img_size, in_chans, kwargs=extra)
    return LoadedModel(model, spec, preprocess, None, head_reset, notes)


def _default_img_size(name: str, kind: str) -> int:
    """A model's own input size: its preset's, or its timm pretrained config's (224 when it has none)."""
    if name in PRESETS:
        return int(PRESETS[name][0]["img_size"])
    if kind == "timm":
        try:
            cfg = timm.models.get_pretrained_cfg(name)
            if cfg is not None and cfg.input_size:
                return int(cfg.input_size[-1])
        except (RuntimeError, KeyError, ValueError):
            pass
    if kind == "timm-hub":  # timm's hub config.json holds its pretrained_cfg (online; 224 when unreachable)
        from .hf import hub_config

        size = ((hub_config(name.removeprefix("hf-hub:")).get("pretrained_cfg") or {}).get("input_size") or [224])
        return int(size[-1])
    return 224


def _load_hf(name: str, num_classes: int, img_size: int | None, in_chans: int | None, extra: dict[str, Any],
             dataset_classes: tuple[str, ...] | None) -> LoadedModel:
    from ..data.preprocess import from_hf_processor
    from .hf import load_hf_model

    def build(entry: str, layout: dict[str, Any]) -> nn.Module:
        return timm.create_model(entry, pretrained=False, **layout)

    model, entry, layout, folder, classes, rows = load_hf_model(name, build)
    own = int(layout["img_size"])
    notes: list[str] = []
    if in_chans is not None and in_chans != layout["in_chans"]:
        raise VitcompressError(f"{name} takes {layout['in_chans']} channel(s); drop in_chans or set it to that")
    chans = int(layout["in_chans"])
    if extra:
        raise VitcompressError(f"{name} is a transformers model: its layout comes from its config.json; drop "
                               f"model_kwargs ({', '.join(extra)})")
    preprocess, warn = from_hf_processor(folder, chans, own)
    if warn:
        notes.append(warn)
    if img_size is not None and img_size != own:
        model = _resize_vit(model, entry, layout, img_size)
        notes.append(f"position embeddings resampled from {own} to {img_size} px")
        scale = img_size / own
        preprocess = replace(preprocess, input_size=img_size,
                             resize=None if preprocess.resize is None else round(preprocess.resize * scale))
    size = img_size or own
    layout = {k: v for k, v in layout.items() if k not in ("img_size", "in_chans")}
    model, head_reset, note = align_head(model, classes, rows, num_classes, dataset_classes)
    if note:
        notes.append(note)
    return LoadedModel(model, ModelSpec(entry, num_classes, size, chans, kwargs=layout), preprocess, classes,
                       head_reset, notes)


def _resize_vit(model: nn.Module, entry: str, layout: dict[str, Any], img_size: int) -> nn.Module:
    """The same ViT at another input size: position embeddings resampled (timm's bicubic resampling)."""
    from timm.layers import resample_abs_pos_embed

    state = model.state_dict()
    new = timm.create_model(entry, pretrained=False, **{**layout, "img_size": img_size,
                                                         "num_classes": int(state["head.weight"].shape[0])})
    grid = new.patch_embed.grid_size
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(grid),
                                                num_prefix_tokens=int(new.num_prefix_tokens))
    new.load_state_dict(state)
    return new


def align_head(model: nn.Module, classes: tuple[str, ...] | None, rows: int, num_classes: int,
               dataset_classes: tuple[str, ...] | None) -> tuple[nn.Module, bool, str | None]:
    """Fit a loaded head to the dataset's classes: reorder its rows where both sides name the same classes in
    another order, keep it where the counts agree, re-initialise it otherwise. (model, reset?, note)."""
    heads = [h for h in ("head", "head_dist") if isinstance(getattr(model, h, None), nn.Linear)]
    if classes is not None and dataset_classes is not None and len(classes) == rows:
        if classes == dataset_classes:
            return model, False, None
        if sorted(classes) == sorted(dataset_classes):
            order = torch.tensor([classes.index(c) for c in dataset_classes])
            with torch.no_grad():
                for h in heads:
                    lin = getattr(model, h)
                    lin.weight.copy_(lin.weight[order].clone())
                    lin.bias.copy_(lin.bias[order].clone())
            return model, False, "the model's classes are the dataset's in another order: its head rows were reordered"
        if rows == num_classes:
            missing = sorted(set(dataset_classes) - set(classes))
            return _reset(model, num_classes), True, (
                f"the model's classes ({', '.join(classes[:4])}, ...) are not the dataset's (e.g. {missing[0]!r} "
                "is missing): the head was re-initialised (train it: baseline.train.epochs > 0)")
    if rows == num_classes:
        return model, False, None
    return _reset(model, num_classes), True, (f"the model's head has {rows} classes and the data {num_classes}: "
                                             "the head was re-initialised (train it: baseline.train.epochs > 0)")


def _reset(model: nn.Module, num_classes: int) -> nn.Module:
    model.reset_classifier(num_classes)
    return model


def input_shape(name: str, img_size: int | None, in_chans: int | None, data_channels: int) -> tuple[int, int]:
    """The (img_size, in_chans) a model takes, where the recipe leaves them open: a preset's own size and
    the data's channels; a transformers model's config; a timm model's pretrained config (224) and 3 channels."""
    kind = model_kind(name)
    if kind == "hf":
        from .hf import hub_config, read_hf_config

        cfg = read_hf_config(Path(name).expanduser()) if is_hf_folder(name) else hub_config(name)
        return int(img_size or cfg.get("image_size", 224)), int(in_chans or cfg.get("num_channels", 3))
    if kind == "vitcompress":
        size = PRESETS[name][0]["img_size"] if name in PRESETS else 224
        return int(img_size or size), int(in_chans or data_channels)
    return int(img_size or _default_img_size(name, kind or "timm")), int(in_chans or 3)


def model_preprocess(name: str, *, pretrained: bool, checkpoint: str | None, img_size: int,
                     in_chans: int) -> Preprocess | None:
    """The input recipe a model comes with, read without loading its weights: a transformers folder's
    ``preprocessor_config.json``, a timm model's pretrained config (when it brings weights: ``pretrained``
    or a ``checkpoint``); None for a model without one (a preset, a timm model from random init)."""
    from ..data.preprocess import from_hf_processor, from_timm_config

    kind = model_kind(name)
    if kind == "hf":
        from .hf import resolve_hf

        folder = resolve_hf(name)
        own, _ = input_shape(str(folder), None, None, 3)
        pre, _ = from_hf_processor(folder, in_chans, own)
        if own != img_size:
            pre = replace(pre, input_size=img_size,
                          resize=None if pre.resize is None else round(pre.resize * img_size / own))
        return pre
    if kind == "timm-hub":
        return load_model(name, num_classes=1, img_size=img_size, in_chans=in_chans).preprocess
    if kind == "timm" and (pretrained or checkpoint is not None):
        cfg = timm.models.get_pretrained_cfg(name)
        return from_timm_config(cfg.to_dict() if cfg is not None else {}, img_size, in_chans)
    return None


def structure_of(name: str, *, num_classes: int, img_size: int, in_chans: int,
                 kwargs: dict[str, Any] | None = None) -> nn.Module | None:
    """The model ``name`` names, built on the meta device (its structure, no memory, no weights, no download);
    None where that needs the network (hub models) or the model cannot be built there."""
    from .arch import meta_model

    kind = model_kind(name)
    if kind == "hf" and is_hf_folder(name):
        from .hf import hf_layout, read_hf_config

        folder = Path(name).expanduser()
        entry, layout = hf_layout(read_hf_config(folder), folder)
        return meta_model(lambda: timm.create_model(entry, pretrained=False, **{**layout, "num_classes": num_classes}))
    if kind in ("vitcompress", "timm"):
        return meta_model(lambda: _create_sized(name, pretrained=False, num_classes=num_classes,
                                                img_size=img_size, in_chans=in_chans, **(kwargs or {})))
    return None
