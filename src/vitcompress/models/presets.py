"""Small ViT presets for 28/32 px inputs, registered with timm.

The study used ViT-B/16 at 224 px; a 2-core CPU cannot train that, so these keep
the architecture (timm ``VisionTransformer``: class token, pre-norm blocks, GELU
MLP) and shrink width, depth and patch size so that a 28 px image still gives
a few dozen tokens. Registering them with timm means every method sees a plain
timm model, whatever the preset.
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

# name -> (architecture kwargs, what it stands for). `vitcompress list` prints these.
PRESETS: dict[str, tuple[dict[str, Any], str]] = {
    "vitc_quick": (
        dict(img_size=28, patch_size=4, embed_dim=96, depth=4, num_heads=4, mlp_ratio=4.0),
        "quick-study ViT: 28 px, 4 px patches (50 tokens), width 96, 4 blocks, 4 heads",
    ),
    "vitc_micro": (
        dict(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
        "a few thousand parameters, 17 tokens: for tests and smoke runs, not for accuracy",
    ),
    "vitc_tiny": (
        dict(img_size=28, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0),
        "ViT-Tiny width (192, 3 heads) at 28 px, 4 px patches (50 tokens), 6 blocks",
    ),
    "vitc_tiny_p2": (
        dict(img_size=28, patch_size=2, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0),
        "as vitc_tiny with 2 px patches: 197 tokens, the study's sequence length",
    ),
}


def _build(name: str, **kwargs: Any) -> VisionTransformer:
    arch = dict(PRESETS[name][0])
    # timm passes its hub arguments on; no hub weights exist for these presets.
    for key in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    arch.update(kwargs)
    arch.setdefault("in_chans", 1)
    arch.setdefault("num_classes", 10)
    return VisionTransformer(**arch)


@register_model
def vitc_quick(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    return _build("vitc_quick", **kwargs)


@register_model
def vitc_micro(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    return _build("vitc_micro", **kwargs)


@register_model
def vitc_tiny(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    return _build("vitc_tiny", **kwargs)


@register_model
def vitc_tiny_p2(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    return _build("vitc_tiny_p2", **kwargs)
