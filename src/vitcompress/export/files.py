"""``vitcompress export``: an artifact (or a timm model) as deployable files, each checked against PyTorch.

Formats:

* ``onnx``: ``model.onnx`` (opset 18, dynamic batch). Quantized artifacts keep *our* int8
  weights and calibrated scales as QuantizeLinear/DequantizeLinear pairs, so a runtime executes
  our quantization rather than one of its own.
* ``openvino``: OpenVINO IR, ``model.xml`` + ``model.bin``, converted from an ONNX export made
  for OpenVINO (``export_onnx(..., target="openvino")``: quantized padded convs pad before their
  quantizer, see ``QuantConv2d.forward``). Float weights stay float32 in the IR
  (``compress_to_fp16=False``): the files hold the model's own numbers, and OpenVINO still picks
  bf16 at run time where the CPU has it.

Each file is read back from disk and run in its runtime (ONNX Runtime, OpenVINO CPU with its
default precision) on the same images as PyTorch eager; the parity entry gives top-1 agreement,
the largest absolute logit difference and the mean cosine similarity of the logit vectors.
Images: the first ``n`` of a dataset's test split (``data``), or seeded random images.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import VitcompressError

FORMATS = ("onnx", "openvino")


def parse_formats(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    bad = [f for f in names if f not in FORMATS]
    if not names or bad:
        raise VitcompressError(f"--formats takes a comma-separated list of {', '.join(FORMATS)}; got {text!r}")
    return names


def parity_images(img_size: int, in_chans: int, n: int, data: str | None = None,
                  data_root: str | None = None, seed: int = 0,
                  preprocess: dict[str, Any] | None = None) -> tuple[torch.Tensor, str]:
    """``n`` model inputs and a description: the first test images of a dataset (``--data``: a bundled name, an
    image folder, ``hf:PATH``), prepared as the model's ``preprocess`` says (else the dataset's statistics), or
    seeded noise."""
    if n < 1:
        raise VitcompressError(f"--images must be at least 1, got {n}")
    if data is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, in_chans, img_size, img_size, generator=g), f"{n} seeded random images (seed {seed})"
    from ..data import (
        DataConfig,
        Preprocess,
        data_config_from_arg,
        dataset_preprocess,
        make_loader,
        open_source,
    )

    cfg = data_config_from_arg(data, DataConfig(root=data_root) if data_root else None)
    source = open_source(cfg, root=data_root if cfg.name not in ("imagefolder", "hf") else None)
    if preprocess is not None:
        pre = Preprocess.from_dict(preprocess)
    else:
        geometry = dataset_preprocess((0.5,) * in_chans, (0.5,) * in_chans, img_size, in_chans)
        pre = dataset_preprocess(*source.statistics(geometry), img_size, in_chans)
    test = source.split("test", pre)
    test = test.subset(torch.arange(min(n, len(test))))
    x = torch.cat([b[0] for b in make_loader(test, 256, train=False)])
    return x, f"the first {len(x)} {source.describe()} test images"


def write_deploy_info(out_dir: str | os.PathLike, preprocess: dict[str, Any] | None,
                      classes: list[str] | None) -> list[Path]:
    """``preprocess.json`` (size, resize, crop, interpolation, mean, std) and ``labels.json`` beside the model
    files, where known: what a deployment needs to feed the model and read its output."""
    out = Path(out_dir)
    written = []
    if preprocess is not None:
        (out / "preprocess.json").write_text(json.dumps(preprocess, indent=2) + "\n")
        written.append(out / "preprocess.json")
    if classes:
        (out / "labels.json").write_text(json.dumps(list(classes), indent=2) + "\n")
        written.append(out / "labels.json")
    return written


def _batched(fn: Any, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]).float() for i in range(0, len(x), batch)])


def export_files(model: torch.nn.Module, out_dir: str | os.PathLike, formats: tuple[str, ...], images: torch.Tensor,
                 *, threads: int | None = None) -> list[dict[str, Any]]:
    """Write ``model`` in each format under ``out_dir``; one entry per format with its files, bytes and parity."""
    from ..measure import available_cores
    from ..measure.bench import logit_parity
    from .onnx import OnnxRunner, export_onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads or available_cores()
    model = model.cpu().eval()
    with torch.inference_mode():
        reference = _batched(model, images)
    example = images[:2]
    entries: list[dict[str, Any]] = []
    for fmt in formats:
        if fmt == "onnx":
            path = export_onnx(model, example, out / "model.onnx")
            files, runtime = [path], "onnxruntime-cpu"
            run = OnnxRunner(path, threads)
        else:
            files, runtime, run = _openvino_ir(model, example, out, threads)
        with torch.inference_mode():
            got = _batched(run, images)
        entries.append({"format": fmt, "files": [str(f) for f in files],
                        "bytes": sum(Path(f).stat().st_size for f in files), "runtime": runtime,
                        **logit_parity(reference, got)})
    return entries


def _openvino_ir(model: torch.nn.Module, example: torch.Tensor, out: Path, threads: int) -> tuple[list[Path], str, Any]:
    try:
        import openvino as ov
    except ImportError:
        raise VitcompressError("the openvino format needs OpenVINO: pip install 'vitcompress[openvino]'") from None
    from ..measure.runtimes import deploy_openvino
    from .onnx import export_onnx

    xml = out / "model.xml"
    with tempfile.TemporaryDirectory(prefix="vitcompress-export-") as tmp:
        source = export_onnx(model, example, Path(tmp) / "model.onnx", target="openvino")
        ov.save_model(ov.Core().read_model(str(source)), str(xml), compress_to_fp16=False)
    dep = deploy_openvino(xml, threads)  # read back from the files just written
    return [xml, xml.with_suffix(".bin")], dep.runtime, dep.fn


def write_summary(out_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    path = Path(out_dir) / "export.json"
    path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return path
