from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn

from vitcompress.artifact import load_artifact, save_artifact, size_on_disk
from vitcompress.config import to_dict
from vitcompress.measure import count_params, uses_integer_kernels
from vitcompress.methods import get_method
from vitcompress.methods.quant.dynamic import DynamicQuantConfig
from vitcompress.models import ModelSpec, create_model


def _linear_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))


def test_dynamic_int8_file_holds_int8_weights_and_shrinks(tmp_path) -> None:
    spec = ModelSpec("vitc_quick")
    torch.manual_seed(0)
    model = create_model(spec).eval()
    cfg = DynamicQuantConfig()
    out = get_method("ptq.dynamic").apply(model, cfg, None)
    q = out.model
    assert uses_integer_kernels(q) and not uses_integer_kernels(model)
    assert count_params(q) == count_params(model)

    save_artifact(model, tmp_path / "fp32", {"model": spec.to_dict(), "steps": []})
    save_artifact(q, tmp_path / "int8", {"model": spec.to_dict(),
                                         "steps": [{"method": "ptq.dynamic", "config": to_dict(cfg),
                                                    "meta": out.meta}]})
    with safe_open(str(tmp_path / "int8" / "model.safetensors"), "pt") as f:
        int_keys = [k for k in f.keys() if k.endswith("::int")]
        n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
        assert len(int_keys) == n_linear
        assert all(f.get_slice(k).get_dtype() == "I8" for k in int_keys)
        int_bytes = sum(f.get_tensor(k).numel() for k in int_keys)
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
