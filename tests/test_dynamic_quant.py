from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from vitcompress.artifact import load_artifact, save_artifact, size_on_disk, stored_tensors
from vitcompress.config import to_dict
from vitcompress.measure import count_params, uses_integer_kernels
from vitcompress.methods import get_method
from vitcompress.methods.quant.dynamic import DynamicQuantConfig
from vitcompress.models import ModelSpec, create_model


def _linear_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))


def _quantized_quick() -> tuple[ModelSpec, nn.Module, DynamicQuantConfig, Any]:
    """A seeded vitc_quick and its ptq.dynamic step output."""
    spec = ModelSpec("vitc_quick")
    torch.manual_seed(0)
    model = create_model(spec).eval()
    cfg = DynamicQuantConfig()
    return spec, model, cfg, get_method("ptq.dynamic").apply(model, cfg, None)


def test_dynamic_int8_file_holds_int8_weights_and_shrinks(tmp_path) -> None:
    spec, model, cfg, out = _quantized_quick()
    q = out.model
    assert uses_integer_kernels(q) and not uses_integer_kernels(model)
    assert count_params(q) == count_params(model)

    save_artifact(model, tmp_path / "fp32", {"model": spec.to_dict(), "steps": []})
    save_artifact(q, tmp_path / "int8", {"model": spec.to_dict(),
                                         "steps": [{"method": "ptq.dynamic", "config": to_dict(cfg),
                                                    "meta": out.meta}]})
    stored = stored_tensors(tmp_path / "int8")
    # Each quantized tensor: its integers under its own name, its scales (and any zero points) beside.
    int_keys = [k for k in stored if k + "::scale" in stored]
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert len(int_keys) == n_linear
    assert all(stored[k].dtype == torch.int8 for k in int_keys)
    int_bytes = sum(stored[k].numel() for k in int_keys)
    assert int_bytes * 4 == _linear_bytes(model)  # one byte per weight, a quarter of fp32

    fp32, int8 = size_on_disk(tmp_path / "fp32"), size_on_disk(tmp_path / "int8")
    assert fp32 == (tmp_path / "fp32" / "model.safetensors").stat().st_size
    # The file: int8 Linear and patch-projection weights plus what stays float (embeddings, norms, biases, scales).
    weight_saving = (_linear_bytes(model) + model.patch_embed.proj.weight.numel() * 4) * 3 / 4
    assert abs((fp32 - int8) - weight_saving) / weight_saving < 0.03
    assert int8 / fp32 < 0.30

    loaded = load_artifact(tmp_path / "int8")
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), q(x))
        # int8 weights and activations: close to float, not equal
        err = (q(x) - model(x)).abs().max().item()
    assert 0 < err < 0.1


def test_per_tensor_option_as_in_the_study() -> None:
    model = create_model(ModelSpec("vitc_micro")).eval()
    q = get_method("ptq.dynamic").apply(model, DynamicQuantConfig(per_channel=False), None).model
    w = q.blocks[0].attn.qkv.weight()
    assert w.qscheme() == torch.per_tensor_affine and w.int_repr().dtype == torch.int8


def test_file_is_standard_safetensors_and_old_layouts_still_load(tmp_path) -> None:
    import base64
    import json
    import struct
    import zlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from vitcompress.artifact import WEIGHTS_FILE, _flatten, upgrade_artifact
    from vitcompress.errors import VitcompressError

    spec, _, cfg, out = _quantized_quick()
    meta = {"model": spec.to_dict(), "steps": [{"method": "ptq.dynamic", "config": to_dict(cfg), "meta": out.meta}]}
    path = save_artifact(out.model, tmp_path / "new", meta, small_tensors="float16")
    # Any safetensors reader gets the model's tensors by name, int8 weights as int8.
    plain = load_file(str(path))
    stored = stored_tensors(tmp_path / "new")
    assert plain.keys() == stored.keys() and all(torch.equal(plain[k], stored[k]) for k in plain)
    qkv = "blocks.0.attn.qkv._packed_params._packed_params::0"
    assert plain[qkv].dtype == torch.int8 and plain[qkv].shape == out.model.blocks[0].attn.qkv.weight().shape
    assert torch.equal(plain[qkv], out.model.blocks[0].attn.qkv.weight().int_repr())
    assert plain["pos_embed"].dtype == torch.float16 and plain["pos_embed"].shape == out.model.pos_embed.shape
    # The size is the file's bytes: the header (names, shapes, the layout) and the tensors.
    header = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    payload = sum(t.numel() * t.element_size() for t in stored.values())
    assert size_on_disk(tmp_path / "new") == header + payload
    assert len(stored) > 60 and header < 150 * len(stored)
    # Symmetric per-channel weights have all-zero zero points: they are not stored.
    assert not any(k.endswith("::zero_point") for k in stored)
    assert all(stored[k.removesuffix("::scale")].dtype == torch.int8 for k in stored if k.endswith("::scale"))
    assert sum(k.endswith("::scale") for k in stored) == 17  # every Linear's (the patch conv keeps its own names)

    # The first layout (one entry per tensor, integers as <name>::int, JSON layout) still loads, to the same model.
    tensors: dict[str, torch.Tensor] = {}
    layout: dict = {}
    for key, value in out.model.state_dict().items():
        _flatten(key, value, tensors, layout, "float16")
    for key, entry in layout.items():
        if entry["kind"].startswith("qtensor"):
            tensors[key + "::int"] = tensors.pop(key)
        if entry.pop("symmetric", False):  # earlier files stored the zero points, zeros included
            tensors[key + "::zero_point"] = torch.zeros(tensors[key + "::scale"].shape, dtype=torch.int8)
    (tmp_path / "old").mkdir()
    save_file({k: t.clone() for k, t in tensors.items()}, str(tmp_path / "old" / WEIGHTS_FILE),
              metadata={"vitcompress_layout": json.dumps(layout)})
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    # The second (one blob per dtype, zlib-compressed index) too.
    parts: dict[torch.dtype, list[torch.Tensor]] = {}
    index = []
    for key, t in sorted(tensors.items()):
        if key.endswith("::zero_point"):
            continue
        parts.setdefault(t.dtype, []).append(t.reshape(-1))
        index.append([key, str(t.dtype).removeprefix("torch."), list(t.shape)])
    packed = {"format": "2", "index": index, "layout": {k: dict(v, **({"symmetric": True} if k + "::zero_point" in
                                                                       tensors else {})) for k, v in layout.items()}}
    (tmp_path / "packed").mkdir()
    save_file({str(d).removeprefix("torch."): torch.cat(ts) for d, ts in parts.items()},
              str(tmp_path / "packed" / WEIGHTS_FILE),
              metadata={"vitcompress_index": base64.b64encode(zlib.compress(json.dumps(packed).encode())).decode()})
    (tmp_path / "packed" / "meta.json").write_text(json.dumps(meta))
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        for old in ("old", "packed"):
            torch.testing.assert_close(load_artifact(tmp_path / old)(x), load_artifact(tmp_path / "new")(x),
                                       rtol=0, atol=0)
    # A study finding such a file rewrites it in the standard layout: the very bytes a new save writes.
    for old in ("old", "packed"):
        assert upgrade_artifact(tmp_path / old) and not upgrade_artifact(tmp_path / old)
        assert (tmp_path / old / WEIGHTS_FILE).read_bytes() == path.read_bytes()

    # A file of another format is refused with a one-line reason, not misread.
    with safe_open(str(path), "pt") as f:
        header_json = json.loads(f.metadata()["vitcompress"])
    header_json["format"] = "4"
    save_file(plain, str(path), metadata={"vitcompress": json.dumps(header_json)})
    with pytest.raises(VitcompressError, match="weights format '4'"):
        stored_tensors(tmp_path / "new")
