"""KIVI on the paged engine: a sequence's oldest exact KV slots packed into blocks of the same pool.

A sequence with ``kv_quant`` (a :class:`~frugallm.kv.kivi.PagedKIVI`) holds its slots as
``[sinks | packed chunks | exact window]``. Whenever its exact slots after the sinks reach ``residual`` plus a
chunk (after a step that leaves it decoding, so packed rows only ever decode), :meth:`KVPacker.pack` reads the
oldest whole chunks (every layer), encodes them with KIVI's quantizer, compacts the block table down to the sinks
and the rest (``BlockManager.compact``: the packed slots count as evicted, the freed bf16 blocks return to the
pool), then writes the chunks' bytes into fresh blocks of its packed table. Chunk boundaries sit at ``sinks + i *
chunk`` whatever the timing, so a sequence recomputed after a preemption packs the same chunks again.

Prefix caching: a sequence's prompt blocks are registered while it prefills (it runs no differently until then);
packing never writes a block another sequence references: compaction copies shared (or cached) leading blocks
to fresh ones, and the chunks go to fresh blocks. Once packed it registers no more prefixes (its block table no
longer holds token ranges).
"""

from __future__ import annotations

import torch

from frugallm.engine.block_manager import BlockManager
from frugallm.engine.paged_cache import PagedKVCache
from frugallm.engine.scheduler import SeqState
from frugallm.kv import KVSpecError
from frugallm.kv.kivi import KIVI, PagedKIVI


class KVPacker:
    """Packs KIVI sequences' chunks into ``cache``'s pool, with ``bm``'s blocks."""

    def __init__(self, bm: BlockManager, cache: PagedKVCache, num_kv_heads: int, head_dim: int) -> None:
        self.bm, self.cache = bm, cache
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self._codecs: dict[KIVI, PagedKIVI] = {}
        self.num_packed_chunks = 0  # counters (metrics, tests)
        self.num_deferred = 0  # packings put off for want of free blocks

    def codec(self, quantizer: KIVI) -> PagedKIVI:
        """The pool layout of ``quantizer`` (one per distinct spec); a layout that saves nothing is an error."""
        c = self._codecs.get(quantizer)
        if c is None:
            pool = self.cache.k[0]
            c = PagedKIVI(quantizer, self.num_kv_heads, self.head_dim, pool.dtype, pool.device, self.cache.block_bytes)
            if c.tokens_per_block() <= self.bm.block_size:
                raise KVSpecError(f"kv {quantizer.describe()}: a packed chunk of {c.chunk_tokens} tokens takes "
                                  f"{c.blocks_per_chunk} blocks of {self.bm.block_size} tokens: no saving")
            self._codecs[quantizer] = c
        return c

    def chunks_ready(self, seq: SeqState) -> int:
        """Whole chunks of ``seq``'s exact slots that may be packed now (0 while it has tokens to compute)."""
        c = seq.kv_quant
        if c is None or seq.num_computed_tokens < seq.num_tokens - 1 or seq.num_computed_tokens < seq.num_prompt_tokens:
            return 0
        exact = self.bm.num_slots(seq) - c.sinks
        return max(0, (exact - max(c.residual, 1)) // c.chunk_tokens)  # (at least one slot stays in bf16)

    @torch.inference_mode()
    def pack(self, seq: SeqState) -> int:
        """Pack ``seq``'s ready chunks; returns how many (0 when none are ready or the pool lacks the blocks)."""
        n = self.chunks_ready(seq)
        if not n:
            return 0
        c: PagedKIVI = seq.kv_quant
        slots = self.bm.num_slots(seq)
        start, stop = c.sinks, c.sinks + n * c.chunk_tokens
        keep = slots - (stop - start)
        blocks = n * c.blocks_per_chunk
        if not self.bm.can_compact(seq, keep, reserve=blocks):
            self.num_deferred += 1
            return 0
        old = list(seq.block_table)
        cache = self.cache
        encoded = []
        for layer in range(len(cache.k)):  # every chunk slot is read before any block is written
            encoded.append(c.encode(*cache.read_slots(layer, old, start, stop)))
        kept = torch.cat([torch.arange(start), torch.arange(stop, slots)])[None].expand(self.num_kv_heads, keep)
        cache.compact(old, self.bm.compact(seq, keep, reserve=blocks), [kept] * len(cache.k))
        new = self.bm.take_packed(seq, blocks)
        for layer, (kb, vb) in enumerate(encoded):
            cache.write_packed(layer, new, kb, vb)
        seq.num_packed += stop - start
        self.num_packed_chunks += n
        return n
