"""Bit-packing of unsigned integer codes into ``uint8`` storage, with no byte per value below 8 bits.

Codes are packed along the last dimension in *chunks*: the smallest run of values that fills whole
bytes (int2: 4 values -> 1 byte, int3: 8 values -> 3 bytes, int4: 2 -> 1, int6: 4 -> 3, int8: 1 -> 1).
Inside a chunk value ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of a little-endian word, so the layout
is the same on every device and every byte order. All operations are vectorised torch ops (shifts,
masks, sums) and run on whatever device the input lives on.
"""

from __future__ import annotations

import math

import torch

from frugallm.errors import FrugalError

SUPPORTED_BITS = (2, 3, 4, 6, 8)


def chunk_shape(bits: int) -> tuple[int, int]:
    """``(values, bytes)`` per packing chunk for ``bits``-bit codes, e.g. ``(8, 3)`` for int3."""
    if bits not in SUPPORTED_BITS:
        raise FrugalError(f"cannot pack {bits}-bit codes; supported widths: {SUPPORTED_BITS}")
    values = 8 // math.gcd(8, bits)
    return values, values * bits // 8


def packed_size(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits (the last chunk is zero-padded)."""
    values, nbytes = chunk_shape(bits)
    return -(-n // values) * nbytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes along the last dimension.

    Parameters
    ----------
    codes : integer tensor ``[..., n]`` with values in ``[0, 2**bits)``.
    bits : one of :data:`SUPPORTED_BITS`.

    Returns
    -------
    ``uint8`` tensor ``[..., packed_size(n, bits)]`` on the same device.
    """
    values, nbytes = chunk_shape(bits)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    *lead, n = codes.shape
    pad = -n % values
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    chunks = codes.reshape(*lead, -1, values)
    if nbytes == 1:
        # int2 / int4: the whole chunk is one byte, so stay in uint8 (4x less temporary memory).
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return (chunks.to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)
    # int3 / int6: a chunk is a 24-bit word; the fields are disjoint, so a sum is a bitwise OR.
    shifts = torch.arange(0, values * bits, bits, dtype=torch.int32, device=codes.device)
    word = (chunks.to(torch.int32) << shifts).sum(-1, dtype=torch.int32)
    byte_shifts = torch.arange(0, 8 * nbytes, 8, dtype=torch.int32, device=codes.device)
    out = ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8)
    return out.reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [..., packed_size(n, bits)]`` -> ``uint8 [..., n]``."""
    values, nbytes = chunk_shape(bits)
    if packed.shape[-1] != packed_size(n, bits):
        raise FrugalError(
            f"packed last dimension {packed.shape[-1]} does not hold {n} {bits}-bit codes "
            f"(expected {packed_size(n, bits)} bytes)"
        )
    if bits == 8:
        return packed
    *lead, _ = packed.shape
    mask = (1 << bits) - 1
    if nbytes == 1:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        out = (packed.unsqueeze(-1) >> shifts) & mask
    else:
        b = packed.reshape(*lead, -1, nbytes).to(torch.int32)
        byte_shifts = torch.arange(0, 8 * nbytes, 8, dtype=torch.int32, device=packed.device)
        word = (b << byte_shifts).sum(-1, dtype=torch.int32)
        shifts = torch.arange(0, values * bits, bits, dtype=torch.int32, device=packed.device)
        out = ((word.unsqueeze(-1) >> shifts) & mask).to(torch.uint8)
    return out.reshape(*lead, -1)[..., :n]
