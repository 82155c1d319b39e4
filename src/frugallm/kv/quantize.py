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


def gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t: [*lead, N, C]``, ``idx: [*lead, keep]`` -> ``[*lead, keep, C]``."""
    return torch.gather(t, -2, idx[..., None].expand(*idx.shape, t.shape[-1]))


class QuantizedSequence:
    """A growing sequence ``[*lead, N, C]`` whose oldest tokens are quantized and newest stay exact.

    ``axis="channel"``: one (scale, zero) per channel for every ``group`` consecutive tokens (KIVI keys,
    XQuant's X: outlier channels keep their own range); ``axis="token"``: one per token for every
    ``group`` channels (KIVI values). Tokens wait in a full-precision buffer and are quantized
    ``flush`` at a time once more than ``residual`` are waiting, so the newest ``residual`` are always
    exact. :meth:`gather` drops single quantized tokens: for ``axis="channel"`` each token then keeps
    a pointer to its group's (scale, zero), and entries no token points to are freed.
    """

    def __init__(self, lead: tuple[int, ...], channels: int, bits: int, *, axis: str, group: int, residual: int,
                 flush: int, dtype: torch.dtype, device: torch.device) -> None:
        assert axis in ("channel", "token") and (axis == "token" or flush % group == 0)
        self.bits, self.axis, self.group, self.residual, self.flush = bits, axis, group, residual, flush
        self.channels, self.dtype = channels, dtype
        packed = pack(torch.zeros(channels, dtype=torch.uint8), bits).shape[0]
        self.codes = torch.empty(*lead, 0, packed, dtype=torch.uint8, device=device)
        ncols = channels if axis == "channel" else channels // group
        self.scale = torch.empty(*lead, 0, ncols, dtype=torch.float16, device=device)
        self.zero = torch.empty_like(self.scale)
        self.gid: torch.Tensor | None = None  # [*lead, nq] int32, once tokens were dropped (axis="channel")
        self.res = torch.empty(*lead, 0, channels, dtype=dtype, device=device)

    @property
    def num_quantized(self) -> int:
        return self.codes.shape[-2]

    @property
    def num_slots(self) -> int:
        return self.num_quantized + self.res.shape[-2]

    def append(self, x: torch.Tensor) -> None:
        self.res = torch.cat([self.res, x.to(self.dtype)], dim=-2)
        waiting = self.res.shape[-2] - self.residual
        if waiting >= self.flush:
            self._quantize(waiting // self.flush * self.flush)

    def _quantize(self, m: int) -> None:
        chunk, lead = self.res[..., :m, :], self.res.shape[:-2]
        if self.axis == "channel":
            ng = m // self.group
            codes, scale, zero = quantize(chunk.reshape(*lead, ng, self.group, self.channels), self.bits, dim=-2)
            codes, scale, zero = codes.reshape(chunk.shape), scale.squeeze(-2), zero.squeeze(-2)
            if self.gid is not None:
                first = self.scale.shape[-2]
                new = torch.arange(first, first + ng, dtype=torch.int32, device=chunk.device).repeat_interleave(
                    self.group)
                self.gid = torch.cat([self.gid, new.expand(*lead, m)], dim=-1)
            self.codes = torch.cat([self.codes, pack(codes, self.bits)], dim=-2)
        else:
            packed, scale, zero = quantize_groups(chunk, self.bits, self.group)
            self.codes = torch.cat([self.codes, packed], dim=-2)
        self.scale = torch.cat([self.scale, scale], dim=-2)
        self.zero = torch.cat([self.zero, zero], dim=-2)
        self.res = self.res[..., m:, :].clone()

    def dequantized(self) -> torch.Tensor:
        """The quantized tokens ``[*lead, nq, C]`` in ``dtype``."""
        if self.axis == "token":
            return dequantize_groups(self.codes, self.scale, self.zero, self.bits, self.channels, self.dtype)
        if self.gid is None:
            scale = self.scale.repeat_interleave(self.group, dim=-2)
            zero = self.zero.repeat_interleave(self.group, dim=-2)
        else:
            scale, zero = gather_tokens(self.scale, self.gid.long()), gather_tokens(self.zero, self.gid.long())
        return dequantize(unpack(self.codes, self.bits, self.channels), scale, zero, self.dtype)

    def materialize(self) -> torch.Tensor:
        if self.num_quantized == 0:
            return self.res
        return torch.cat([self.dequantized(), self.res], dim=-2)

    def gather(self, idx: torch.Tensor) -> None:
        """Keep tokens ``idx: [*lead, keep]`` (ascending); the full-precision buffer must all be kept."""
        nq, r = self.num_quantized, self.res.shape[-2]
        keep_q = idx.shape[-1] - r
        assert keep_q >= 0 and bool((idx[..., keep_q:] >= nq).all()), "the full-precision window must be kept"
        qidx = idx[..., :keep_q]
        self.codes = gather_tokens(self.codes, qidx)
        if self.axis == "token":
            self.scale, self.zero = gather_tokens(self.scale, qidx), gather_tokens(self.zero, qidx)
            return
        if self.gid is None:
            self.gid = (torch.arange(nq, device=idx.device, dtype=torch.int32) // self.group).expand(
                *self.codes.shape[:-2], nq)
        self.gid = torch.gather(self.gid, -1, qidx)
        used = torch.zeros(self.scale.shape[-2], dtype=torch.bool, device=idx.device)
        used[self.gid.long().flatten()] = True
        if not bool(used.all()):  # free the (scale, zero) entries of groups nobody points to any more
            self.gid = (used.cumsum(0) - 1).to(torch.int32)[self.gid.long()]
            self.scale, self.zero = self.scale[..., used, :], self.zero[..., used, :]

    def nbytes(self) -> int:
        return nbytes(self.codes, self.scale, self.zero, self.gid, self.res)
