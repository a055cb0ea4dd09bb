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
    int_keys = [k for k in stored if k.endswith("::int")]
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


def test_file_is_its_tensors_plus_a_small_index_and_old_files_still_load(tmp_path) -> None:
    import json
    import struct

    from safetensors.torch import save_file

    from vitcompress.artifact import WEIGHTS_FILE, _flatten, upgrade_artifact

    spec, _, cfg, out = _quantized_quick()
    meta = {"model": spec.to_dict(), "steps": [{"method": "ptq.dynamic", "config": to_dict(cfg), "meta": out.meta}]}
    path = save_artifact(out.model, tmp_path / "new", meta, small_tensors="float16")
    stored = stored_tensors(tmp_path / "new")
    header = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    payload = sum(t.numel() * t.element_size() for t in stored.values())
    assert size_on_disk(tmp_path / "new") == header + payload
    assert len(stored) > 60 and header < 1500  # the names of 60+ tensors cost well under 25 bytes each
    # Symmetric per-channel weights have all-zero zero points: they are not stored.
    assert not any(k.endswith("::zero_point") for k in stored)
    assert sum(k.endswith("::scale") for k in stored) == sum(k.endswith("::int") for k in stored)

    # The earlier layout (one safetensors entry per tensor, JSON layout) still loads, to the same model.
    tensors: dict[str, torch.Tensor] = {}
    layout: dict = {}
    for key, value in out.model.state_dict().items():
        _flatten(key, value, tensors, layout, "float16")
    for key, entry in layout.items():  # earlier files stored the zero points, zeros included
        if entry.pop("symmetric", False):
            tensors[key + "::zero_point"] = torch.zeros(tensors[key + "::scale"].shape, dtype=torch.int8)
    (tmp_path / "old").mkdir()
    save_file({k: t.clone() for k, t in tensors.items()}, str(tmp_path / "old" / WEIGHTS_FILE),
              metadata={"vitcompress_layout": json.dumps(layout)})
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    assert size_on_disk(tmp_path / "old") > size_on_disk(tmp_path / "new") + 40 * len(stored)
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(load_artifact(tmp_path / "old")(x), load_artifact(tmp_path / "new")(x),
                                   rtol=0, atol=0)
    # A study finding such a file rewrites it in the packed layout: the very bytes a new save writes.
    assert upgrade_artifact(tmp_path / "old") and not upgrade_artifact(tmp_path / "old")
    assert (tmp_path / "old" / WEIGHTS_FILE).read_bytes() == path.read_bytes()

    # A file of another packed format is refused with a one-line reason, not misread.
    import base64
    import zlib

    from safetensors import safe_open

    from vitcompress.errors import VitcompressError
    with safe_open(str(path), "pt") as f:
        blobs = {k: f.get_tensor(k) for k in f.keys()}
        index = json.loads(zlib.decompress(base64.b64decode(f.metadata()["vitcompress_index"])))
    index["format"] = "3"
    save_file(blobs, str(path), metadata={"vitcompress_index": base64.b64encode(
        zlib.compress(json.dumps(index).encode())).decode()})
    with pytest.raises(VitcompressError, match="weights format '3'"):
        stored_tensors(tmp_path / "new")
