"""XQuant: cache the quantized layer input X and rematerialize K and V (Tomar et al., 2025).

Instead of K and V the store keeps ``X = RMSNorm(h)`` of each token, quantized per channel over
groups of ``group`` tokens (``axis=channel``, default: X has outlier channels like keys do; measured on
SmolLM2 it halves the K error of per-token groups at the same bytes) or per token in groups of
``group`` channels (``axis=token``), and rebuilds ``K = X Wk (+ bias, k-norm, RoPE at the stored position)`` and
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
from frugallm.kv.quantize import SUPPORTED_BITS, QuantizedSequence, channel_group, nbytes
from frugallm.kv.stores import Store, StoreContext
from frugallm.model.ops import apply_rope


@KV_POLICIES.register("xquant")
@dataclass(frozen=True)
class XQuant(Quantizer):
    """``xquant:bits=4,axis=channel,group=32,residual=0`` (bits in {2, 4, 8}; axis: channel | token)."""

    name: ClassVar[str] = "xquant"
    needs_layer_input: ClassVar[bool] = True
    bits: int = 4
    axis: str = "channel"
    group: int = 32
    residual: int = 0

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            self._fail(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        if self.axis not in ("channel", "token"):
            self._fail(f"axis must be channel or token, got {self.axis!r}")
        self._check_int("group", self.group, 1)
        self._check_int("residual", self.residual, 0)

    def make_store(self, ctx: StoreContext) -> Store:
        residual = self.residual if ctx.max_residual is None else min(self.residual, ctx.max_residual)
        return XQuantStore(ctx, self.bits, self.axis, self.group, residual)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # Same trick as model.llama.Linear: large fp16 matmuls are much faster in bf16 on CPU.
    if w.dtype == torch.float16 and w.device.type == "cpu" and x.shape[-2] >= 16:
        return F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16), None if b is None else b.to(torch.bfloat16)
                        ).to(w.dtype)
    return F.linear(x.to(w.dtype), w, b)


class XQuantStore(Store):
    """Quantized X ``[batch, N, hidden]`` (+ a full-precision window); K/V rebuilt on every read."""

    per_head = False
    stores_keys = False

    def __init__(self, ctx: StoreContext, bits: int, axis: str, group: int, residual: int) -> None:
        self.ctx = ctx
        attn = ctx.attn
        hidden = attn.qkv_proj.weight.shape[1]
        if axis == "token":
            group, flush = channel_group(hidden, group), 1
        else:
            flush = group
        self.x = QuantizedSequence((ctx.batch,), hidden, bits, axis=axis, group=group, residual=residual,
                                   flush=flush, dtype=ctx.dtype, device=ctx.device)
        qs = attn.q_size
        self.w = attn.qkv_proj.weight[qs:]  # views of the model's weights, no copy
        self.bias = None if attn.qkv_proj.bias is None else attn.qkv_proj.bias[qs:]
        # RoPE position of each slot; not kept when the cache re-rotates keys by slot index.
        self.keep_pos = ctx.frame == "rotated"
        self.pos = torch.empty(ctx.batch, 0, dtype=torch.int32, device=ctx.device)

    @property
    def num_slots(self) -> int:
        return self.x.num_slots

    @property
    def protected(self) -> int:
        return self.x.res.shape[1]

    def append(self, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor | None, positions: torch.Tensor) -> None:
        assert x is not None, "xquant needs the layer input x in KVCache.update"
        self.x.append(x)
        if self.keep_pos:
            self.pos = torch.cat([self.pos, positions.to(torch.int32)], dim=1)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        c, attn = self.ctx, self.ctx.attn
        x = self.x.materialize()
        b, n, _ = x.shape
        k, v = _linear(x, self.w, self.bias).split(attn.kv_size, dim=-1)
        # Contiguous [b, heads, n, d]: attention kernels take a slow path on strided half tensors.
        k = k.reshape(b, n, attn.n_kv, attn.head_dim).transpose(1, 2).contiguous()
        v = v.reshape(b, n, attn.n_kv, attn.head_dim).transpose(1, 2).contiguous()
        if attn.k_norm is not None:
            k = attn.k_norm(k)
        if self.keep_pos:
            cos, sin = c.rope
            pos = self.pos.long()
            k = apply_rope(k, cos[pos].unsqueeze(1).to(k.dtype), sin[pos].unsqueeze(1).to(k.dtype))
        return k.to(c.dtype), v.to(c.dtype)

    def gather(self, idx: torch.Tensor) -> None:
        self.x.gather(idx[:, 0])
        if self.keep_pos:
            self.pos = torch.gather(self.pos, 1, idx[:, 0])

    def nbytes(self) -> int:
        return self.x.nbytes() + nbytes(self.pos)
