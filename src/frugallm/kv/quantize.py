"""Asymmetric min/max quantization and bit packing shared by KIVI and XQuant.

Codes are packed ``8 // bits`` to a byte along the last dimension; scales and zero points are stored
in fp16 and the codes are computed against the rounded fp16 values, so dequantization is exact with
respect to what is stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED_BITS = (2, 4, 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[..., n]`` codes below ``2**bits`` -> uint8 ``[..., ceil(n * bits / 8)]``."""
    per = 8 // bits
    if per == 1:
        return codes
    pad = (-codes.shape[-1]) % per
    if pad:
        codes = F.pad(codes, (0, pad))
    c = codes.view(*codes.shape[:-1], -1, per)
    out = c[..., 0].clone()
    for i in range(1, per):
        out |= c[..., i] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., m]`` -> uint8 ``[..., n]``."""
    per = 8 // bits
    if per == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)[..., :n]


def quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` with one (scale, zero) per slice reduced along ``dim``.

    Returns ``codes`` uint8 shaped like ``x`` and fp16 ``scale, zero`` with ``dim`` kept as size 1;
    ``x ~= codes * scale + zero``.
    """
    levels = (1 << bits) - 1
    xf = x.float()
    mn, mx = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    zero = mn.to(torch.float16)
    scale = ((mx - zero.float()) / levels).to(torch.float16)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = ((xf - zero.float()) / s).round_().clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale + zero`` in ``dtype`` (computed in fp32)."""
    return (codes.float() * scale.float() + zero.float()).to(dtype)


def quantize_groups(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token quantization of ``x: [..., C]`` in groups of ``group`` channels (``C % group == 0``).

    Returns packed codes ``[..., ceil(C * bits / 8)]`` and fp16 ``scale, zero: [..., C // group]``.
    """
    c = x.shape[-1]
    codes, scale, zero = quantize(x.reshape(*x.shape[:-1], c // group, group), bits, dim=-1)
    return pack(codes.reshape(x.shape), bits), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_groups(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, channels: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize_groups` -> ``[..., channels]`` in ``dtype``."""
    ng = scale.shape[-1]
    codes = unpack(packed, bits, channels).reshape(*packed.shape[:-1], ng, channels // ng)
    return dequantize(codes, scale.unsqueeze(-1), zero.unsqueeze(-1), dtype).reshape(*packed.shape[:-1], channels)


def channel_group(channels: int, group: int) -> int:
    """Largest usable group size <= ``group`` that divides ``channels`` (falls back to all channels)."""
    g = min(group, channels)
    return g if channels % g == 0 else channels


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
