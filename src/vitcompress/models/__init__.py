"""Models: any timm ViT/DeiT by name, plus the small presets in :mod:`.presets`.

Weights come from timm's hub when ``pretrained`` is set and the machine is
online, or from a local file (``checkpoint``): a ``.safetensors`` file, or a
``.pth``/``.pt``/``.bin`` file loaded with ``torch.load(weights_only=True)`` so
that a checkpoint cannot run code.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..errors import VitcompressError
from . import presets as _presets  # noqa: F401  (registers the presets with timm)
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


def is_known_model(name: str) -> bool:
    return name in PRESETS or name in timm.list_models()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise VitcompressError(f"checkpoint {path} does not exist; pass the path of a .safetensors or .pth file")
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
    return state


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
    """Build the model a spec names; weights from the hub (online) or the spec's checkpoint."""
    if not is_known_model(spec.name):
        close = timm.list_models(f"*{spec.name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise VitcompressError(
            f"unknown model '{spec.name}'{hint}; use a timm model name or a preset: {', '.join(PRESETS)}"
        )
    kwargs = dict(num_classes=spec.num_classes, img_size=spec.img_size, in_chans=spec.in_chans, **spec.kwargs)
    pretrained = spec.pretrained and spec.checkpoint is None and spec.name not in PRESETS
    try:
        model = timm.create_model(spec.name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise VitcompressError(f"model '{spec.name}' rejects its arguments: {exc}; check the recipe's model kwargs") from None
    except Exception as exc:
        if pretrained:
            raise VitcompressError(
                f"cannot fetch pretrained weights for '{spec.name}' ({type(exc).__name__}); when offline, download "
                "the weights elsewhere and set baseline.checkpoint to the local .safetensors/.pth file"
            ) from None
        raise
    if spec.checkpoint is not None:
        state = _read_state_dict(Path(spec.checkpoint))
        # A hub checkpoint for another class count: keep the backbone, re-initialise the head.
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
                f"checkpoint {spec.checkpoint} does not fit model '{spec.name}' "
                f"({len(bad)} mismatched keys, e.g. {bad[0]}); check the model name and img_size"
            )
    return model


