"""Bit packing of low-bit integer tensors into ``uint8`` bytes, with an exact inverse.

The format is a little-endian bit stream: value ``i`` occupies stream bits
``[i * bits, (i + 1) * bits)``, and byte ``j`` holds stream bits ``[8j, 8j + 8)``
with the lowest stream bit in the byte's least significant bit. So at 4 bits two
values share a byte (the first in the low nibble), and at 3 bits eight values
fill exactly three bytes, some values straddling a byte boundary. ``n`` values
take exactly ``ceil(n * bits / 8)`` bytes; the unused high bits of the last
byte are zero. Signed values are stored as their ``bits``-bit two's complement.

This is what makes a QAT artifact's file really small: the packed bytes are
what safetensors writes, so the size read from the file is the packed size.
"""

from __future__ import annotations

import math

import torch

MAX_BITS = 16


def packed_numel(numel: int, bits: int) -> int:
    """Bytes that ``numel`` values of ``bits`` bits take: ``ceil(numel * bits / 8)``."""
    return -(-numel * bits // 8)


def value_range(bits: int, signed: bool) -> tuple[int, int]:
    """Smallest and largest integer a ``bits``-bit field holds."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def _check_bits(bits: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= MAX_BITS):
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``values`` (any shape, flattened in C order) into a 1-D ``uint8`` tensor.

    Every value must fit ``bits`` bits, either as unsigned (``0 .. 2**bits - 1``)
    or signed (``-2**(bits-1) .. 2**(bits-1) - 1``); a value outside both ranges
    raises instead of being silently wrapped.
    """
    _check_bits(bits)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"pack_bits needs an integer tensor, got {values.dtype}")
    flat = values.detach().reshape(-1).to(torch.int64)
    n = flat.numel()
    if n and (int(flat.min()) < -(1 << (bits - 1)) or int(flat.max()) > (1 << bits) - 1):
        raise ValueError(f"values in [{int(flat.min())}, {int(flat.max())}] do not fit {bits} bits")
    # Two's complement of negative values is their low `bits` bits.
    flat = flat & ((1 << bits) - 1)
    # Eight values are exactly `bits` bytes of the stream, so work in chunks of eight.
    chunks = -(-n // 8)
    flat = torch.nn.functional.pad(flat, (0, chunks * 8 - n)).view(chunks, 8)
    if bits <= 8:
        # One chunk fits an int64 word: value k sits at word bits [k*bits, (k+1)*bits).
        shifts = torch.arange(8, dtype=torch.int64, device=flat.device) * bits
        word = (flat << shifts).sum(dim=1)  # (chunks,)  disjoint bit fields: sum == bitwise or
        byte_shifts = torch.arange(bits, dtype=torch.int64, device=flat.device) * 8
        out = (word[:, None] >> byte_shifts) & 0xFF  # (chunks, bits)
    else:
        # Wider values: spell the stream out bit by bit (slower, still exact).
        bit_idx = torch.arange(bits, dtype=torch.int64, device=flat.device)
        stream = ((flat[:, :, None] >> bit_idx) & 1).reshape(chunks, bits, 8)  # (chunks, bytes, 8 bits)
        out = (stream << torch.arange(8, dtype=torch.int64, device=flat.device)).sum(dim=2)
    return out.reshape(-1)[: packed_numel(n, bits)].to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int, signed: bool) -> torch.Tensor:
    """The ``numel`` values that :func:`pack_bits` stored in ``packed``, as ``int32`` (1-D).

    ``signed`` says whether to read each field as two's complement. Exact: for
    any ``v`` that fits, ``unpack_bits(pack_bits(v, b), b, v.numel(), signed) == v.flatten()``.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    need = packed_numel(numel, bits)
    if packed.numel() != need:
        raise ValueError(f"{numel} values of {bits} bits take {need} bytes, got {packed.numel()}")
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        # Values never straddle bytes: shift each byte in place (uint8 work, the fast path a forward uses).
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        vals = ((packed[:, None] >> shifts) & mask).reshape(-1)[:numel]  # (numel,) uint8
        if signed:
            # Move the field's sign bit to bit 7 and shift back arithmetically.
            vals = (vals << (8 - bits)).view(torch.int8) >> (8 - bits)
        return vals.to(torch.int32)
    chunks = -(-numel // 8)
    if bits < 8:
        # Eight values are one word of `bits` bytes; int32 when the word fits 31 bits.
        word_dtype = torch.int32 if 8 * bits <= 31 else torch.int64
        data = torch.nn.functional.pad(packed.to(word_dtype), (0, chunks * bits - need)).view(chunks, bits)
        byte_shifts = torch.arange(bits, dtype=word_dtype, device=packed.device) * 8
        word = (data << byte_shifts).sum(dim=1, dtype=word_dtype)  # (chunks,)
        shifts = torch.arange(8, dtype=word_dtype, device=packed.device) * bits
        vals = (word[:, None] >> shifts) & mask  # (chunks, 8)
    else:
        data = torch.nn.functional.pad(packed.to(torch.int64), (0, chunks * bits - need)).view(chunks, bits)
        stream = (data[:, :, None] >> torch.arange(8, dtype=torch.int64, device=packed.device)) & 1
        stream = stream.reshape(chunks, 8, bits)  # (chunks, value, bit)
        vals = (stream << torch.arange(bits, dtype=torch.int64, device=packed.device)).sum(dim=2)
    vals = vals.reshape(-1)[:numel]
    if signed:
        vals = vals - ((vals >> (bits - 1)) & 1) * (1 << bits)
    return vals.to(torch.int32)


def bits_for(max_value: int) -> int:
    """Fewest bits (at least 1) that hold unsigned integers up to ``max_value``."""
    return max(1, math.ceil(math.log2(max_value + 1))) if max_value > 0 else 1
