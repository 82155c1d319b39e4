"""XQuant: cache the quantized layer input X and rematerialize K and V (Tomar et al., 2025).

Instead of K and V the store keeps ``X = RMSNorm(h)`` of each token, quantized per token in groups
of ``group`` channels, and rebuilds ``K = X Wk (+ bias, k-norm, RoPE at the stored position)`` and
``V = X Wv`` when attention needs them: memory for compute. X is one vector per token shared by all
heads, so it is ``hidden / (2 * kv_size)`` the size of K and V (0.5 for multi-head attention, 1.5 for
SmolLM2-135M's GQA): XQuant pays off most on models without GQA. Eviction composes at token level
(the same slots for every head); ``residual`` most recent tokens stay in full precision.
Not implemented: XQuant-CL (cross-layer deltas) and the SVD latent variant for GQA models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from frugallm.kv.policy import KV_POLICIES, Quantizer
from frugallm.kv.quantize import SUPPORTED_BITS, channel_group, dequantize_groups, nbytes, quantize_groups
from frugallm.kv.stores import Store, StoreContext
from frugallm.model.llama import apply_rope


@KV_POLICIES.register("xquant")
@dataclass(frozen=True)
class XQuant(Quantizer):
    """``xquant:bits=4,group=64,residual=0`` (bits in {2, 4, 8})."""

    name: ClassVar[str] = "xquant"
    needs_layer_input: ClassVar[bool] = True
    bits: int = 4
    group: int = 64
    residual: int = 0

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            self._fail(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        self._check_int("group", self.group, 1)
        self._check_int("residual", self.residual, 0)

    def make_store(self, ctx: StoreContext) -> Store:
        return XQuantStore(ctx, self.bits, self.group, self.residual)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # Same trick as model.llama.Linear: large fp16 matmuls are much faster in bf16 on CPU.
    if w.dtype == torch.float16 and w.device.type == "cpu" and x.shape[-2] >= 16:
        return F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16), None if b is None else b.to(torch.bfloat16)
                        ).to(w.dtype)
    return F.linear(x.to(w.dtype), w, b)


class XQuantStore(Store):
    """Quantized X ``[batch, nq, hidden]`` + full-precision residual X; K/V rebuilt on read."""

    per_head = False
    stores_keys = False

    def __init__(self, ctx: StoreContext, bits: int, group: int, residual: int) -> None:
        self.ctx, self.bits, self.residual = ctx, bits, residual
        attn = ctx.attn
        hidden = attn.qkv_proj.weight.shape[1]
        self.group = channel_group(hidden, group)
        self.hidden = hidden
        qs = attn.q_size
        self.w = attn.qkv_proj.weight[qs:]
        self.bias = None if attn.qkv_proj.bias is None else attn.qkv_proj.bias[qs:]
        b, dev = ctx.batch, ctx.device
        probe = quantize_groups(torch.zeros(1, hidden), bits, self.group)[0]
        self.xq = torch.empty(b, 0, probe.shape[-1], dtype=torch.uint8, device=dev)
        self.xs = torch.empty(b, 0, hidden // self.group, dtype=torch.float16, device=dev)
        self.xz = torch.empty_like(self.xs)
        self.rx = torch.empty(b, 0, hidden, dtype=ctx.dtype, device=dev)
        # RoPE positions of each slot; unused (and not kept) when the cache re-rotates keys by slot.
        self.keep_pos = ctx.frame == "rotated"
        self.pos = torch.empty(b, 0, dtype=torch.int32, device=dev)
        self.rpos = torch.empty(b, 0, dtype=torch.int32, device=dev)

    @property
    def num_slots(self) -> int:
        return self.xq.shape[1] + self.rx.shape[1]

    @property
    def protected(self) -> int:
        return self.rx.shape[1]

    def append(self, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor | None, positions: torch.Tensor) -> None:
        assert x is not None, "xquant needs the layer input x in KVCache.update"
        self.rx = torch.cat([self.rx, x.to(self.ctx.dtype)], dim=1)
        if self.keep_pos:
            self.rpos = torch.cat([self.rpos, positions.to(torch.int32)], dim=1)
        m = self.rx.shape[1] - self.residual
        if m > 0:
            codes, scale, zero = quantize_groups(self.rx[:, :m], self.bits, self.group)
            self.xq = torch.cat([self.xq, codes], dim=1)
            self.xs = torch.cat([self.xs, scale], dim=1)
            self.xz = torch.cat([self.xz, zero], dim=1)
            self.rx = self.rx[:, m:].clone()
            if self.keep_pos:
                self.pos = torch.cat([self.pos, self.rpos[:, :m]], dim=1)
                self.rpos = self.rpos[:, m:].clone()

    def layer_input(self) -> torch.Tensor:
        """Dequantized X of every slot ``[batch, N, hidden]``."""
        xq = dequantize_groups(self.xq, self.xs, self.xz, self.bits, self.hidden, self.ctx.dtype)
        return torch.cat([xq, self.rx], dim=1)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        c, attn = self.ctx, self.ctx.attn
        x = self.layer_input()
        b, n, _ = x.shape
        kv = _linear(x, self.w, self.bias)
        k, v = kv.split(attn.kv_size, dim=-1)
        # Contiguous [b, heads, n, d]: attention kernels take a slow path on strided half tensors.
        k = k.reshape(b, n, attn.n_kv, attn.head_dim).transpose(1, 2).contiguous()
        v = v.reshape(b, n, attn.n_kv, attn.head_dim).transpose(1, 2).contiguous()
        if attn.k_norm is not None:
            k = attn.k_norm(k)
        if self.keep_pos:
            pos = torch.cat([self.pos, self.rpos], dim=1).long()
            cos, sin = c.rope
            k = apply_rope(k, cos[pos].unsqueeze(1).to(k.dtype), sin[pos].unsqueeze(1).to(k.dtype))
        return k.to(c.dtype), v.to(c.dtype)

    def gather(self, idx: torch.Tensor) -> None:
        r = self.rx.shape[1]
        keep_q = idx.shape[2] - r
        nq = self.xq.shape[1]
        assert keep_q >= 0 and bool((idx[:, 0, keep_q:] >= nq).all()), "the residual window must be kept"
        qidx = idx[:, 0, :keep_q]

        def rows(t: torch.Tensor) -> torch.Tensor:
            return torch.gather(t, 1, qidx[..., None].expand(-1, -1, t.shape[2]))

        self.xq, self.xs, self.xz = rows(self.xq), rows(self.xs), rows(self.xz)
        if self.keep_pos:
            self.pos = torch.gather(self.pos, 1, qidx)

    def nbytes(self) -> int:
        return nbytes(self.xq, self.xs, self.xz, self.rx, self.pos, self.rpos)
