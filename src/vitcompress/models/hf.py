"""Hugging Face transformers image classifiers as timm ``VisionTransformer`` modules.

A ViT in transformers (``ViTForImageClassification``) and in timm
(``VisionTransformer``) are the same network: a patch projection, a class token and
learned position embeddings, pre-norm blocks of multi-head self-attention and a GELU MLP,
a final LayerNorm, and a linear head on the class token. Every vitcompress method is
written against timm's modules, so a transformers checkpoint is converted once, here,
and from then on is a plain timm model: the methods, the artifact format and the exports
apply unchanged. DeiT (Touvron et al. 2021) adds a distillation token:
``DeiTForImageClassificationWithTeacher`` averages the class and distillation heads, as
timm's ``VisionTransformerDistilled`` does in eval mode; ``DeiTForImageClassification``
reads the class token only, which timm expresses as a ViT with one register token (the
distillation token, in the same place: class, distillation, then the patches).

timm converts the original JAX/PyTorch releases but not transformers' layout, and
transformers has no timm export, so the mapping is written out here. Both of
transformers' key spellings are read: the files on the hub (and ``save_pretrained``)
use ``encoder.layer.N.attention.attention.query``, its modules in memory
``layers.N.attention.q_proj``. Only ``config.json`` and the weights file are read:
transformers itself is not imported (the hub download uses huggingface_hub).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import VitcompressError

__all__ = ["HF_ARCHITECTURES", "convert_state_dict", "hf_layout", "is_hf_folder", "looks_like_hub_id",
           "read_hf_config", "read_hf_weights", "resolve_hf"]

# transformers class -> (key prefix, vitcompress entry point, extra layout)
HF_ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ViTForImageClassification": ("vit.", "vitc_vit", {}),
    "DeiTForImageClassification": ("deit.", "vitc_vit", {"reg_tokens": 1}),
    "DeiTForImageClassificationWithTeacher": ("deit.", "vitc_deit", {}),
}
# transformers' hidden_act -> timm's act_layer name
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hf_folder(path: str | Path) -> bool:
    """A local folder holding a transformers ``config.json`` (one with ``model_type``)."""
    cfg = Path(path).expanduser() / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return True  # read_hf_config says what is wrong with it
    return isinstance(data, dict) and "model_type" in data


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` that is not a local path: a transformers model on the Hugging Face hub."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (``HF_HUB_OFFLINE`` set: no). Asked before a download, because
    huggingface_hub retries an unreachable host for half a minute before it gives up."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_hf(name: str) -> Path:
    """The local folder of a transformers model: ``name`` itself, or a hub snapshot downloaded (online)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        if not hub_reachable():
            raise ConnectionError("the hub is not reachable")
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as exc:
        raise VitcompressError(
            f"cannot download {name!r} from the Hugging Face hub ({type(exc).__name__}); when offline, download "
            "the model folder elsewhere (config.json, model.safetensors, preprocessor_config.json) and pass its path"
        ) from None


def hub_config(name: str) -> dict[str, Any]:
    """A hub model's ``config.json`` alone (online); {} when it cannot be fetched (loading the model says why)."""
    try:
        from huggingface_hub import hf_hub_download

        if not hub_reachable():
            return {}
        return read_hf_config(Path(hf_hub_download(name, "config.json")).parent)
    except Exception:
        return {}


def read_hf_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise VitcompressError(f"cannot read {folder / 'config.json'}: {exc}; pass a transformers model folder") from None
    if not isinstance(cfg, dict):
        raise VitcompressError(f"{folder / 'config.json'} is not a JSON object; pass a transformers model folder")
    return cfg


def _architecture(cfg: dict[str, Any], folder: Path) -> str:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in HF_ARCHITECTURES:
        kind = cfg.get("model_type", "?")
        raise VitcompressError(
            f"{folder}: transformers model {arch or kind!r} (model_type {kind!r}) is not supported; vitcompress "
            f"converts {', '.join(HF_ARCHITECTURES)} (plain ViT/DeiT classifiers) to timm ViTs"
        )
    return arch


def hf_layout(cfg: dict[str, Any], folder: Path) -> tuple[str, dict[str, Any]]:
    """The vitcompress entry point and timm layout (constructor kwargs) equal to a transformers config."""
    arch = _architecture(cfg, folder)
    _, entry, extra = HF_ARCHITECTURES[arch]
    act = _ACTIVATIONS.get(str(cfg.get("hidden_act", "gelu")))
    if act is None:
        raise VitcompressError(f"{folder}: hidden_act {cfg.get('hidden_act')!r} has no timm twin; supported: "
                               f"{', '.join(_ACTIVATIONS)}")
    try:
        image, patch = int(cfg.get("image_size", 224)), int(cfg.get("patch_size", 16))
        dim, depth = int(cfg.get("hidden_size", 768)), int(cfg.get("num_hidden_layers", 12))
        heads, inner = int(cfg.get("num_attention_heads", 12)), int(cfg.get("intermediate_size", 3072))
        eps = float(cfg.get("layer_norm_eps", 1e-12))
        chans = int(cfg.get("num_channels", 3))
    except (TypeError, ValueError) as exc:
        raise VitcompressError(f"{folder}/config.json: {exc}; it does not describe a ViT") from None
    if dim % heads or image % patch:
        raise VitcompressError(f"{folder}/config.json: hidden_size {dim} / {heads} heads or image_size {image} / "
                               f"patch_size {patch} does not divide")
    ratio = inner / dim
    if int(dim * ratio) != inner:  # timm sizes the MLP as int(dim * mlp_ratio)
        ratio = (inner + 1e-6) / dim
    layout = {"img_size": image, "patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": heads,
              "mlp_ratio": ratio, "qkv_bias": bool(cfg.get("qkv_bias", True)), "norm_eps": eps, "in_chans": chans,
              **extra}
    if act != "gelu":  # timm's default is the exact (erf) GELU, transformers' "gelu"
        layout["act_layer"] = act
    return entry, layout


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: ``model.safetensors`` (or its shards), else ``pytorch_model.bin`` (weights only)."""
    from safetensors.torch import load_file

    try:
        if (folder / "model.safetensors").is_file():
            return load_file(str(folder / "model.safetensors"))
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(str(folder / shard)))
            return state
        if (folder / "pytorch_model.bin").is_file():
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except VitcompressError:
        raise
    except Exception as exc:
        raise VitcompressError(f"cannot read the weights in {folder} ({type(exc).__name__}: "
                               f"{(str(exc).splitlines() or [''])[0][:160]}); the file is corrupt or not a "
                               "state dict of tensors") from None
    raise VitcompressError(f"{folder} has no model.safetensors or pytorch_model.bin; pass a folder written by "
                           "save_pretrained")


# Legacy (files) and current (in-memory) transformers names of a block's tensors -> timm's.
_BLOCK_KEYS: dict[str, str] = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_QKV = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
        "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}
_BLOCK = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def convert_state_dict(state: dict[str, torch.Tensor], arch: str, depth: int) -> dict[str, torch.Tensor]:
    """A transformers ViT/DeiT classifier's state dict in timm's names (q, k, v fused into qkv).

    Every tensor must find its place: a key left over means a variant this mapping does not
    know (layer scale, a pooler used by the head, ...), which is refused rather than dropped.
    """
    prefix, _, _ = HF_ARCHITECTURES[arch]
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    left = []
    heads = {"classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist"}
    for key, value in state.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        top = name.rsplit(".", 1)
        if top[0] in heads and key == name:
            out[f"{heads[top[0]]}.{top[1]}"] = value
            continue
        simple = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
                  "embeddings.distillation_token": "dist_token" if arch.endswith("WithTeacher") else "reg_token",
                  "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
                  "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
                  "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
        if name in simple:
            out[simple[name]] = value
            continue
        if name.startswith("pooler.") or name == "embeddings.mask_token":
            continue  # the classifier reads the class token, not the pooler; the mask token is for pre-training
        m = _BLOCK.match(name)
        if m:
            i, inner, kind = int(m.group(1)), m.group(2), m.group(3)
            if inner in _QKV:
                qkv.setdefault((i, kind), {})[_QKV[inner]] = value
                continue
            if inner in _BLOCK_KEYS:
                out[f"blocks.{i}.{_BLOCK_KEYS[inner]}.{kind}"] = value
                continue
        left.append(key)
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            left.append(f"block {i} attention {kind} ({', '.join(sorted(parts))} only)")
            continue
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if left:
        raise VitcompressError(f"the checkpoint has tensors a plain ViT/DeiT does not ({left[0]}"
                               f"{f' and {len(left) - 1} more' if len(left) > 1 else ''}); this variant is not "
                               "supported")
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight")
               if k not in out] + [f"blocks.{i}" for i in range(depth) if f"blocks.{i}.attn.qkv.weight" not in out]
    if missing:
        raise VitcompressError(f"the checkpoint lacks {missing[0]}; pass a complete ViT/DeiT classifier")
    return out


def id2label(cfg: dict[str, Any]) -> tuple[str, ...] | None:
    """The checkpoint's class names in label order, or None for transformers' placeholders (LABEL_0, ...)."""
    raw = cfg.get("id2label")
    if not isinstance(raw, dict) or not raw:
        return None
    try:
        names = [str(raw[k]) for k in sorted(raw, key=lambda k: int(k))]
    except (TypeError, ValueError):
        return None
    if sorted(int(k) for k in raw) != list(range(len(names))):
        return None
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return tuple(names)


def load_hf_model(name: str, build: Callable[[str, dict[str, Any]], torch.nn.Module]
                  ) -> tuple[torch.nn.Module, str, dict[str, Any], Path, tuple[str, ...] | None, int]:
    """Convert the transformers model ``name`` (a folder or a hub id): (model with its own head, entry point,
    layout, folder, class names or None, the head's class count). ``build(entry, layout)`` makes the module."""
    folder = resolve_hf(name)
    cfg = read_hf_config(folder)
    arch = _architecture(cfg, folder)
    entry, layout = hf_layout(cfg, folder)
    weights = read_hf_weights(folder)
    from . import check_finite

    check_finite(weights, f"{folder}'s weights")
    state = convert_state_dict(weights, arch, int(layout["depth"]))
    classes = int(state["head.weight"].shape[0])
    model = build(entry, {**layout, "num_classes": classes})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise VitcompressError(f"{folder}: the weights do not fit its config.json ({str(exc).splitlines()[0][:200]})"
                               ) from None
    return model, entry, layout, folder, id2label(cfg), classes
