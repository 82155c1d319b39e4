"""Asymmetric min/max quantization and bit packing shared by KIVI and XQuant.

Codes are packed ``8 // bits`` to a byte along the last dimension; scales and zero points are stored
in fp16 (or fp8 e4m3 where the caller asks) and the codes are computed against the rounded stored
values, so dequantization is exact with respect to what is stored.
"""

from __future__ import annotations

import functools
from typing import Any

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


FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0  # largest finite e4m3 value: larger scales/zeros saturate instead of becoming NaN


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` stored as ``dtype`` (fp8 saturates), back in fp32."""
    if dtype == FP8:
        t = t.clamp(-_FP8_MAX, _FP8_MAX)
    return t.to(dtype).float()


def encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of ``x`` against stored ``scale, zero`` (broadcastable to ``x``)."""
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    return ((x.float() - zero.float()) / s).round_().clamp_(0, (1 << bits) - 1).to(torch.uint8)


def quantize(
    x: torch.Tensor,
    bits: int,
    dim: int,
    *,
    clip: float = 1.0,
    scale_dtype: torch.dtype = torch.float16,
    zero_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` with one (scale, zero) per slice reduced along ``dim``.

    Returns ``codes`` uint8 shaped like ``x`` and ``scale, zero`` (in ``scale_dtype``, ``zero_dtype``)
    with ``dim`` kept as size 1; ``x ~= codes * scale + zero``. The codes are computed against the
    stored (rounded) scale and zero, so dequantization reproduces exactly what the error search saw.
    ``clip < 1`` searches range shrink factors ``1, 0.95, ..., clip`` around each slice's midpoint and
    keeps the one with the least squared error: at 2 bits a min/max grid spends most of its four
    levels on a few extreme values, and trading them for a finer step lowers the error of the rest.
    """
    levels = (1 << bits) - 1
    xf = x.float()
    mn, mx = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    steps = max(0, round((1.0 - clip) / 0.05))
    if steps:  # every candidate at once along a new leading dim; shrink 1 (plain min/max) is one of them
        shrink = (1.0 - 0.05 * torch.arange(steps + 1, device=x.device)).view(-1, *[1] * x.dim())
        mid, half = (mn + mx) / 2, (mx - mn) / 2
        mn, mx = mid - shrink * half, mid + shrink * half
    zero = _round(mn, zero_dtype)
    scale = _round((mx - zero) / levels, scale_dtype)
    codes = encode(xf, scale, zero, bits)
    if steps:
        err = (codes.float() * scale + zero - xf).square_().sum(dim, keepdim=True)
        best = err.argmin(0, keepdim=True)
        codes = codes.gather(0, best.expand(1, *codes.shape[1:]))[0]
        scale, zero = scale.gather(0, best)[0], zero.gather(0, best)[0]
    return codes, scale.to(scale_dtype), zero.to(zero_dtype)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale + zero`` in ``dtype`` (computed in fp32; in place on the codes' fp32 copy, no temporaries
    of the full size: the paged engine dequantizes every packed token at every decode step)."""
    return codes.float().mul_(scale.float()).add_(zero.float()).to(dtype)


def quantize_groups(
    x: torch.Tensor, bits: int, group: int, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token quantization of ``x: [..., C]`` in groups of ``group`` channels (``C % group == 0``).

    Returns packed codes ``[..., ceil(C * bits / 8)]`` and ``scale, zero: [..., C // group]``; ``kw``
    as for :func:`quantize`.
    """
    c = x.shape[-1]
    codes, scale, zero = quantize(x.reshape(*x.shape[:-1], c // group, group), bits, dim=-1, **kw)
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


@functools.cache
def _hadamard_cpu(n: int) -> torch.Tensor:
    block = n & -n  # largest power of two dividing n
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return torch.block_diag(*[h / block**0.5] * (n // block))


def hadamard(n: int, device: torch.device) -> torch.Tensor:
    """Orthonormal, symmetric fp32 ``[n, n]`` Walsh-Hadamard matrix (block-diagonal when ``n`` is not a
    power of two), so ``(x @ H) @ H == x``. Rotating a vector by it spreads outlier channels over all
    the others (QuaRot), which shrinks the range a per-token quantization group has to cover."""
    return _hadamard_cpu(n).to(device)


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t: [*lead, N, C]``, ``idx: [*lead, keep]`` -> ``[*lead, keep, C]``."""
    if t.dtype == FP8:  # no CPU gather kernel for fp8: move the bytes as uint8
        return gather_tokens(t.view(torch.uint8), idx).view(FP8)
    return torch.gather(t, -2, idx[..., None].expand(*idx.shape, t.shape[-1]))


class QuantizedSequence:
    """A growing sequence ``[*lead, N, C]`` whose oldest tokens are quantized and newest stay exact.

    Slots are ``[sinks | quantized | window]``. The first ``sinks`` tokens ever appended stay exact
    (attention sinks: they draw a large share of attention and their outlier values would widen the
    range of the group they fall in); the newest tokens wait in a full-precision window and are
    quantized ``flush`` at a time once more than ``residual`` are waiting, so the newest ``residual``
    are always exact.

    ``axis="channel"``: one (scale, zero) per channel for every ``group`` consecutive tokens (KIVI keys,
    XQuant's X: outlier channels keep their own range). A group's (scale, zero) is computed once all
    its tokens have arrived, from the group's members that are still exact in the window; its
    tokens are then encoded against it as they leave the window, so with ``residual >= group - 1``
    and ``flush=1`` exactly ``residual`` tokens are exact (no extra tokens wait for a group to fill).
    ``axis="token"``: one (scale, zero) per token for every ``group`` channels (KIVI values), after
    an optional Hadamard ``rotate`` of the channels (undone on dequantization).

    :meth:`gather` drops single quantized tokens: for ``axis="channel"`` each token then keeps a
    pointer to its group's (scale, zero), and entries no token points to are freed.
    """

    def __init__(self, lead: tuple[int, ...], channels: int, bits: int, *, axis: str, group: int, residual: int,
                 flush: int, dtype: torch.dtype, device: torch.device, sinks: int = 0, clip: float = 1.0,
                 scale_dtype: torch.dtype = torch.float16, zero_dtype: torch.dtype = torch.float16,
                 rotate: bool = False) -> None:
        assert axis in ("channel", "token") and (axis == "token" or flush == 1 or flush % group == 0)
        assert not (rotate and axis == "channel"), "a rotation mixes the channels a per-channel range keeps apart"
        self.bits, self.axis, self.group, self.residual, self.flush = bits, axis, group, residual, flush
        self.channels, self.dtype, self.sinks = channels, dtype, sinks
        self.qargs: dict[str, Any] = dict(clip=clip, scale_dtype=scale_dtype, zero_dtype=zero_dtype)
        self.rotation = hadamard(channels, device) if rotate else None
        packed = pack(torch.zeros(channels, dtype=torch.uint8), bits).shape[0]
        self.codes = torch.empty(*lead, 0, packed, dtype=torch.uint8, device=device)
        ncols = channels if axis == "channel" else channels // group
        self.scale = torch.empty(*lead, 0, ncols, dtype=scale_dtype, device=device)
        self.zero = torch.empty(*lead, 0, ncols, dtype=zero_dtype, device=device)
        self.filled = 0  # axis="channel": tokens of the last group already encoded (0: no group open)
        self.gid: torch.Tensor | None = None  # [*lead, nq] int32, once tokens were dropped (axis="channel")
        self.sink = torch.empty(*lead, 0, channels, dtype=dtype, device=device)
        self.res = torch.empty(*lead, 0, channels, dtype=dtype, device=device)

    @property
    def num_quantized(self) -> int:
        return self.codes.shape[-2]

    @property
    def num_slots(self) -> int:
        return self.sink.shape[-2] + self.num_quantized + self.res.shape[-2]

    def append(self, x: torch.Tensor) -> None:
        x = x.to(self.dtype)
        take = min(self.sinks - self.sink.shape[-2], x.shape[-2])
        if take > 0:
            self.sink = torch.cat([self.sink, x[..., :take, :]], dim=-2)
            x = x[..., take:, :]
        self.res = torch.cat([self.res, x], dim=-2)
        m = (self.res.shape[-2] - self.residual) // self.flush * self.flush
        if self.axis == "channel" and m > 0:
            # Only tokens whose group has fully arrived: the open group's rest, then whole groups.
            head = -self.filled % self.group
            m = min(m, head + (self.res.shape[-2] - head) // self.group * self.group)
        if m > 0:
            self._quantize(m)

    def _quantize(self, m: int) -> None:
        lead = self.res.shape[:-2]
        if self.axis == "token":
            chunk = self.res[..., :m, :].float()
            if self.rotation is not None:
                chunk = chunk @ self.rotation
            packed, scale, zero = quantize_groups(chunk, self.bits, self.group, **self.qargs)
            self.codes = torch.cat([self.codes, packed], dim=-2)
            self.scale = torch.cat([self.scale, scale], dim=-2)
            self.zero = torch.cat([self.zero, zero], dim=-2)
            self.res = self.res[..., m:, :].clone()
            return
        g = self.group
        head = min(-self.filled % g, m)
        parts = []
        if head:  # the open group's next tokens, against its stored (scale, zero)
            parts.append(encode(self.res[..., :head, :], self.scale[..., -1:, :], self.zero[..., -1:, :], self.bits))
        ng = (m - head + g - 1) // g  # new groups: all their tokens are in the window (append checked)
        if ng:
            span = self.res[..., head:head + ng * g, :]
            codes, scale, zero = quantize(span.reshape(*lead, ng, g, self.channels), self.bits, dim=-2,
                                          **self.qargs)
            parts.append(codes.reshape(span.shape)[..., :m - head, :])
        if self.gid is not None:
            first = self.scale.shape[-2]
            ids = [torch.full((head,), first - 1), torch.arange(first, first + ng).repeat_interleave(g)[:m - head]]
            new = torch.cat(ids).to(device=self.gid.device, dtype=torch.int32)
            self.gid = torch.cat([self.gid, new.expand(*lead, m)], dim=-1)
        if ng:
            self.scale = torch.cat([self.scale, scale.squeeze(-2)], dim=-2)
            self.zero = torch.cat([self.zero, zero.squeeze(-2)], dim=-2)
        self.codes = torch.cat([self.codes, pack(torch.cat(parts, dim=-2), self.bits)], dim=-2)
        self.filled = (self.filled + m) % g
        self.res = self.res[..., m:, :].clone()

    def dequantized(self) -> torch.Tensor:
        """The quantized tokens ``[*lead, nq, C]`` in ``dtype``."""
        if self.axis == "token":
            if self.rotation is None:
                return dequantize_groups(self.codes, self.scale, self.zero, self.bits, self.channels, self.dtype)
            x = dequantize_groups(self.codes, self.scale, self.zero, self.bits, self.channels, torch.float32)
            return (x @ self.rotation).to(self.dtype)
        nq = self.num_quantized
        if self.gid is None and nq % self.group == 0:  # whole groups: the group's (scale, zero) broadcast
            lead, ng, g, c = self.codes.shape[:-2], nq // self.group, self.group, self.channels
            codes = unpack(self.codes, self.bits, c).view(*lead, ng, g, c)
            scale, zero = self.scale[..., :ng, None, :], self.zero[..., :ng, None, :]
            return dequantize(codes, scale, zero, self.dtype).view(*lead, nq, c)
        if self.gid is None:  # (fp8 -> fp32 before repeating: copying fp8 on CPU is slow)
            scale = self.scale.float().repeat_interleave(self.group, dim=-2)[..., :nq, :]
            zero = self.zero.float().repeat_interleave(self.group, dim=-2)[..., :nq, :]
        else:
            scale, zero = gather_tokens(self.scale, self.gid.long()), gather_tokens(self.zero, self.gid.long())
        return dequantize(unpack(self.codes, self.bits, self.channels), scale, zero, self.dtype)

    def materialize(self) -> torch.Tensor:
        if self.num_quantized == 0:
            return torch.cat([self.sink, self.res], dim=-2) if self.sink.shape[-2] else self.res
        return torch.cat([self.sink, self.dequantized(), self.res], dim=-2)

    def gather(self, idx: torch.Tensor) -> None:
        """Keep slots ``idx: [*lead, keep]`` (ascending); the sinks and the full-precision window must be kept."""
        s, nq, r = self.sink.shape[-2], self.num_quantized, self.res.shape[-2]
        keep_q = idx.shape[-1] - r - s
        assert keep_q >= 0 and bool((idx[..., keep_q + s:] >= s + nq).all()), "the full-precision window must be kept"
        assert bool((idx[..., :s] == torch.arange(s, device=idx.device)).all()), "the sinks must be kept"
        qidx = idx[..., s:s + keep_q] - s
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
        if self.filled:
            used[-1] = True  # the open group's (scale, zero) still encodes tokens waiting in the window
        if not bool(used.all()):  # free the (scale, zero) entries of groups nobody points to any more
            self.gid = (used.cumsum(0) - 1).to(torch.int32)[self.gid.long()]
            rows = used.nonzero().squeeze(1)
            self.scale, self.zero = self.scale.index_select(-2, rows), self.zero.index_select(-2, rows)

    def nbytes(self) -> int:
        return nbytes(self.codes, self.scale, self.zero, self.gid, self.sink, self.res)
