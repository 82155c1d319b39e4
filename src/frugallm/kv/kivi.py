"""KIVI: tuning-free asymmetric 2/4-bit KV-cache quantization (Liu et al., 2024), with three additions.

As in the paper, keys are quantized per channel over groups of ``group`` consecutive tokens (outlier
channels keep their own range) and values per token; the most recent ``residual`` tokens stay in full
precision and tokens are quantized as they leave that window. Each addition is an option:

* ``sinks``: the first tokens stay exact (IntactKV / StreamingLLM attention sinks). They take a large
  share of attention in most layers and their outlier keys would widen their group's range.
* ``clip``: each group's range is shrunk towards its midpoint when that lowers the squared error
  (searched over ``1, 0.95, ..., clip``), the usual weight-quantization clipping applied to K and V.
* ``rotate``: values are rotated by a Hadamard matrix before per-token quantization (QuaRot), which
  spreads outlier channels over the whole group; dequantization rotates back. Keys are not rotated:
  their per-channel ranges are what keeps outlier channels cheap.

Metadata is what decides the bytes at 2 bits: with ``scales=fp8`` the per-channel key scales and the
per-token value scales and zeros are stored in fp8 e4m3 (codes are computed against the rounded values,
so nothing is lost but grid resolution), key zeros stay fp16 (they carry bias-sized offsets such as
Qwen's K bias). With the defaults a key costs 2 bits + 3 bytes/(64 tokens) per channel and a value
2 bits per channel + 2 bytes per token: 0.145x fp16 for a head of 64, so the whole cache (window and
sinks included) is <= 0.2x fp16 from 2k tokens on.

Storage is packed uint8 codes plus scale/zero (:class:`~frugallm.kv.quantize.QuantizedSequence`);
attention runs over the dequantized copy. When an evictor later drops single tokens from the
quantized region, each key keeps a pointer to its group's (scale, zero) and a group's entry is freed
once no head uses it any more; sinks and the window are never evicted.

On the continuous-batching engine (``pages``) KIVI lives in the paged pool: :class:`PagedKIVI` packs a
sequence's oldest exact tokens in *chunks* of whole key groups into pool blocks, as bytes (codes, scales, zeros
of keys in the K pool's block bytes, of values in the V pool's), and the bf16 blocks they held go back to the
pool (``engine/packed_kv.py``). A chunk's codes are the ones :class:`QuantizedSequence` computes for the same
tokens single-stream (the same groups from the same first slot after the sinks); only the timing differs: the
pool packs a whole chunk once ``residual + chunk`` exact tokens wait, so between chunks more tokens stay exact.
Decode reads the chunks' codes directly (``engine/packed_attention.py``, ``csrc/kivi_attention.cpp``). On 16 2k
passkey prompts (Qwen2.5-Coder-0.5B, ``snapkv:budget=0.25+``) 2-bit keys in groups of 64 lose needles (pool 13/16,
single-stream 8/16, full cache 16/16); ``group=32`` (the KIVI paper's) found 15/16 in the pool for ~8 % more bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from frugallm.kv.policy import KV_POLICIES, Quantizer
from frugallm.kv.quantize import FP8, QuantizedSequence, channel_group, hadamard
from frugallm.kv.stores import Store, StoreContext


@KV_POLICIES.register("kivi")
@dataclass(frozen=True)
class KIVI(Quantizer):
    """``kivi:bits=2,group=64,vgroup=none,residual=128,sinks=4,clip=0.6,rotate=1,scales=fp8``.

    ``bits`` in {2, 4}; ``group`` tokens per key quantization group; ``vgroup`` channels per value
    group (none: the whole head); ``clip=1`` turns the range search off; ``rotate=0`` stores values
    unrotated; ``scales`` fp8 | fp16.
    """

    name: ClassVar[str] = "kivi"
    pages: ClassVar[bool] = True
    bits: int = 2
    group: int = 64
    vgroup: int | None = None
    residual: int = 128
    sinks: int = 4
    clip: float = 0.6
    rotate: int = 1
    scales: str = "fp8"

    def __post_init__(self) -> None:
        if self.bits not in (2, 4):
            self._fail(f"bits must be 2 or 4, got {self.bits}")
        self._check_int("group", self.group, 1)
        self._check_int("vgroup", self.vgroup, 1, allow_none=True)
        self._check_int("residual", self.residual, 0)
        self._check_int("sinks", self.sinks, 0)
        if not 0.05 <= float(self.clip) <= 1.0:
            self._fail(f"clip must be in [0.05, 1] (smallest range shrink factor tried), got {self.clip}")
        if self.rotate not in (0, 1):
            self._fail(f"rotate must be 0 or 1, got {self.rotate}")
        if self.scales not in ("fp8", "fp16"):
            self._fail(f"scales must be fp8 or fp16, got {self.scales!r}")

    def paging_error(self) -> str | None:
        if self.vgroup is not None:
            return "vgroup is not supported in the paged pool yet (values are grouped per whole head there)"
        return None

    def make_store(self, ctx: StoreContext) -> Store:
        residual = self.residual if ctx.max_residual is None else min(self.residual, ctx.max_residual)
        return KIVIStore(ctx, self, residual)


class KIVIStore(Store):
    """Keys quantized per channel, values per token, both with the same exact sinks and window."""

    def __init__(self, ctx: StoreContext, p: KIVI, residual: int) -> None:
        self.ctx = ctx
        fp8 = FP8 if p.scales == "fp8" else torch.float16
        kw = dict(bits=p.bits, residual=residual, flush=1, sinks=p.sinks, clip=p.clip, dtype=ctx.dtype,
                  device=ctx.device)
        lead = (ctx.batch, ctx.kv_heads)
        self.k = QuantizedSequence(lead, ctx.key_dim, axis="channel", group=p.group, scale_dtype=fp8, **kw)
        vgroup = channel_group(ctx.head_dim, p.vgroup or ctx.head_dim)
        self.v = QuantizedSequence(lead, ctx.head_dim, axis="token", group=vgroup, scale_dtype=fp8, zero_dtype=fp8,
                                   rotate=bool(p.rotate), **kw)

    @property
    def num_quantized(self) -> int:
        return self.k.num_quantized

    @property
    def num_slots(self) -> int:
        return self.k.num_slots

    @property
    def protected(self) -> int:
        # Keys may hold a few more exact tokens than values while a key group fills (residual < group - 1).
        return max(self.k.res.shape[2], self.v.res.shape[2])

    @property
    def pinned(self) -> int:
        return self.k.sink.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor | None, positions: torch.Tensor) -> None:
        self.k.append(k)
        self.v.append(v)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k.materialize(), self.v.materialize()

    def gather(self, idx: torch.Tensor) -> None:
        idx = idx.expand(self.ctx.batch, self.ctx.kv_heads, idx.shape[2])
        self.k.gather(idx)
        self.v.gather(idx)

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()


class PagedKIVI:
    """KIVI's packed format in fixed-size chunks of a paged pool's blocks.

    A chunk is ``chunk_tokens`` consecutive slots (whole key groups) of one sequence, every layer; its bytes go
    into ``blocks_per_chunk`` pool blocks: per layer, the keys' codes / scales / zeros in the K pool's block
    bytes and the values' in the V pool's. ``chunk_tokens``: the fewest groups (1..16) within 10 % of the most
    tokens per block (a smaller chunk keeps fewer tokens exact). Encoding and decoding are
    :class:`QuantizedSequence`'s (with no window or sinks: the caller keeps those exact in bf16 blocks), so a
    chunk's codes equal single-stream KIVI's for the same tokens.

    ``block_bytes``: bytes of one block of one layer's K (or V) pool.
    """

    def __init__(self, p: KIVI, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 block_bytes: int) -> None:
        self.p, self.kv_heads, self.head_dim, self.dtype = p, kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.sinks, self.residual = p.sinks, p.residual
        self.block_bytes = block_bytes
        kb, vb = (sum(part) for part in self._sizes(p.group))  # bytes of one key group's tokens
        ratio = {m: m * p.group / math.ceil(m * max(kb, vb) / block_bytes) for m in range(1, 17)}
        # The fewest groups within 10 % of the best tokens per block: a smaller chunk keeps fewer tokens exact.
        self.chunk_tokens = p.group * min(m for m, r in ratio.items() if r >= 0.9 * max(ratio.values()))
        self.k_sizes, self.v_sizes = self._sizes(self.chunk_tokens)
        self.blocks_per_chunk = math.ceil(max(sum(self.k_sizes), sum(self.v_sizes)) / block_bytes)
        # Values are quantized in this rotated frame (fp32 [D, D], or None): x = dequantized codes @ rotation.
        self.rotation = hadamard(head_dim, self.device) if p.rotate else None

    def tokens_per_block(self) -> float:
        return self.chunk_tokens / self.blocks_per_chunk

    def _seqs(self) -> tuple[QuantizedSequence, QuantizedSequence]:
        """Keys' and values' :class:`QuantizedSequence` with no exact window or sinks (KIVIStore's settings)."""
        p = self.p
        fp8 = FP8 if p.scales == "fp8" else torch.float16
        kw = dict(bits=p.bits, residual=0, flush=1, sinks=0, clip=p.clip, dtype=self.dtype, device=self.device)
        lead = (self.kv_heads,)
        k = QuantizedSequence(lead, self.head_dim, axis="channel", group=p.group, scale_dtype=fp8, **kw)
        v = QuantizedSequence(lead, self.head_dim, axis="token", group=self.head_dim, scale_dtype=fp8,
                              zero_dtype=fp8, rotate=bool(p.rotate), **kw)
        return k, v

    def _sizes(self, tokens: int) -> tuple[list[int], list[int]]:
        """Bytes of (codes, scale, zero) of ``tokens`` tokens' keys, then of their values."""
        z = torch.zeros(self.kv_heads, tokens, self.head_dim, dtype=self.dtype, device=self.device)
        k, v = self._seqs()
        k.append(z)
        v.append(z)
        return ([t.numel() * t.element_size() for t in (k.codes, k.scale, k.zero)],
                [t.numel() * t.element_size() for t in (v.codes, v.scale, v.zero)])

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``k, v: [kv_heads, n * chunk_tokens, head_dim]`` -> uint8 ``[n, key bytes]``, ``[n, value bytes]``."""
        h, t, d = k.shape
        c = self.chunk_tokens
        n = t // c
        assert t == n * c, f"{t} tokens are not whole chunks of {c}"
        qk, qv = self._seqs()
        qk.append(k)
        qv.append(v)
        return _to_bytes((qk.codes, qk.scale, qk.zero), n), _to_bytes((qv.codes, qv.scale, qv.zero), n)

    def decode(self, kbytes: torch.Tensor, vbytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`encode`: ``[n, key bytes]``, ``[n, value bytes]`` -> ``k, v [kv_heads, n * chunk,
        head_dim]`` in ``dtype``."""
        qk, qv = self._seqs()
        for q, raw, sizes in ((qk, kbytes, self.k_sizes), (qv, vbytes, self.v_sizes)):
            parts = raw[:, :sum(sizes)].split(sizes, dim=1)
            q.codes, q.scale, q.zero = (_from_bytes(b, like) for b, like in zip(parts, (q.codes, q.scale, q.zero),
                                                                                 strict=True))
        return qk.dequantized(), qv.dequantized()


def _to_bytes(parts: tuple[torch.Tensor, ...], n: int) -> torch.Tensor:
    """Tensors ``[h, n * rows, cols]`` -> uint8 ``[n, bytes of one chunk]`` (each part's chunk rows, in order)."""
    out = []
    for t in parts:
        h, rows, cols = t.shape
        t = t.view(torch.uint8) if t.dtype == FP8 else t  # (no CPU permute copy for fp8)
        chunked = t.reshape(h, n, rows // n, cols).transpose(0, 1).contiguous()
        out.append(chunked.view(n, -1).view(torch.uint8))
    return torch.cat(out, dim=1)


def _from_bytes(raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """uint8 ``[n, bytes]`` -> ``like``'s dtype as ``[h, n * rows, cols]`` (``like``: an empty ``[h, 0, cols]``)."""
    n = raw.shape[0]
    h, cols = like.shape[0], like.shape[-1]
    dtype = torch.uint8 if like.dtype == FP8 else like.dtype
    t = raw.contiguous().view(dtype).view(n, h, -1, cols).transpose(0, 1).reshape(h, -1, cols)
    return t.view(FP8) if like.dtype == FP8 else t
