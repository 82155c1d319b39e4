"""The Llama family (llama, mistral, qwen2, qwen3) in one file.

Weights follow the Hugging Face layout (RoPE on rotate-half pairs); loaders convert GGUF's permuted
Q/K rows back to it. Q, K and V are one fused projection, and so are gate and up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from frugallm.config import ModelConfig
from frugallm.model import packed
from frugallm.model.casts import CastCache, tensor_version
from frugallm.model.decode_plan import DecodePlan
from frugallm.model.kv_cache import KVCache, sdpa_dtypes
from frugallm.model.ops import apply_rope, rms_norm_as_layer_norm, rope_inv_freq

# At or above this many tokens a forward pass is compute bound (prefill): on CPU it then runs in
# ``Transformer.prefill_dtype`` (bf16: AVX512-BF16/AMX matmuls reach ~700 GFLOP/s here while fp16
# reaches a few GFLOP/s). Below it (decode) the weights' own dtype is used: fp16 matrix-vector
# products stream weights ~2x faster than bf16 on this CPU.
PREFILL_MIN_TOKENS = 16
# From this many rows on, a half-precision head is cast to fp32 for the logits (one cast per pass, small next to a
# prefill); below it (decode steps, a batching engine's rows) only the near-max candidates are recomputed.
HEAD_CAST_ROWS = 64
# RoPE tables start this long (1 MiB each at head_dim 64) and double as positions beyond are used.
ROPE_MIN_LEN = 4096
class Linear(nn.Linear):
    """``nn.Linear`` that runs activations of another dtype: a few rows (decode) are cast to the weight's
    dtype and back, which is far cheaper than casting the weight; many rows (prefill) cast the weight.

    bf16 on CPU runs on a pre-packed copy of the weight (``model/packed.py``: frugallm's native kernel, or
    oneDNN's blocked layout): 1.6-1.9x faster than oneDNN's packed GEMM for 1-16 rows and 2-3x faster than
    ``F.linear``, which re-lays the weight out on every call. The copy costs the weight's size again in
    memory (``packed_bytes``); ``Transformer.set_packing`` turns it off (``LLM`` does when the copies would
    not fit comfortably in free memory).
    """

    pack = True  # instance attribute when set by Transformer.set_packing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            if x.numel() < PREFILL_MIN_TOKENS * x.shape[-1]:
                return F.linear(x.to(w.dtype), w, b).to(x.dtype)
            w = w.to(x.dtype)
            b = None if b is None else b.to(x.dtype)
        elif self._packable(x.device):
            return packed.linear(x, self.packed_weight(), w, b)
        return F.linear(x, w, b)

    def _packable(self, device: torch.device) -> bool:
        return (
            self.pack
            and self.weight.dtype == torch.bfloat16
            and device.type == "cpu"
            and packed.backend(self.in_features) is not None
            and not (self.weight.requires_grad and torch.is_grad_enabled())  # the packed ops have no backward
            and not torch.compiler.is_compiling()
        )

    def packed_weight(self) -> packed.Packed:
        """The packed copy (made once, remade when the weight or the packing kernel changes)."""
        w = self.weight
        key = (w.data_ptr(), tensor_version(w), packed.backend(self.in_features))
        cached = self.__dict__.get("_packed")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_packed"] = (key, packed.pack(w, self.bias))
        return cached[1]

    @property
    def packed_bytes(self) -> int:
        """Memory held by the packed copy (0 until a bf16 CPU forward made it)."""
        return 0 if "_packed" not in self.__dict__ else self.weight.numel() * self.weight.element_size()

    def decode_fn(self, dtype: torch.dtype, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """The cheapest callable equal to ``self(x)`` for 2-D ``x`` in ``dtype`` (see ``DecodePlan``)."""
        w, b = self.weight, self.bias
        if w.dtype != dtype:
            return self.forward
        if self._packable(device):
            p = self.packed_weight()
            return lambda x: packed.linear(x, p, w, b)
        return lambda x: F.linear(x, w, b)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self._cast = CastCache()  # the weight in another activation dtype (bf16 prefill / decode)
        self._padded = CastCache()  # [weight, zeros] in the activation dtype, for the layer-norm form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < PREFILL_MIN_TOKENS * x.shape[-1] and not torch.compiler.is_compiling():
            # Decode: on CPU, F.rms_norm is ~8 small kernels (10 us for one bf16 row); layer_norm is one
            # fused kernel, and over [x, -x] (mean exactly 0, variance mean(x^2)) its first half is
            # x / sqrt(mean(x^2) + eps), the RMS norm (5 us with the cat).
            return rms_norm_as_layer_norm(x, self.decode_weight(x.dtype), self.eps)
        w = self._cast.get(self.weight, x.dtype)
        return F.rms_norm(x, w.shape, w, self.eps)

    def decode_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``[weight, zeros]`` in ``dtype``: the layer-norm form's weight (cached until the weight changes)."""
        return self._padded.get(self.weight, dtype, _pad_zeros)


def _pad_zeros(w: torch.Tensor) -> torch.Tensor:
    return torch.cat((w, torch.zeros_like(w)))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, T, hidden]`` -> rotated ``q [B, heads, T, D]``, ``k, v [B, kv_heads, T, D]``."""
        b, t, _ = x.shape
        qkv = self.qkv_proj(x)
        qk_size = self.q_size + self.kv_size
        if self.q_norm is None:
            # Rotate q and k in one pass: they are adjacent heads of the fused projection.
            qk = apply_rope(qkv[..., :qk_size].view(b, t, self.n_heads + self.n_kv, self.head_dim), cos, sin)
            q, k = qk.split((self.n_heads, self.n_kv), dim=2)
        else:
            q = self.q_norm(qkv[..., : self.q_size].view(b, t, self.n_heads, self.head_dim))
            k = self.k_norm(qkv[..., self.q_size : qk_size].view(b, t, self.n_kv, self.head_dim))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = qkv[..., qk_size:].view(b, t, self.n_kv, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        x: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """Append ``k, v`` to ``cache`` and attend; returns ``[B, T, heads * D]`` in ``x``'s dtype."""
        b, _, t, _ = q.shape
        if t == 1 and (fused := cache.decode_attention(self.layer, q, k, v)) is not None:
            return fused.to(x.dtype).view(b, 1, self.q_size)
        keys, values, mask = cache.update(self.layer, k, v, q=q, x=x, positions=positions)
        q, keys, values = sdpa_dtypes(q, keys, values, decode=t < PREFILL_MIN_TOKENS)
        start = keys.shape[2] - t
        if 1 < t < PREFILL_MIN_TOKENS and start > 0 and cache.causal_rows:
            # A speculative verify pass (or a few-token chunk): each row attends exactly as its one-token step would
            # (same SDPA call on the same key prefix). One masked call over all rows rounds differently, by an ulp
            # that Qwen's ~4k-magnitude activations grow to ~0.1 in the logits: enough to flip a greedy near-tie.
            rows = [F.scaled_dot_product_attention(q[:, :, i : i + 1], keys.narrow(2, 0, start + i + 1),
                                                   values.narrow(2, 0, start + i + 1),
                                                   enable_gqa=self.n_heads != self.n_kv) for i in range(t)]
            return torch.cat(rows, 2).to(x.dtype).transpose(1, 2).reshape(b, t, self.q_size)
        out = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None and t > 1,
            enable_gqa=self.n_heads != self.n_kv,
        ).to(x.dtype)
        return out.transpose(1, 2).reshape(b, t, self.q_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, positions: torch.Tensor
    ) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        return self.o_proj(self.attend(q, k, v, x, cache, positions))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, positions: torch.Tensor
    ) -> torch.Tensor:
        q, k, v, h = self.pre_attention(x, cos, sin)
        return self.post_attention(x, self.attn.attend(q, k, v, h, cache, positions))

    # The two cache-free halves of a step, which ``Transformer.compile_decode`` compiles (the KV cache
    # update in between stays eager: policies run arbitrary Python there).
    def pre_attention(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, T, hidden]`` -> ``(q, k, v, normed x)``."""
        h = self.input_norm(x)
        q, k, v = self.attn.project(h, cos, sin)
        return q, k, v, h

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual stream ``x`` plus the output projection of ``attn_out [B, T, heads * D]``, then the MLP."""
        x = x + self.attn.o_proj(attn_out)
        return x + self.mlp(self.post_attn_norm(x))


class Transformer(nn.Module):
    """Decoder-only transformer. ``forward(input_ids [B, T], positions [B, T], cache)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Optional per-frequency RoPE divisors (llama3 scaling as stored in GGUF ``rope_freqs``).
        self.register_buffer("rope_factors", None, persistent=False)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rope_len = min(cfg.max_position_embeddings, ROPE_MIN_LEN)  # positions the tables cover
        # Activation dtypes for compute-bound passes (see PREFILL_MIN_TOKENS) and for decode passes;
        # None = the embedding's dtype. Quantized CPU models decode in bf16, their kernels' input dtype.
        self.prefill_dtype: torch.dtype | None = None
        self.decode_dtype: torch.dtype | None = None
        # torch.compile'd (Block.pre_attention, Block.post_attention) for decode steps; see compile_decode.
        self._compiled: tuple[Callable[..., Any], Callable[..., Any]] | None = None
        # Decode steps run through a DecodePlan (model/decode_plan.py) unless this is False (e.g. to
        # have module hooks fire in decode).
        self.fast_decode = True
        self._plan: DecodePlan | None = None
        self._graphs = False
        # Logits in fp32 on every path (see ``logits``); False restores the head in the activation dtype, whose
        # half-precision rounding ties near-equal logits (greedy then takes the lower id). For benchmarks.
        self.fp32_logits = True

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._plan = None  # moves and casts replace the tensors a plan holds
        return super()._apply(fn, recurse)

    def compile_decode(self, mode: str | None = None) -> None:
        """Run decode steps (one token per sequence) through ``torch.compile``d layer halves.

        Everything in a layer but the KV-cache update and attention (norms, projections, RoPE, MLP,
        residuals) becomes one generated kernel sequence per half, which removes most of the per-op
        overhead that bounds batch-1 decode. One graph serves every layer (parameters are graph inputs);
        shapes are static, so each batch size compiles once. Compiled code is cached on disk by inductor
        (``TORCHINDUCTOR_CACHE_DIR``): the first process pays the compile, later ones load it.
        ``mode="reduce-overhead"`` also replays each half as a CUDA graph (not yet tried on a GPU:
        ``benchmarks/gpu_check.py``'s ``compiled`` section measures it).
        """
        self._compiled = (
            torch.compile(Block.pre_attention, dynamic=False, mode=mode),
            torch.compile(Block.post_attention, dynamic=False, mode=mode),
        )
        self._graphs = mode == "reduce-overhead"

    def set_packing(self, on: bool) -> int:
        """Let bf16 CPU linears use packed copies (see ``Linear``), or not (dropping copies made).

        Returns the bytes the copies take (or would take) for bf16 weights."""
        total = 0
        for m in self.modules():
            if isinstance(m, Linear):
                m.pack = on
                if not on:
                    m.__dict__.pop("_packed", None)
                if m.weight.dtype == torch.bfloat16:
                    total += m.weight.numel() * m.weight.element_size()
        self._plan = None  # plans hold the packed copies
        return total

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope_tables(self, device: torch.device, length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin: [n, head_dim]`` fp32 covering at least ``length`` positions, cached per device.

        ``sin`` is signed for :func:`apply_rope`: ``-sin`` on the first half of the dims, ``sin`` on the
        second. ``n`` grows by doubling with the positions asked for, up to ``max_position_embeddings``: a
        file declaring a 2^24-token context costs nothing until such positions are used (the full table
        would be 16 GiB). Callers that allocate a KV cache reserve its capacity here, so accelerator
        forward passes never sync to ask for the max position.
        """
        if length > self._rope_len:
            self._rope_len = min(1 << (length - 1).bit_length(), self.config.max_position_embeddings)
        cache = self._rope_cache
        if cache is None or cache[0].device != device or cache[0].shape[0] < self._rope_len:
            inv = rope_inv_freq(self.config, self.rope_factors).to(device)
            n = self._rope_len
            freqs = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv)
            emb = torch.cat((freqs, freqs), dim=-1)
            sign = torch.ones(emb.shape[-1], device=device)
            sign[: emb.shape[-1] // 2] = -1.0
            self._rope_cache = (emb.cos(), emb.sin() * sign)
        return self._rope_cache

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        logits_for: str | torch.Tensor = "last",
    ) -> torch.Tensor:
        """Run ``input_ids [B, T]`` at ``positions [B, T]`` and append their keys/values to ``cache``.

        ``logits_for``: ``"last"`` -> logits ``[B, vocab]`` of the last token; ``"all"`` ->
        ``[B, T, vocab]``; an index tensor ``[B]`` -> logits ``[B, vocab]`` at those token indices.
        Logits are fp32.
        """
        x = self.embed_tokens(input_ids)
        act = self.prefill_dtype if input_ids.numel() >= PREFILL_MIN_TOKENS else self.decode_dtype
        if act is not None:
            x = x.to(act)
        # On the CPU the max position is free to read; elsewhere the cache's reservation covers it.
        need = int(positions.max()) + 1 if positions.device.type == "cpu" and positions.numel() else 0
        cos_t, sin_t = self.rope_tables(x.device, need)
        cos = cos_t[positions].unsqueeze(2).to(x.dtype)  # [B, T, 1, D]
        sin = sin_t[positions].unsqueeze(2).to(x.dtype)
        decode = input_ids.shape[1] == 1
        if decode and self._compiled is not None:
            pre, post = self._compiled
            if self._graphs:  # a new step: outputs of the previous step's graph replays may be reused
                torch.compiler.cudagraph_mark_step_begin()
            for layer in self.layers:
                q, k, v, h = pre(layer, x, cos, sin)
                x = post(layer, x, layer.attn.attend(q, k, v, h, cache, positions))
        elif decode and self.fast_decode:
            plan = self._plan
            if plan is None or not plan.valid_for(self, x.dtype, x.device):
                plan = self._plan = DecodePlan(self, x.dtype, x.device)
            x = plan.run(x.view(x.shape[0], x.shape[2]), cos, sin, cache, positions)[:, None]
        else:
            self._plan = None  # rebuilt at the next decode step: weights may have changed since
            for layer in self.layers:
                x = layer(x, cos, sin, cache, positions)
        if isinstance(logits_for, str):
            if logits_for == "last":
                x = x[:, -1]
        else:
            x = x[torch.arange(x.shape[0], device=x.device), logits_for]
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[..., vocab]`` of hidden states ``x [..., hidden]`` (any activation dtype).

        The final norm and the head's sums and output are fp32, so greedy decoding ranks tokens as an fp32
        ``score`` does: a half-precision output ties logits closer than its rounding step (bf16: 1/128 of
        the value) and the lower id wins. GGUF blocks take fp32 activations in their own kernel (fp32 sums, fp32
        out); a half weight multiplies in half for a few rows (decode: no weight cast), then the logits within
        two rounding steps of each row's max, the only ones that can be the fp32 argmax, are recomputed
        in fp32; for ``HEAD_CAST_ROWS`` rows and more (``score`` over a window) the weight is cast once.
        """
        if not self.fp32_logits:
            return self.lm_head(self.norm(x)).float()
        h = self.norm(x.float())
        head = self.lm_head
        w = head.weight if isinstance(head, Linear) else None
        if w is None or w.dtype == torch.float32:
            return head(h).float()
        h2 = h.reshape(-1, h.shape[-1])
        if h2.shape[0] >= HEAD_CAST_ROWS:
            b = None if head.bias is None else head.bias.float()
            return F.linear(h, w.float(), b)
        y = head(h2.to(w.dtype)).float()
        step = 2 * torch.finfo(w.dtype).eps * y.abs().amax(-1, keepdim=True)
        rows, cols = (y >= y.amax(-1, keepdim=True) - step).nonzero(as_tuple=True)
        exact = (w[cols].float() * h2[rows]).sum(-1)
        if head.bias is not None:
            exact = exact + head.bias[cols].float()
        y[rows, cols] = exact
        return y.view(*h.shape[:-1], y.shape[-1])
