"""A paged KV cache: one pool of fixed-size blocks per layer, addressed through per-sequence block tables.

The attention layer sees an ordinary :class:`~frugallm.model.kv_cache.KVCache`. Before each forward pass
the model runner calls :meth:`PagedKVCache.bind` with the batch's block tables, how many tokens each row
already has in the cache and how many it adds; :meth:`update` then scatters the new keys/values into
their slots and gathers each row's blocks back into a right-padded ``[batch, kv_heads, visible, head_dim]``
view with a mask that hides padding and future tokens.

Pool layout ``[num_blocks + 1, block_size, kv_heads, head_dim]``: token-major inside a block so a row's
blocks gather into ``[visible, kv_heads, head_dim]`` with one indexing op. The extra last block is scratch
space: padding tokens write there and padded block-table entries point there, so no real block is
touched. The pool is zero-initialised so that masked-out slots are always finite (a NaN there would leak
through the attention matmul even with zero weight).

Decode passes (one new token per row) on CPU attend with a fused kernel
(``csrc/paged_attention.cpp``, :meth:`decode_attention`) that reads the rows' blocks in place, in the
pool's dtype: no gather, and half-precision pools (half the bytes) cost no slow half-precision SDPA. It is
used for half-precision pools (:func:`pool_dtype` picks bf16 for half models on CPU when the kernel
builds); fp32 pools keep the gather + SDPA path, whose results match a contiguous cache bit for bit.

Prompts computed from their first token (``starts`` all 0, the usual prefill) skip the gather: each row
attends only to its own new keys, which are returned as they are, with a causal mask. (Keeping decode
batches gathered across steps and appending one token was tried: it saves the gather but the attention
then reads the keys from DRAM instead of from cache, which costs as much.)

KV eviction (``kv.Evictor`` with ``pages``): a pass that ends a prompt may name rows whose policy picks,
per layer and KV head, the slots to keep (:attr:`PagedKVCache.kept`), from the same keys the pass attends
over and the queries it computed. The engine then moves the kept slots into the sequence's new, shorter
block table (:meth:`PagedKVCache.compact`). Keys carry their RoPE rotation, so moving them changes
nothing; a row's slots keep arrival order per head, and decode attends over every slot of its row. A
sliding window (StreamingLLM) at its cap writes its one new token over a given slot (``overwrite``) and
attends over the same number of slots. A policy that scores slots at every decode step (H2O) gets its
row's slots and per-slot statistics after the step's attention (``scored``), picks the slots to keep per
KV head and the row's slots are compacted in place, layer by layer, as the static cache's store gathers.

KIVI in the pool (``kv.kivi.PagedKIVI``, driven by ``packed_kv.py``): a sequence's oldest exact slots are packed
in chunks into blocks of the same pool, as bytes (:meth:`PagedKVCache.write_packed`; the K pool's block bytes
hold the keys' codes / scales / zeros, the V pool's the values'), and its bf16 slots after them move down (the
packed ones count as evicted from its block table). A decode pass with such rows (``packed``) attends over each
row's chunks and its bf16 slots (the sinks and the exact window): on the fused kernel, with the chunks read from
their codes by a second kernel and the two softmaxes merged, or dequantized on the gather + SDPA path
(``packed_attention.py``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from frugallm import native
from frugallm.engine.packed_attention import PackedRows, kernel_available, pool_bytes
from frugallm.kv import DecodeContext, Evictor, PrefillContext, select_slots
from frugallm.kv.kivi import PagedKIVI
from frugallm.model.kv_cache import KVCache

_HALF = (torch.bfloat16, torch.float16)


def fused_decode_available(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether decode passes over a pool of ``dtype`` on ``device`` can use the fused CPU kernel."""
    return torch.device(device).type == "cpu" and dtype in _HALF and native.load("paged_attention")


def pool_dtype(model_dtype: torch.dtype, kv_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The pool's dtype: bf16 for half-precision models on CPU when the fused kernel is there (half the
    bytes of the fp32 keys/values ``kv_dtype`` gives them there), else ``kv_dtype``."""
    if model_dtype in _HALF and fused_decode_available(torch.bfloat16, device):
        return torch.bfloat16
    return kv_dtype


class PagedKVCache(KVCache):
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks
        self.device = torch.device(device)
        self.num_used_blocks = 0  # kept current by the engine, for nbytes()
        # Each layer's pool as one row [1, kv_heads, slots, head_dim] (a view): a decode pass of one row whose blocks
        # are consecutive in the pool (bind_run) writes and reads its slots in place, as a contiguous cache does.
        self._k_row = [p.view(1, -1, num_kv_heads, head_dim).transpose(1, 2) for p in self.k]
        self._v_row = [p.view(1, -1, num_kv_heads, head_dim).transpose(1, 2) for p in self.v]
        self._run: tuple[int, int, int] | None = None  # bind_run's (first new slot, first slot, visible slots)
        self.fused_decode = fused_decode_available(dtype, device)
        self._bound = False
        self._fused = False
        self._evict: dict[int, Evictor] = {}
        # Set by a pass with evicting rows: {row: per layer, the kept slots [kv_heads, keep] (int64, ascending)}
        # and the policy's per-slot statistics for them ({name: [1, kv_heads, keep]}).
        self.kept: dict[int, list[torch.Tensor]] = {}
        self.kept_stats: dict[int, list[dict[str, torch.Tensor]]] = {}
        self._scored: dict[int, tuple[Evictor, int, list[dict[str, torch.Tensor]]]] = {}
        self._packed = PackedRows({}, self.device)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K (or V) pool: what a packed chunk's keys (values) fill."""
        return self.k[0][0].numel() * self.k[0].element_size()

    @property
    def bytes_per_block(self) -> int:
        t = self.k[0]
        return 2 * len(self.k) * t[0].numel() * t.element_size()

    def bind(self, block_tables: list[list[int]], starts: list[int], num_new: list[int],
             evict: Mapping[int, Evictor] | None = None, overwrite: Mapping[int, int] | None = None,
             scored: Mapping[int, tuple[Evictor, int, list[dict[str, torch.Tensor]]]] | None = None,
             packed: Mapping[int, tuple[PagedKIVI, list[int]]] | None = None) -> None:
        """Prepare one forward pass over a right-padded ``[batch, max(num_new)]`` input.

        Row ``b`` has ``starts[b]`` slots cached already (slots ``0..starts[b]-1`` of its block table; fewer
        than its RoPE position after an eviction) and adds ``num_new[b]`` tokens in the next slots; its input
        is right-padded to ``max(num_new)``. Block tables must already cover ``starts[b] + num_new[b]`` slots.
        ``evict``: rows whose pass ends their prompt, and the policy that picks their kept slots
        (:attr:`kept`, after the pass). ``overwrite``: rows whose one new token goes over slot ``overwrite[b]`` of
        their ``starts[b]`` slots instead of after them (a sliding window at its cap). ``scored``: decode rows
        whose policy scores their slots after this step: ``(policy, capacity, per-layer statistics)``; the
        statistics are updated in place and the row's slots compacted to ``capacity`` when it holds more.
        ``packed``: decode rows with KIVI chunks in the pool: ``(codec, the chunks' blocks)``; they attend over the
        dequantized chunks, then their bf16 slots.
        """
        bs, dev = self.block_size, self.device
        b = len(block_tables)
        t = max(num_new)
        overwrite = overwrite or {}
        ends = [s if i in overwrite else s + n for i, (s, n) in enumerate(zip(starts, num_new, strict=True))]
        nb = max(-(-e // bs) for e in ends)
        tables = torch.full((b, nb), self.scratch_block, dtype=torch.long)
        for i, bt in enumerate(block_tables):
            k = min(len(bt), nb)
            tables[i, :k] = torch.tensor(bt[:k], dtype=torch.long)
        starts_t = torch.tensor(starts, dtype=torch.long)
        n_t = torch.tensor(num_new, dtype=torch.long)
        pos = starts_t[:, None] + torch.arange(t)[None, :]  # [b, t] position (= slot) of each new token
        valid = torch.arange(t)[None, :] < n_t[:, None]
        wpos = pos.clone()
        for i, slot in overwrite.items():
            wpos[i, 0], pos[i, 0] = slot, starts[i] - 1  # written over `slot`; it sees the row's starts[i] slots
        blk = torch.gather(tables, 1, (wpos // bs).clamp(max=nb - 1))
        write = torch.where(valid, blk * bs + wpos % bs, self.scratch_block * bs)
        self._write_idx = write.reshape(-1).to(dev)
        self._tables = tables.view(-1).to(dev)
        self._evict = dict(evict or {})
        self._ends, self._num_new = ends, list(num_new)
        self.kept = {r: [] for r in self._evict}
        self.kept_stats = {r: [] for r in self._evict}
        self._scored = dict(scored or {})
        self._row_tables = tables
        self._packed = PackedRows(packed or {}, dev)
        assert not self._packed or (t == 1 and not overwrite and not self._scored and not self._evict), \
            "packed KV rows only decode"
        # The policies read update()'s keys: no fused pass for their steps. Packed rows keep it where their kernel
        # is there too (packed_attention.py), else they are dequantized in update().
        self._fused = (self.fused_decode and t == 1 and not self._evict and not self._scored
                       and (not self._packed or kernel_available()))
        if self._fused:
            self._tables_2d = tables
            self._lens = torch.tensor(ends, dtype=torch.long)
        self._shape = (b, t, nb * bs)
        self._fresh = False
        # Masks are additive fp32 (0 or -inf), built once per pass: SDPA would otherwise turn a bool mask
        # into this form in every layer (~15% of a decode step's attention time).
        if self._packed and b > 1 and not self._fused:
            # [packed right-aligned before slot P | bf16 slots]: row r sees its chunks' tokens and its slots.
            p, self._visible = self._packed.max_len, max(ends)
            slots = torch.arange(p + self._visible)
            lo = torch.tensor([p - self._packed.row_len(r) for r in range(b)])[:, None]
            hi = torch.tensor([p + e for e in ends])[:, None]
            self._mask = _additive((slots[None, :] >= lo) & (slots[None, :] < hi)).view(b, 1, 1, -1).to(dev)
        elif b == 1:
            # One row: show exactly its tokens, like a contiguous cache, so results match it bit for bit.
            self._visible = ends[0]
            self._mask = None
            if starts[0] > 0 and num_new[0] > 1:  # a later prompt chunk: causal with an offset
                slots = torch.arange(ends[0])
                self._mask = _additive(slots[None, :] <= pos[0, :, None]).view(1, 1, t, ends[0]).to(dev)
        elif t > 1 and not any(starts):
            # Whole prompts from their first token: each row attends only to its own new keys, so they
            # are returned as they are (no gather) with a plain causal mask; right padding only ever
            # reaches padding queries.
            self._visible = t
            self._mask = None
            self._fresh = True
        else:
            self._visible = max(ends)
            slots = torch.arange(self._visible)
            # Slot j is visible to query i of row b iff j <= its position. Padding query rows see up to
            # their (fake) position too: finite garbage, discarded by the caller, never NaN.
            self._mask = _additive(slots[None, None, :] <= pos[:, :, None]).unsqueeze(1).to(dev)
        self._run = None
        self._bound = True

    def bind_run(self, block_table: list[int], start: int, num_new: int = 1) -> bool:
        """Prepare a pass of one row (no KV policy) with ``start`` slots cached adding ``num_new`` tokens (one to
        decode, or a prompt from its first token), when the blocks holding its ``start + num_new`` slots are
        consecutive in the pool (one sequence alone in a fresh pool: always): :meth:`update` then writes the new
        slots and returns the row's slots as views of the pool (no gather, no index tensors, no mask), the same
        values and layout :meth:`bind` gives, so the same results bit for bit. Returns False (nothing bound)
        otherwise, or for a decode on the fused kernel (it reads blocks in place)."""
        bs, end = self.block_size, start + num_new
        nb = -(-end // bs)
        first = block_table[0] if block_table else -1
        if (num_new > 1 and start) or (num_new == 1 and self.fused_decode) or len(block_table) < nb:
            return False
        if block_table[nb - 1] != first + nb - 1 or (nb > 2 and block_table[:nb] != list(range(first, first + nb))):
            return False
        self._run = (first * bs + start, first * bs, end)
        self._evict, self._scored, self.kept, self.kept_stats = {}, {}, {}, {}
        self._packed = PackedRows({}, self.device)
        self._fused = self._fresh = False
        self._shape = (1, num_new, nb * bs)
        self._bound = True
        return True

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
        if self._run is not None:  # bind_run: one row on consecutive blocks, in place
            slot, first, n = self._run
            kr, vr = self._k_row[layer], self._v_row[layer]
            t = k.shape[2]
            kr.narrow(2, slot, t).copy_(k)
            vr.narrow(2, slot, t).copy_(v)
            return kr.narrow(2, first, n), vr.narrow(2, first, n), None
        k, v = self._write(layer, k, v)
        b, h, _, d = k.shape
        kp, vp = self.k[layer], self.v[layer]
        if self._fresh:
            keys, values, mask = k, v, None
        else:
            n = self._visible
            keys = kp.index_select(0, self._tables).view(b, -1, h, d)[:, :n].transpose(1, 2)
            values = vp.index_select(0, self._tables).view(b, -1, h, d)[:, :n].transpose(1, 2)
            mask = self._mask
        if self._packed:
            keys, values = self._packed.prepend(self.k[layer], self.v[layer], keys, values)
        if self._evict:
            self._pick(layer, keys, values, q)
        if self._scored:
            self._score(layer, keys, values, q)
        return keys, values, mask

    @torch.inference_mode()
    def write_packed(self, layer: int, blocks: list[int], kbytes: torch.Tensor, vbytes: torch.Tensor) -> None:
        """Store chunks ``kbytes [chunks, key bytes]``, ``vbytes [chunks, value bytes]`` of ``layer`` in ``blocks``
        (``len(blocks) / chunks`` per chunk)."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        n, bb = kbytes.shape[0], self.block_bytes
        for pool, raw in ((self.k[layer], kbytes), (self.v[layer], vbytes)):
            buf = torch.zeros(n, len(blocks) // n * bb, dtype=torch.uint8, device=self.device)
            buf[:, :raw.shape[1]] = raw
            pool_bytes(pool)[idx] = buf.view(len(blocks), bb)

    @torch.inference_mode()
    def read_slots(self, layer: int, table: list[int], start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots ``start..stop-1`` of block table ``table`` in ``layer``: ``k, v [kv_heads, stop - start, D]``."""
        bs = self.block_size
        j = torch.arange(start, stop)
        flat = (torch.tensor(table, dtype=torch.long)[j // bs] * bs + j % bs).to(self.device)
        kp, vp = self.k[layer], self.v[layer]
        h, d = kp.shape[2], kp.shape[3]
        return kp.view(-1, h, d)[flat].transpose(0, 1), vp.view(-1, h, d)[flat].transpose(0, 1)

    def _pick(self, layer: int, keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor | None) -> None:
        """Each evicting row's kept slots in ``layer``: its policy scores its ``end`` slots (the whole prompt)
        with this pass's queries, as the static cache's prefill does."""
        num_layers = len(self.k)
        for r, ev in self._evict.items():
            end, n = self._ends[r], self._num_new[r]
            if ev.needs_queries and q is None:
                raise RuntimeError(f"{ev.name} needs the prompt's queries, but the attention passed none")
            # A lookahead pass (SpecKV, one row) hands queries past the bound tokens: the draft's, which vote too.
            look = 0 if q is None else q.shape[2] - self._shape[1]
            qr = (q[r:r + 1, :, :n] if not look else q[r:r + 1]) if ev.needs_queries else None
            valid = torch.ones(1, end, dtype=torch.bool, device=keys.device)
            ctx = PrefillContext(layer, num_layers, keys[r:r + 1, :, :end], values[r:r + 1, :, :end], qr, valid,
                                 lookahead=look)
            keep = ev.prefill_keep(end, layer, num_layers)
            idx = select_slots(ev.on_prefill(ctx), keep, valid)
            self.kept[r].append(idx[0])
            self.kept_stats[r].append({k: torch.gather(s, 2, idx) for k, s in ctx.stats.items()})

    def _score(self, layer: int, keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor | None) -> None:
        """Decode eviction by scores (H2O), per scored row: update its statistics with this step's attention, and
        when it holds more than its capacity keep the top slots per KV head, compacted to its first slots."""
        assert q is not None, "a scoring policy needs the step's queries"
        for r, (ev, capacity, stats) in self._scored.items():
            n = self._ends[r]
            valid = torch.ones(1, n, dtype=torch.bool, device=keys.device)
            ctx = DecodeContext(layer, len(self.k), keys[r:r + 1, :, :n], values[r:r + 1, :, :n], q[r:r + 1, :, :1],
                                valid, capacity, stats[layer])
            scores = ev.on_decode(ctx)
            stats[layer] = ctx.stats
            if scores is None or n <= capacity:
                continue
            idx = select_slots(scores, ev.decode_keep(n, capacity), valid)  # [1, h, keep]
            stats[layer] = {k: torch.gather(s, 2, idx) for k, s in ctx.stats.items()}
            table = self._row_tables[r].to(self.device)
            self._move(layer, table, table, idx[0])

    @torch.inference_mode()
    def compact(self, old_table: list[int], new_table: list[int], kept: list[torch.Tensor]) -> None:
        """Move one sequence's kept slots ``kept[layer] [kv_heads, keep]`` (indices into ``old_table``'s slots)
        to slots ``0..keep-1`` of ``new_table``, every layer; all are read before any is written, so the two
        tables may share blocks."""
        old = torch.tensor(old_table, dtype=torch.long, device=self.device)
        new = torch.tensor(new_table, dtype=torch.long, device=self.device)
        for layer, idx in enumerate(kept):
            self._move(layer, old, new, idx.to(self.device))

    def _move(self, layer: int, old: torch.Tensor, new: torch.Tensor, idx: torch.Tensor) -> None:
        """Slots ``idx [kv_heads, keep]`` of block table ``old`` -> slots ``0..keep-1`` of ``new``, per KV head."""
        bs, dev = self.block_size, self.device
        h, keep = idx.shape
        src = old[idx // bs] * bs + idx % bs  # [h, keep] flat slots
        j = torch.arange(keep, device=dev)
        dst = (new[j // bs] * bs + j % bs)[None].expand(h, keep)
        head = torch.arange(h, device=dev)[:, None].expand(h, keep)
        for pool in (self.k[layer], self.v[layer]):
            flat = pool.view(-1, h, pool.shape[-1])
            flat[dst, head] = flat[src, head]  # advanced indexing reads every source before writing

    def decode_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        """One-token decode with the fused kernel: ``q [B, heads, 1, D]``, ``k, v [B, kv_heads, 1, D]`` ->
        fp32 ``[B, heads, 1, D]``; None when this pass does not use it (then :meth:`update` + SDPA)."""
        if not self._fused:
            return None
        self._write(layer, k, v)
        b, _, _, d = k.shape
        qf = q.reshape(b, -1, d).to(torch.float32).contiguous()
        kp, vp = self.k[layer], self.v[layer]
        if not self._packed:
            out = torch.ops.frugallm.paged_decode_attention(qf, kp, vp, self._tables_2d, self._lens, d**-0.5)
            return out.unsqueeze(2)
        out, lse = torch.ops.frugallm.paged_decode_attention_lse(qf, kp, vp, self._tables_2d, self._lens, d**-0.5)
        self._packed.merge(kp, vp, qf, out, lse, d**-0.5)  # the packed rows' chunks, from their codes
        return out.unsqueeze(2)

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter this pass's ``k, v [B, kv_heads, T, D]`` into their bound slots; returns them in the pool's
        dtype (the pass may compute in another: CPU prefill in bf16, fp16 pool)."""
        assert self._bound, "PagedKVCache.bind() must be called before a forward pass"
        b, h, t, d = k.shape
        assert (b, t) == self._shape[:2], f"input {b}x{t} does not match the bound batch {self._shape[:2]}"
        kp, vp = self.k[layer], self.v[layer]
        k, v = k.to(kp.dtype), v.to(vp.dtype)
        kp.view(-1, h, d).index_copy_(0, self._write_idx, k.transpose(1, 2).reshape(b * t, h, d))
        vp.view(-1, h, d).index_copy_(0, self._write_idx, v.transpose(1, 2).reshape(b * t, h, d))
        return k, v

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate block ``src`` into ``dst`` in every layer."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for pool in (*self.k, *self.v):
            pool[dst] = pool[src]

    def nbytes(self) -> int:
        return self.num_used_blocks * self.bytes_per_block

    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def num_slots(self) -> int:
        return self.num_used_blocks * self.block_size


def _additive(visible: torch.Tensor) -> torch.Tensor:
    """Bool "may attend" mask -> fp32 additive mask (0 where visible, -inf elsewhere)."""
    return torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
