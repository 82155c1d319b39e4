"""Bit-packing of unsigned integer codes into ``uint8`` storage, with no byte per value below 8 bits.

Codes are packed along the last dimension in *chunks*: the smallest run of values that fills whole
bytes (int2: 4 values -> 1 byte, int3: 8 values -> 3 bytes, int4: 2 -> 1, int6: 4 -> 3, int8: 1 -> 1).

The layout is *planar*: a row of ``n`` codes is cut into ``values`` planes of ``m = ceil(n / values)``
consecutive codes (zero-padded), plane ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of a little-endian
word per position, and the packed row is the ``nbytes`` byte-planes of those words, one after another.
Unpacking therefore works on contiguous runs of ``m`` bytes with a few uint8 shifts per plane, which
measured 2-5x faster on CPU than the interleaved chunk order (int4, 960x576: 34 vs 179 us; int3: 167
vs 386 us). The layout is device independent; all operations are vectorised torch ops.
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
    n = codes.shape[-1]
    m = -(-n // values)
    if m * values != n:
        codes = torch.nn.functional.pad(codes, (0, m * values - n))
    c = codes.to(torch.int32)
    word = c[..., :m].clone()
    for i in range(1, values):
        word |= c[..., i * m : (i + 1) * m] << (i * bits)
    return torch.cat([((word >> (8 * j)) & 0xFF).to(torch.uint8) for j in range(nbytes)], dim=-1)


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
    m = packed.shape[-1] // nbytes
    planes = [packed[..., j * m : (j + 1) * m] for j in range(nbytes)]
    mask = (1 << bits) - 1
    out = []
    for i in range(values):
        j, r = divmod(i * bits, 8)
        v = planes[j] >> r if r else planes[j]
        if r + bits > 8:  # this code straddles two bytes
            v = v | (planes[j + 1] << (8 - r))
        if r + bits != 8:  # the top code of a byte needs no mask
            v = v & mask
        out.append(v)
    return torch.cat(out, dim=-1)[..., :n]
