"""Saved artifacts: a model's tensors in one safetensors file plus a JSON recipe to rebuild it.

Quantized tensors are written as what they are, integer arrays (``int8``) with
their scales and zero points, so the file's bytes are the model's real size
and a reader can check the storage dtype. With ``small_tensors="float16"`` (the study
asks for it after a quantization step) the float32 tensors that remain, such as
biases, scales, norms and the position embedding, are stored as float16 and widened
back to float32 when read. With ``small_tensors="uint8"`` (for 4-bit files, where those
tensors are 10% of the bytes) each of them of at least ``CODE_MIN_NUMEL`` values (weight
matrices left in float stay float16) is stored as one byte per value plus two float32
numbers (see :func:`encode_uint8`):
on a log2 grid when all its values are positive (steps, scales, most LayerNorm
gains: a constant *relative* error), on a uniform min..max grid otherwise. The
study measures the model read back from the file, so the rounding is in every
reported number. Nothing is pickled: loading rebuilds
the module structure from ``meta.json`` (the model spec and each method step's
``restore``) and fills it with plain tensors, so an artifact cannot run code.

The weights file is a standard safetensors file: one entry per stored tensor, named after the
model's state-dict entry, in its storage dtype, so ``safetensors.torch.load_file`` and any
safetensors tool read it. An int8 weight is an ``I8`` tensor under the weight's own name, its
scales (and zero points, unless all are zero) beside it as ``<name>::scale`` / ``::zero_point``;
a byte-coded tensor is ``<name>::code`` (``U8``) with its two grid numbers as ``<name>::grid``;
bit-packed low-bit weights are the ``U8`` buffers their modules hold. What a plain reader cannot
guess (which entries are quantized, and how) is one JSON entry of the file's metadata. The size
reported for a model is the bytes of this file, header and names included (~90 bytes a tensor).
Files of the earlier layouts (format "1": one entry per tensor with ``<name>::int``; format "2":
one blob per dtype with a zlib-compressed index) still load, and a study rewrites them in this one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import VitcompressError

WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
# sha256 of the two files above, written last: a file edited, damaged or half-copied since is caught on load.
CHECKSUMS_FILE = "checksums.json"
_SEP = "::"
_FORMAT = "3"  # one standard safetensors entry per tensor, named after the model's (see the module doc)
_META_KEY = "vitcompress"  # the file's one metadata entry: {"format": ..., "layout": ...} as JSON


_F16_MAX = float(torch.finfo(torch.float16).max)
_F16_TINY = float(torch.finfo(torch.float16).smallest_normal)


def _fits_float16(t: torch.Tensor) -> bool:
    """Whether float16 holds ``t``: no overflow, and every value within 2^10 of the largest in normal range.

    Values far below the tensor's largest may become float16 subnormals (absolute error 3e-8),
    which is no loss next to the tensor's own scale; a tensor whose main values would lose precision
    stays float32.
    """
    a = t.detach().abs().float()
    top = float(a.max()) if a.numel() else 0.0
    return top <= _F16_MAX and not ((a >= top * 2**-10) & (a > 0) & (a < _F16_TINY)).any()


SMALL_TENSORS = ("float32", "float16", "uint8")  # how save_artifact stores the float tensors it finds
CODE_MIN_NUMEL = 16  # below this a byte code plus its two float32 numbers costs more than float16


def encode_uint8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One byte per value of a float tensor: ``(codes uint8, [offset, step] float32, grid)``.

    ``grid`` is ``"log2"`` when every value is positive: ``code = round((log2 v - offset) / step)``,
    so each value keeps its sign-free magnitude to a relative error of at most
    ``2**(step / 2) - 1`` (0.5% for a tensor spanning a factor 10); otherwise ``"linear"``:
    ``code = round((v - offset) / step)`` with offset the minimum and step ``(max - min) / 255``.
    :func:`decode_uint8` inverts it.
    """
    v = t.detach().cpu().double().reshape(-1)
    grid = "log2" if v.numel() and bool((v > 0).all()) else "linear"
    if grid == "log2":
        v = torch.log2(v)
    lo, hi = (float(v.min()), float(v.max())) if v.numel() else (0.0, 0.0)
    step = (hi - lo) / 255 if hi > lo else 1.0
    codes = torch.round((v - lo) / step).clamp(0, 255).to(torch.uint8).view(t.shape)
    return codes, torch.tensor([lo, step], dtype=torch.float32), grid


def decode_uint8(codes: torch.Tensor, params: torch.Tensor, grid: str) -> torch.Tensor:
    """The float32 tensor :func:`encode_uint8` coded (its values rounded to the grid)."""
    lo, step = (float(x) for x in params)
    v = lo + codes.double() * step
    return (torch.exp2(v) if grid == "log2" else v).float()


def _codable(key: str, value: torch.Tensor) -> bool:
    """Whether ``small_tensors="uint8"`` codes this tensor: a small one (1-D, or not a layer's weight, such
    as the position embedding) of at least ``CODE_MIN_NUMEL`` finite values. A weight matrix or kernel
    left in float (a head kept float, convs not quantized) stays float16: coding it would quantize a
    layer the method was told to keep."""
    small = value.dim() <= 1 or not key.endswith(".weight")
    return small and value.numel() >= CODE_MIN_NUMEL and bool(torch.isfinite(value).all())


def _flatten(key: str, value: Any, tensors: dict[str, torch.Tensor], layout: dict[str, Any],
             small: str = "float32") -> None:
    float16 = small in ("float16", "uint8")
    if torch.is_tensor(value) and value.is_quantized:
        value = value.detach().cpu()
        tensors[key] = value.int_repr().contiguous()  # the integers under the tensor's own name
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales = value.q_per_channel_scales().to(torch.float32)
            half = float16 and _fits_float16(scales)
            tensors[key + _SEP + "scale"] = scales.to(torch.float16 if half else torch.float32).contiguous()
            layout[key] = {"kind": "qtensor_per_channel", "dtype": str(value.dtype), "axis": value.q_per_channel_axis()}
            zps = value.q_per_channel_zero_points()
            if bool((zps == 0).all()):
                layout[key]["symmetric"] = True  # all zero points are 0: nothing to store
            else:
                # A zero point lies in the integer range of the values, so it fits their own dtype.
                tensors[key + _SEP + "zero_point"] = zps.to(value.int_repr().dtype).contiguous()
        else:
            tensors[key + _SEP + "scale"] = torch.tensor([value.q_scale()], dtype=torch.float64)
            tensors[key + _SEP + "zero_point"] = torch.tensor([value.q_zero_point()], dtype=torch.int32)
            layout[key] = {"kind": "qtensor_per_tensor", "dtype": str(value.dtype)}
    elif (torch.is_tensor(value) and small == "uint8" and value.dtype == torch.float32 and _codable(key, value)):
        codes, params, grid = encode_uint8(value)
        tensors[key + _SEP + "code"] = codes
        tensors[key + _SEP + "grid"] = params
        layout[key] = {"kind": "uint8_" + grid}
    elif torch.is_tensor(value) and float16 and value.dtype == torch.float32 and _fits_float16(value):
        # No layout entry (its name would cost bytes too): loading casts to the module's own dtype.
        tensors[key] = value.detach().cpu().to(torch.float16).contiguous()
    elif torch.is_tensor(value):
        tensors[key] = value.detach().cpu().contiguous()  # plain tensors need no layout entry
    elif isinstance(value, (tuple, list)):
        layout[key] = {"kind": "tuple" if isinstance(value, tuple) else "list", "len": len(value)}
        for i, item in enumerate(value):
            _flatten(f"{key}{_SEP}{i}", item, tensors, layout, small)
    elif value is None:
        layout[key] = {"kind": "none"}
    elif isinstance(value, torch.dtype):
        layout[key] = {"kind": "dtype", "value": str(value)}
    else:
        raise TypeError(f"cannot save state entry {key} of type {type(value).__name__}")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise VitcompressError(f"artifact names unknown dtype {name}; it was not written by this vitcompress")
    return dtype


def _unflatten(key: str, layout: dict[str, Any], f: Any) -> Any:
    entry = layout.get(key, {"kind": "tensor"})
    kind = entry["kind"]
    if kind == "tensor":
        return f.get_tensor(key)
    if kind == "qtensor_per_tensor":
        ints = f.get_tensor(key)
        scale = float(f.get_tensor(key + _SEP + "scale")[0])
        zp = int(f.get_tensor(key + _SEP + "zero_point")[0])
        return _make_q(ints, entry["dtype"], scale=scale, zero_point=zp)
    if kind == "qtensor_per_channel":
        ints = f.get_tensor(key)
        scales = f.get_tensor(key + _SEP + "scale").to(torch.float64)
        zps = (torch.zeros(scales.shape, dtype=torch.int64) if entry.get("symmetric")
               else f.get_tensor(key + _SEP + "zero_point").to(torch.int64))
        return _make_q(ints, entry["dtype"], scales=scales, zero_points=zps, axis=int(entry["axis"]))
    if kind in ("uint8_log2", "uint8_linear"):
        return decode_uint8(f.get_tensor(key + _SEP + "code"), f.get_tensor(key + _SEP + "grid"),
                            kind.removeprefix("uint8_"))
    if kind in ("tuple", "list"):
        items = [_unflatten(f"{key}{_SEP}{i}", layout, f) for i in range(int(entry["len"]))]
        return tuple(items) if kind == "tuple" else items
    if kind == "none":
        return None
    if kind == "dtype":
        return _dtype(entry["value"])
    raise VitcompressError(f"artifact entry {key} has unknown kind {kind!r}; it was not written by this vitcompress")


def _make_q(ints: torch.Tensor, dtype_name: str, **q: Any) -> torch.Tensor:
    # Re-quantize the exact integers: dequantize with the stored scales, then quantize back;
    # integers are recovered exactly because (int - zp) * scale / scale rounds to int.
    dtype = _dtype(dtype_name)
    if "scales" in q:
        real = (ints.to(torch.float64) - q["zero_points"].view(_axis_shape(ints, q["axis"]))) * q["scales"].view(
            _axis_shape(ints, q["axis"])
        )
        out = torch.quantize_per_channel(real.float(), q["scales"], q["zero_points"], q["axis"], dtype)
    else:
        real = (ints.to(torch.float64) - q["zero_point"]) * q["scale"]
        out = torch.quantize_per_tensor(real.float(), q["scale"], q["zero_point"], dtype)
    if not torch.equal(out.int_repr(), ints):
        raise VitcompressError("artifact's integer weights did not round-trip; the file may be corrupt, re-create it")
    return out


def _axis_shape(t: torch.Tensor, axis: int) -> list[int]:
    shape = [1] * t.dim()
    shape[axis] = -1
    return shape


def save_artifact(model: nn.Module, out_dir: str | os.PathLike, meta: dict[str, Any], *,
                  small_tensors: str = "float32") -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/meta.json``; return the weights file.

    ``small_tensors``: how the float32 tensors are stored, one of :data:`SMALL_TENSORS`:
    as they are, as float16 where float16 holds them, or byte-coded (see the module doc).

    Both files are written to temporary names and renamed, so a crash never leaves
    a half-written artifact under the final name.
    """
    if small_tensors not in SMALL_TENSORS:
        raise ValueError(f"small_tensors must be one of {', '.join(SMALL_TENSORS)}, got {small_tensors!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        _flatten(key, value, tensors, layout, small_tensors)
    (out / CHECKSUMS_FILE).unlink(missing_ok=True)  # a crash between the files below leaves no stale hashes
    _write_weights(tensors, layout, out / WEIGHTS_FILE)
    tmp_meta = out / (META_FILE + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_meta, out / META_FILE)
    write_checksums(out)
    return out / WEIGHTS_FILE


class ArtifactChanged(VitcompressError):
    """An artifact's file no longer has the content it was written with (edited, damaged, half-copied)."""

    def __init__(self, art_dir: str | os.PathLike, file: str) -> None:
        self.art_dir, self.file = Path(art_dir), file
        super().__init__(f"{Path(art_dir) / file} changed since it was written (its sha256 is not the one in "
                         f"{CHECKSUMS_FILE}); a study rebuilds it from its chain when run again, or delete "
                         f"{Path(art_dir)} (or restore the file)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(art_dir: str | os.PathLike) -> None:
    """Record the sha256 of the artifact's weights and meta files (written last, atomically)."""
    out = Path(art_dir)
    sums = {name: _sha256(out / name) for name in (WEIGHTS_FILE, META_FILE)}
    tmp = out / (CHECKSUMS_FILE + ".tmp")
    tmp.write_text(json.dumps(sums, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / CHECKSUMS_FILE)


def verify_artifact(art_dir: str | os.PathLike) -> bool:
    """Check the artifact's files against the hashes recorded when it was written; raise `ArtifactChanged`
    (naming the file) on a mismatch, `VitcompressError` when a file is missing.

    An artifact written before hashes were recorded has none: its hashes are recorded now (it is trusted
    as it is, once) and False is returned; True when the hashes were checked.
    """
    art = Path(art_dir)
    for name in (WEIGHTS_FILE, META_FILE):
        if not (art / name).is_file():
            raise VitcompressError(f"{art / name} is missing; a study rebuilds the artifact when run again, or "
                                   f"delete {art}")
    path = art / CHECKSUMS_FILE
    if not path.is_file():
        write_checksums(art)
        return False
    try:
        sums = json.loads(path.read_text())
        if not isinstance(sums, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError):
        raise ArtifactChanged(art, CHECKSUMS_FILE) from None
    for name in (WEIGHTS_FILE, META_FILE):
        if sums.get(name) != _sha256(art / name):
            raise ArtifactChanged(art, name)
    return True


def _write_weights(tensors: dict[str, torch.Tensor], layout: dict[str, Any], path: Path) -> None:
    header = json.dumps({"format": _FORMAT, "layout": layout}, separators=(",", ":"), sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    # One metadata entry: safetensors writes several in no fixed order, and equal models must give equal files.
    save_file(dict(sorted(tensors.items())), str(tmp), metadata={_META_KEY: header})
    os.replace(tmp, path)


def upgrade_artifact(art_dir: str | os.PathLike) -> bool:
    """Rewrite a weights file of an earlier layout (format "1" or "2") in the standard one; True if it did.

    Bit-exact: the stored tensors are copied as stored (float16 stays float16), only the
    all-zero zero points of symmetric per-channel tensors are dropped.
    """
    path = Path(art_dir) / WEIGHTS_FILE

    def rewrite(layout: dict[str, Any], f: Any) -> bool:
        if not isinstance(f, _Legacy):
            return False
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        for key, entry in layout.items():
            zp = tensors.get(key + _SEP + "zero_point")
            if entry["kind"] == "qtensor_per_channel" and zp is not None and bool((zp == 0).all()):
                del tensors[key + _SEP + "zero_point"]
                entry["symmetric"] = True
        _write_weights(tensors, layout, path)
        write_checksums(path.parent)
        return True
    return _open(path, rewrite)


# The index of a packed file, decompressed, at most (ViT-B's is ~15 kB; this allows some 40,000 tensors). A
# hostile file's index is a zip bomb otherwise: 65 kB of zlib can hold 67 MB of JSON, 1.3 GB of Python lists.
MAX_INDEX_BYTES = 4 << 20


def _read_index(text: str) -> dict[str, Any]:
    """The packed file's index: base64, zlib, JSON; decompressed to at most ``MAX_INDEX_BYTES``."""
    raw = base64.b64decode(text, validate=True)
    inflate = zlib.decompressobj()
    data = inflate.decompress(raw, MAX_INDEX_BYTES)
    if inflate.unconsumed_tail or not inflate.eof:
        raise ValueError("index larger than any vitcompress writes, or cut short")
    packed = json.loads(data)
    if not isinstance(packed, dict) or not isinstance(packed.get("index"), list) or not isinstance(
            packed.get("layout"), dict):
        raise ValueError("not a vitcompress index")
    return packed


class _Stored:
    """The stored tensors of a packed file, by name (what ``_unflatten`` reads from)."""

    def __init__(self, f: Any, index: list[list[Any]]):
        blobs = {name: f.get_tensor(name) for name in f.keys()}
        at = dict.fromkeys(blobs, 0)
        self.tensors: dict[str, torch.Tensor] = {}
        for entry in index:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and entry[1] in blobs and isinstance(entry[2], list)
                    and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in entry[2])):
                raise ValueError("malformed index entry")
            key, dtype, shape = entry
            n = math.prod(shape)
            blob = blobs[dtype]
            if at[dtype] + n > blob.numel():
                raise ValueError(f"index runs past the {dtype} data")
            self.tensors[key] = blob[at[dtype]:at[dtype] + n].view(shape)
            at[dtype] += n
        if any(at[name] != blobs[name].numel() for name in blobs):
            raise ValueError("data left over after the index")

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def keys(self) -> list[str]:
        return list(self.tensors)


class _Legacy:
    """A file of an earlier layout read under today's names: its quantized integers, stored as
    ``<name>::int``, answer to ``<name>``."""

    def __init__(self, f: Any):
        self.f = f
        self.names = {name.removesuffix(_SEP + "int"): name for name in f.keys()}

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.f.get_tensor(self.names[key])

    def keys(self) -> list[str]:
        return list(self.names)


def read_meta(art_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(art_dir) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VitcompressError(f"{art_dir} is not a vitcompress artifact (no {META_FILE}); pass an artifact folder") from None
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise VitcompressError(f"{path} is corrupt ({why}); a study rebuilds the artifact when run again, or delete "
                               f"{art_dir}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or not isinstance(
            meta.get("steps", []), list):
        raise VitcompressError(f"{path} is not a vitcompress artifact's meta (no model, or steps not a list); a "
                               f"study rebuilds the artifact when run again, or delete {art_dir}")
    return meta


def _open(path: Path, use: Any) -> Any:
    """Call ``use(layout, stored)`` on the file's layout and stored tensors; one-line errors for bad files."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if _META_KEY in metadata:
                if len(metadata[_META_KEY]) > MAX_INDEX_BYTES:
                    raise ValueError("layout larger than any vitcompress writes")
                header = json.loads(metadata[_META_KEY])
                if not isinstance(header, dict) or header.get("format") != _FORMAT:
                    found = header.get("format") if isinstance(header, dict) else None
                    raise VitcompressError(f"{path} is in weights format {found!r}, not {_FORMAT!r}: written by "
                                           "another vitcompress version; load it with that version")
                if not isinstance(header.get("layout"), dict):
                    raise ValueError("not a vitcompress layout")
                return use(header["layout"], f)
            if "vitcompress_index" in metadata:  # format "2": one blob per dtype
                packed = _read_index(metadata["vitcompress_index"])
                if packed.get("format") != "2":
                    raise VitcompressError(f"{path} is in weights format {packed.get('format')!r}, not {_FORMAT!r}: "
                                           "written by another vitcompress version; load it with that version")
                return use(packed["layout"], _Legacy(_Stored(f, packed["index"])))
            layout = metadata["vitcompress_layout"]  # format "1"
            if len(layout) > MAX_INDEX_BYTES:
                raise ValueError("layout larger than any vitcompress writes")
            return use(json.loads(layout), _Legacy(f))
    except VitcompressError:
        raise
    except FileNotFoundError:
        raise VitcompressError(f"{path} is missing; re-run the study to re-create the artifact") from None
    except Exception as exc:
        raise VitcompressError(
            f"cannot read {path} ({type(exc).__name__}); the file is corrupt or truncated: delete it and re-run"
        ) from None


def read_state(art_dir: str | os.PathLike) -> dict[str, Any]:
    """The state dict stored in an artifact, quantized tensors rebuilt."""
    def state(layout: dict[str, Any], f: Any) -> dict[str, Any]:
        keys = set(layout) | set(f.keys())
        return {key: _unflatten(key, layout, f) for key in sorted(keys) if _SEP not in key}
    return _open(Path(art_dir) / WEIGHTS_FILE, state)


def stored_tensors(art_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors as the file stores them, by name, in their storage dtype (what ``load_file`` returns).

    A quantized tensor appears as its integers under its own name and its parts beside it
    (``<name>::scale``, ...); this is what a reader checks to see that integer weights are
    stored as integers.
    """
    return _open(Path(art_dir) / WEIGHTS_FILE, lambda layout, f: {k: f.get_tensor(k) for k in f.keys()})


def load_artifact(art_dir: str | os.PathLike, *, verify: bool = True) -> nn.Module:
    """Rebuild the model saved in ``art_dir``: structure from meta.json, tensors from safetensors.

    ``verify``: first check both files against the hashes recorded when they were written
    (`verify_artifact`), so a damaged or edited artifact is never measured as if it were the method's.
    """
    from .methods import get_method, parse_config
    from .models import ModelSpec, create_model

    if verify:
        verify_artifact(art_dir)
    meta = read_meta(art_dir)
    try:
        spec_data = dict(meta["model"])
        spec_data["pretrained"] = False
        spec_data["checkpoint"] = None
        model = create_model(ModelSpec(**spec_data))
        for i, step in enumerate(meta.get("steps", [])):
            method = get_method(step["method"])
            if method.restore is not None:
                cfg = parse_config(step["method"], step["config"], f"{art_dir}/meta.json steps[{i}]")
                model = method.restore(model, cfg, step.get("meta", {}))
    except VitcompressError:
        raise
    except Exception as exc:  # a meta.json edited or damaged past its JSON: it describes no model we can build
        raise VitcompressError(
            f"{Path(art_dir) / META_FILE} does not describe a model this version can build ({type(exc).__name__}: "
            f"{str(exc)[:120]}); a study rebuilds the artifact when run again, or delete {art_dir}") from None
    own = model.state_dict()
    state = OrderedDict((key, _like(value, own.get(key))) for key, value in read_state(art_dir).items())
    # Module versions steer how quantized modules read their entries; they are not in the file
    # (nothing but tensors is), so take them from the freshly rebuilt structure.
    state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise VitcompressError(
            f"artifact {art_dir} does not match its own meta.json ({str(exc).splitlines()[0]}); delete it and re-run"
        ) from None
    return model.eval()


def _like(key_value: Any, reference: Any) -> Any:
    """Cast a float tensor read from the file (float16 storage) to the dtype of the module's own entry."""
    if isinstance(key_value, (tuple, list)) and isinstance(reference, (tuple, list)) and len(key_value) == len(reference):
        return type(key_value)(_like(v, r) for v, r in zip(key_value, reference))
    if (torch.is_tensor(key_value) and torch.is_tensor(reference) and not key_value.is_quantized
            and not reference.is_quantized and key_value.is_floating_point() and reference.is_floating_point()):
        return key_value.to(reference.dtype)
    return key_value


def size_on_disk(art_dir: str | os.PathLike) -> int:
    """Bytes of the saved weights file (what a user ships), read from the file system."""
    return (Path(art_dir) / WEIGHTS_FILE).stat().st_size
