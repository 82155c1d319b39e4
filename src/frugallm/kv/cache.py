"""The compressed KV cache: runs a :class:`~frugallm.kv.spec.KVSpec` behind the engine's ``KVCache`` API.

Per layer it keeps a *store* (plain tensors, or the quantizer's packed format), the number of
leading padding slots per row, the key channels kept per head (channel pruner; the pruned prompt
slots live in a second store placed before the main one) and per-slot policy statistics. The rules
that make policies compose:

* **Attention sees the stored state plus exact new tokens.** A step attends over the dequantized
  copy of what was stored before it, followed by this step's keys/values exactly as the model made
  them (prefill attends over the exact prompt). Storage compression (eviction, quantization,
  channel pruning) is applied *after* the step's keys/values are handed back, so
  ``attention(compressed cache) == attention(cache.dequantized())`` by construction.
* **Evicted slots leave storage.** Evictors score slots, the cache keeps the top ones per KV head
  (in arrival order) and the store physically drops the rest: packed codes, scales, X rows,
  per-slot statistics. Stores that cannot evict per head (XQuant keeps one X per token) get the
  scores averaged over heads. The quantizer's full-precision window is never evicted; with an
  evictor that holds a layer at C slots during decode it is capped at ``C / 2 - group`` tokens.
* **Padding stays first.** Left padding scores ``-inf``, so it is evicted before any real token and
  the remaining padding is always the first ``pad[b]`` slots of row ``b``: one ``[batch]`` count
  gives the mask.
* **Positions.** Keys are stored rotated at their original RoPE positions, unless a policy
  ``changes_positions`` (StreamingLLM ``positions=cache``): then they are stored unrotated and
  re-rotated at every step by their slot index, so the newest slot sits right before the query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from frugallm.kv.policy import DecodeContext, PrefillContext
from frugallm.kv.spec import KVSpec, parse_kv_spec
from frugallm.kv.stores import FullStore, Store, StoreContext, gather_slots
from frugallm.model.kv_cache import ContiguousKVCache, KVCache
from frugallm.model.ops import apply_rope


def select_slots(scores: torch.Tensor, keep: int, valid: torch.Tensor, protected: int = 0, per_head: bool = True,
                 pinned: int = 0) -> torch.Tensor:
    """Top-``keep`` slots ``[b, h or 1, keep]`` (int64, ascending slot order) of ``scores [b, h, N]``; ``valid:
    bool [b, N]``. The static cache and the paged engine both pick kept slots here."""
    # Priority: the store's protected window and pinned sinks, then the policy's +inf slots, then
    # scores; padding last.
    s = scores.float().nan_to_num(posinf=torch.finfo(torch.float32).max)
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    if protected:
        s[..., s.shape[2] - protected:] = float("inf")
    s[..., :pinned] = float("inf")
    if not per_head:
        s = s.mean(1, keepdim=True)
    return s.topk(keep, dim=-1).indices.sort(dim=-1).values


@dataclass
class _Layer:
    store: Store | None = None
    pad: torch.Tensor | None = None  # [batch] leading padding slots
    channels: torch.Tensor | None = None  # [batch, kv_heads, kept] key channels kept (channel pruner)
    pruned: Store | None = None  # prompt slots stored with only `channels` of their keys (before `store`)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # per-slot policy state [b, h, N]
    capacity: int = 0  # slots allowed after a decode step (decode-time evictors)
    prompt: int = 0  # prompt slots seen at prefill


class CompressedKVCache(KVCache):
    """A :class:`KVCache` whose storage follows ``spec`` (see the module docstring for the rules).

    Parameters
    ----------
    spec : KVSpec
        Parsed policies (at most one evictor, quantizer and channel pruner).
    model : Transformer
        The model the cache serves (config, RoPE tables; XQuant also reads the K/V projections).
    batch, dtype, device, pad_lens
        As for :class:`~frugallm.model.kv_cache.ContiguousKVCache`; ``dtype`` is the dtype of the keys and
        values handed to attention.
    store_dtype
        Storage dtype of full-precision slots (default ``dtype``; quantized slots use packed codes and
        their own scale dtypes). On CPU the engine attends in fp32 but stores in the model's half dtype:
        keys come from half-precision activations, so that is lossless and halves the bytes.
    """

    def __init__(
        self,
        spec: KVSpec,
        model: Any,
        *,
        batch: int,
        dtype: torch.dtype,
        device: torch.device | str,
        pad_lens: list[int] | None = None,
        store_dtype: torch.dtype | None = None,
    ) -> None:
        cfg = model.config
        self.spec = spec
        self.model = model
        self.num_layers, self.batch = cfg.num_layers, batch
        self.kv_heads, self.head_dim = cfg.num_kv_heads, cfg.head_dim
        self.dtype, self.device = store_dtype or dtype, torch.device(device)
        self.attn_dtype = dtype
        self.frame = "raw" if spec.changes_positions else "rotated"
        self.pad_lens = torch.tensor(pad_lens or [0] * batch, device=self.device, dtype=torch.long)
        self.layers = [_Layer() for _ in range(self.num_layers)]

    @property
    def rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's RoPE tables, as grown so far (they cover every position the model has run)."""
        return self.model.rope_tables(self.device)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _rotate(self, k: torch.Tensor, pos: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate ``k: [b, h, n, d]`` by positions ``[b, n]`` or ``[b, h, n]`` (``inverse`` un-rotates)."""
        cos_t, sin_t = self.rope
        pos = pos.long().clamp(min=0)
        cos, sin = cos_t[pos], sin_t[pos]
        if pos.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return apply_rope(k, cos.to(k.dtype), (-sin if inverse else sin).to(k.dtype))

    def _new_store(self, layer: int, key_dim: int, capacity: int | None) -> Store:
        q = self.spec.quantizer
        # A decode-time evictor holds the layer at `capacity` slots; a full-precision window (never
        # evicted) of that size would leave it nothing to choose, so cap the window at half of it.
        group = getattr(q, "group", 0)
        max_residual = None if capacity is None else max(0, capacity // 2 - group)
        ctx = StoreContext(layer=layer, batch=self.batch, kv_heads=self.kv_heads, head_dim=self.head_dim,
                           key_dim=key_dim, dtype=self.dtype, device=self.device, frame=self.frame,
                           max_residual=max_residual, attn=self.model.layers[layer].attn, rope=self.rope)
        return FullStore(ctx) if q is None else q.make_store(ctx)

    def _store_per_head(self) -> bool:
        q = self.spec.quantizer
        return q is None or not q.needs_layer_input

    @staticmethod
    def _mask(valid: torch.Tensor, start: int, t: int) -> torch.Tensor:
        """bool ``[b, 1, t, n]``: causal for queries at slots ``start..start+t-1``, never padding."""
        n = valid.shape[1]
        slots = torch.arange(n, device=valid.device)
        qpos = torch.arange(start, start + t, device=valid.device)
        mask = (slots[None, :] <= qpos[:, None])[None] & valid[:, None, :]
        mask |= slots[None, None, :] == qpos[None, :, None]  # a padded query row still sees itself
        return mask[:, None]

    def _gather_stats(self, st: _Layer, idx: torch.Tensor) -> None:
        for key, val in st.stats.items():
            st.stats[key] = torch.gather(val, 2, idx.expand(val.shape[0], val.shape[1], idx.shape[2]))

    # -- KVCache API ------------------------------------------------------------------------------------------
    def update(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        q: torch.Tensor | None = None,
        x: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if positions is None:
            raise ValueError("CompressedKVCache.update needs positions")
        st = self.layers[layer]
        if st.store is None:
            return self._prefill(layer, st, k, v, q, x, positions)
        return self._step(layer, st, k, v, q, x, positions)

    def _prefill(self, layer: int, st: _Layer, k, v, q, x, positions):  # noqa: ANN001, ANN202
        spec = self.spec
        b, h, t, _ = k.shape
        slots = torch.arange(t, device=k.device)
        valid = slots[None, :] >= self.pad_lens[:, None]  # [b, T]
        mask = self._mask(valid, 0, t) if bool((self.pad_lens > 0).any()) else None
        quant = spec.quantizer
        ks, vs, pos = k, v, positions[:, None, :].expand(b, h, t)  # what gets stored
        xs = x if quant is not None and quant.needs_layer_input else None
        st.pad, st.prompt = self.pad_lens.clone(), t
        ev = spec.evictor
        if ev is not None:
            ctx = PrefillContext(layer, self.num_layers, k, v, q if ev.needs_queries else None, valid)
            scores = ev.on_prefill(ctx)
            keep = ev.prefill_keep(t, layer, self.num_layers)
            st.stats = ctx.stats
            if keep < t:
                idx = select_slots(scores, keep, valid, 0, self._store_per_head())
                ks, vs, pos = gather_slots(k, idx), gather_slots(v, idx), torch.gather(pos, 2, idx.expand(b, h, keep))
                if xs is not None:
                    xs = torch.gather(x, 1, idx[:, 0, :, None].expand(b, keep, x.shape[2]))
                self._gather_stats(st, idx)
                st.pad = (idx[:, 0] < self.pad_lens[:, None]).sum(1)
            st.capacity = ev.decode_capacity(ks.shape[2])
        n = ks.shape[2]
        if quant is not None and bool((st.pad > 0).any()):
            # Give padding slots a real token's values so they do not widen quantization ranges.
            src = torch.maximum(torch.arange(n, device=k.device)[None, :], st.pad[:, None]).clamp(max=n - 1)
            ks, vs = gather_slots(ks, src[:, None].expand(b, h, n)), gather_slots(vs, src[:, None].expand(b, h, n))
            if xs is not None:
                xs = torch.gather(xs, 1, src[..., None].expand(b, n, xs.shape[2]))
        if self.frame == "raw":
            ks = self._rotate(ks, pos, inverse=True)
        pr = spec.pruner
        if pr is not None and n > pr.window:
            # ThinK: prompt keys before the observation window keep only the query-relevant channels;
            # the window and every generated key stay full width.
            valid_kept = torch.arange(n, device=k.device)[None, :] >= st.pad[:, None]
            st.channels = pr.on_prefill(PrefillContext(layer, self.num_layers, ks, vs, q, valid_kept))
            m, kept = n - pr.window, st.channels.shape[2]
            st.pruned = self._new_store(layer, kept, 0)
            st.pruned.append(torch.gather(ks[:, :, :m], 3, st.channels[:, :, None, :].expand(b, h, m, kept)),
                             vs[:, :, :m], None if xs is None else xs[:, :m], pos[:, 0, :m])
            ks, vs, pos = ks[:, :, m:], vs[:, :, m:], pos[:, :, m:]
            xs = None if xs is None else xs[:, m:]
        decode_evicts = ev is not None and ev.evicts_during_decode
        st.store = self._new_store(layer, ks.shape[3], st.capacity if decode_evicts else None)
        st.store.append(ks, vs, xs, pos[:, 0])
        return k, v, mask

    def _step(self, layer: int, st: _Layer, k, v, q, x, positions):  # noqa: ANN001, ANN202
        store, spec = st.store, self.spec
        b, h, t, d = k.shape
        n_old = self.slots(layer)
        k_store = self._rotate(k, positions, inverse=True) if self.frame == "raw" else k
        if store.exact and st.pruned is None and self.frame == "rotated":
            store.append(k_store, v, x, positions)  # stored == exact: attend over the buffer itself
            keys, values = store.materialize()
        else:
            old_k, old_v = self.dequantized(layer)
            if self.frame == "raw":
                old_pos = positions[:, :1] - n_old + torch.arange(n_old, device=k.device)[None, :]
                old_k = self._rotate(old_k, old_pos)
            keys = torch.cat([old_k.to(self.attn_dtype), k.to(self.attn_dtype)], dim=2)
            values = torch.cat([old_v.to(self.attn_dtype), v.to(self.attn_dtype)], dim=2)
            store.append(k_store, v, x, positions)
        n = n_old + t
        valid = torch.arange(n, device=k.device)[None, :] >= st.pad[:, None]
        mask = self._mask(valid, n_old, t) if t > 1 or bool((st.pad > 0).any()) else None
        ev = spec.evictor
        if ev is not None and ev.evicts_during_decode:
            ctx = DecodeContext(layer, self.num_layers, keys, values, q, valid, st.capacity, st.stats)
            scores = ev.on_decode(ctx)
            st.stats = ctx.stats
            if scores is not None and n > st.capacity:
                keep = max(ev.decode_keep(n, st.capacity), store.protected + store.pinned)
                if keep < n:
                    idx = select_slots(scores, keep, valid, store.protected, self._store_per_head(), store.pinned)
                    store.gather(idx)
                    self._gather_stats(st, idx)
                    st.pad = (idx[:, 0] < st.pad[:, None]).sum(1)
        # In the attention dtype, as ContiguousKVCache: the model attends a decode step in it (fp32 on CPU,
        # where half-precision SDPA with one query is 4-10x slower).
        return keys.to(self.attn_dtype), values.to(self.attn_dtype), mask

    def dequantized(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored slots of ``layer`` as attention will read them (full head_dim, store frame).

        ``[batch, kv_heads, slots, head_dim]`` each; keys are RoPE-rotated unless the spec changes
        positions (then unrotated: the cache rotates them by slot at every step).
        """
        st = self.layers[layer]
        assert st.store is not None, "layer has not been prefilled"
        keys, values = st.store.materialize()
        if st.pruned is not None:  # zeros in the dropped channels: q . k then only uses the kept ones
            pk, pv = st.pruned.materialize()
            b, h, n, kept = pk.shape
            pk = pk.new_zeros(b, h, n, self.head_dim).scatter(3, st.channels[:, :, None, :].expand(b, h, n, kept), pk)
            keys, values = torch.cat([pk, keys], dim=2), torch.cat([pv, values], dim=2)
        return keys, values

    def padding(self, layer: int) -> torch.Tensor:
        """Leading padding slots per row ``[batch]`` of ``layer``."""
        st = self.layers[layer]
        return self.pad_lens if st.pad is None else st.pad

    def slots(self, layer: int) -> int:
        st = self.layers[layer]
        if st.store is None:
            return 0
        return st.store.num_slots + (0 if st.pruned is None else st.pruned.num_slots)

    def _meta_bytes(self) -> int:
        total = 0
        for st in self.layers:
            tensors = [st.channels, *st.stats.values()]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total

    def nbytes(self) -> int:
        stores = [s for st in self.layers for s in (st.store, st.pruned) if s is not None]
        return sum(s.nbytes() for s in stores) + self._meta_bytes()

    def reserved_bytes(self) -> int:
        stores = [s for st in self.layers for s in (st.store, st.pruned) if s is not None]
        return sum(s.reserved_bytes() for s in stores) + self._meta_bytes()

    @property
    def num_slots(self) -> int:
        return self.slots(0)


def build_kv_cache(
    spec: str | KVSpec | None,
    model: Any,
    *,
    batch: int,
    capacity: int,
    dtype: torch.dtype,
    device: torch.device | str,
    pad_lens: list[int] | None = None,
    store_dtype: torch.dtype | None = None,
) -> KVCache:
    """The cache for ``spec``: a :class:`CompressedKVCache`, or the plain contiguous cache when the spec
    compresses nothing (``"full"``, or a prompt selector alone). ``capacity`` sizes the plain cache;
    ``store_dtype`` is the compressed cache's full-precision storage (see :class:`CompressedKVCache`)."""
    spec = parse_kv_spec(spec)
    cfg = model.config
    if not spec.compresses_cache:
        return ContiguousKVCache(cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim, capacity, dtype, device,
                                 pad_lens)
    return CompressedKVCache(spec, model, batch=batch, dtype=dtype, device=device, pad_lens=pad_lens,
                             store_dtype=store_dtype)


def select_prompt_tokens(spec: str | KVSpec | None, model: Any, prompt_ids: list[int]) -> list[int] | None:
    """The shortened prompt to prefill (in original order), or None when ``spec`` selects no tokens."""
    sel = parse_kv_spec(spec).selector
    return None if sel is None else sel.select(model, list(prompt_ids))
