"""The decode fast path: a one-token-per-sequence step with the modules flattened into plain callables.

Batch-1 decode of a small model is bound by Python, not by the matmuls: walking the ``nn.Module`` tree
(``__call__``, ``__getattr__`` for every submodule and parameter, per-call dtype and device checks) costs
~37 us per layer on this CPU, about 1.1 ms of a 6.4 ms int4 step, as much as all the layer's attention.
A :class:`DecodePlan` does those lookups and checks once: per layer it holds the kernels to call (the raw
int4 op with its packed weight, ``F.linear`` on a weight already in the activation dtype, or a module's
own ``forward`` when it has no faster form) and the norm weights in the form the fused norm needs.

The step is the same math as ``Block.forward``, op for op (tests check the logits are identical); only the
layout differs: a 2-D residual stream ``[B, hidden]`` and heads in dim 1 with the token in dim 2, so q, k
and v are ``[B, heads, 1, D]`` views with no transposes. KV caches are used through ``KVCache.update``, so
every policy works here too.

A plan captures tensors and modules at build time. ``Transformer`` rebuilds it after every multi-token
pass (each generation starts with a prefill), on ``.to()``/casts, and when its modules were replaced
(quantization). Module hooks do not fire in planned decode steps; ``Transformer.fast_decode = False``
runs decode through the modules instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from frugallm.model.kv_cache import KVCache, sdpa_dtypes
from frugallm.model.ops import apply_rope, rms_norm_as_layer_norm

Fn = Callable[[torch.Tensor], torch.Tensor]


class LayerPlan(NamedTuple):
    input_norm: Fn
    qkv: Fn
    q_norm: Fn | None
    k_norm: Fn | None
    o: Fn
    post_norm: Fn
    gate_up: Fn
    down: Fn


def linear_fn(mod: nn.Module, dtype: torch.dtype, device: torch.device) -> Fn:
    """The cheapest callable equal to ``mod(x)`` for 2-D contiguous ``x`` in ``dtype`` on ``device``: the
    module's ``decode_fn`` hook where it has one (raw kernels with their weights bound), else its ``forward``."""
    hook = getattr(mod, "decode_fn", None)
    return mod.forward if hook is None else hook(dtype, device)


def norm_fn(norm: nn.Module, dtype: torch.dtype) -> Fn:
    """``RMSNorm`` in its decode form (fused ``layer_norm`` over ``[x, -x]``) on the last dim."""
    w2, eps = norm.decode_weight(dtype), norm.eps
    # Contiguous rows: the fused form returns a strided half of [x, -x], and the linears' native kernels (their
    # decode_fn) read dense rows. A no-op for one row; a [B, d] copy per norm for batched steps.
    return lambda x: rms_norm_as_layer_norm(x, w2, eps).contiguous()


class DecodePlan:
    """Per-layer callables for decode steps of ``model`` (a ``llama.Transformer``; typed as ``nn.Module`` because
    ``llama`` builds plans, and this module stays below it) in activation ``dtype`` on ``device``."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        self.rope = apply_rope
        self.key = (dtype, device)
        self.first = model.layers[0].attn.qkv_proj  # identity check: were the modules replaced?
        a0 = model.layers[0].attn
        self.heads, self.kv_heads, self.head_dim = a0.n_heads, a0.n_kv, a0.head_dim
        self.q_size, self.kv_size = a0.q_size, a0.kv_size
        self.inter = model.layers[0].mlp.inter
        self.layers = [
            LayerPlan(
                norm_fn(blk.input_norm, dtype),
                linear_fn(blk.attn.qkv_proj, dtype, device),
                None if blk.attn.q_norm is None else norm_fn(blk.attn.q_norm, dtype),
                None if blk.attn.k_norm is None else norm_fn(blk.attn.k_norm, dtype),
                linear_fn(blk.attn.o_proj, dtype, device),
                norm_fn(blk.post_attn_norm, dtype),
                linear_fn(blk.mlp.gate_up_proj, dtype, device),
                linear_fn(blk.mlp.down_proj, dtype, device),
            )
            for blk in model.layers
        ]

    def valid_for(self, model: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
        return self.key == (dtype, device) and model.layers[0].attn.qkv_proj is self.first

    def run(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, positions: torch.Tensor
    ) -> torch.Tensor:
        """``x [B, hidden]`` (one token per sequence) through every layer; ``cos, sin: [B, 1, 1, D]``."""
        apply_rope = self.rope
        b = x.shape[0]
        nh, nkv, d = self.heads, self.kv_heads, self.head_dim
        q_size, qk_size, inter = self.q_size, self.q_size + self.kv_size, self.inter
        gqa = nh != nkv
        for layer, p in enumerate(self.layers):
            h = p.input_norm(x)
            qkv = p.qkv(h)
            if p.q_norm is None:
                qk = apply_rope(qkv[:, :qk_size].view(b, nh + nkv, 1, d), cos, sin)
                q, k = qk[:, :nh], qk[:, nh:]
            else:
                q = apply_rope(p.q_norm(qkv[:, :q_size].view(b, nh, 1, d)), cos, sin)
                k = apply_rope(p.k_norm(qkv[:, q_size:qk_size].view(b, nkv, 1, d)), cos, sin)
            v = qkv[:, qk_size:].view(b, nkv, 1, d)
            out = cache.decode_attention(layer, q, k, v)
            if out is None:
                keys, values, mask = cache.update(layer, k, v, q=q, x=h[:, None], positions=positions)
                q, keys, values = sdpa_dtypes(q, keys, values, decode=True)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
            # [B, heads, 1, D] -> [B, heads * D] is a view: the token dim has size 1
            x = x + p.o(out.to(x.dtype).reshape(b, q_size))
            gu = p.gate_up(p.post_norm(x))
            x = x + p.down(F.silu(gu[:, :inter]) * gu[:, inter:])
        return x
