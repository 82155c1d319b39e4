"""Paged KV memory bookkeeping: fixed-size blocks, reference counts, copy-on-write, prefix caching.

Plain Python (no torch) so it can be unit-tested alone; the tensors live in :mod:`paged_cache`.

* A sequence owns a *block table*: ``block_table[i]`` holds the keys/values of its tokens
  ``[i * block_size, (i + 1) * block_size)``.
* Blocks are reference counted. Two sequences share a block after :meth:`BlockManager.fork` (``n > 1``
  samples of one prompt) or a prefix-cache hit. Shared *full* blocks are never written again; a shared
  *partial* last block is copied before the next write (copy-on-write): :meth:`BlockManager.append_slots`
  returns the ``(src, dst)`` pairs the model runner must copy before the forward pass.
* Prefix caching: once a block is full and computed its hash, chained with the previous block's hash
  (``hash((prev_hash, *tokens))``), is registered; the first block chains from the sequence's LoRA adapter
  (:func:`first_hash`), so a prefix computed under one adapter is never reused by another.
  A new sequence whose leading full blocks hash the same
  (and hold the same tokens: hashes are verified) reuses them instead of recomputing. Freed blocks keep
  their contents and hash, sit in an LRU free list and are only forgotten when reallocated, so a request
  arriving after an identical one finished still hits.
* In-flight prefixes: a full block whose tokens are known but not yet computed (a prompt being prefilled)
  is *in flight* under the hash it will have. :meth:`BlockManager.prefix_in_flight` tells the scheduler
  that a new sequence's next prefix block is being computed right now, so it can wait a step and then
  share it rather than compute the same tokens again (identical prompts arriving together).
* KV eviction (:meth:`BlockManager.compact`): a sequence whose KV policy dropped slots at prefill keeps
  ``num_computed_tokens - num_evicted`` slots, compacted into the leading blocks of a new table; the rest
  of its blocks go back to the pool. Its blocks then no longer hold token ranges, so it registers no
  prefixes afterwards. Blocks it shares (ref count > 1: a prefix-cache hit) are never
  written: the compacted slots go to fresh blocks there (copy-on-write). So do blocks holding a cached
  prefix while free blocks remain: released, they keep their full-prompt contents and hashes and serve the
  next request with the same prefix (a system prompt) as before. Only when the pool is exhausted is an own
  block written in place, and it leaves the prefix cache first.
* Sliding windows (StreamingLLM): a sequence capped at ``max_slots`` slots writes each new token over its
  oldest slot after the first ``ring_start`` ones (:func:`ring_slot`), so it takes no new block; a shared
  block is copied before that write, an own one leaves the prefix cache.
* Packed KV (KIVI in the pool, ``packed_kv.py``): a sequence's oldest exact slots, packed, fill whole blocks of
  its *packed table* (:meth:`BlockManager.take_packed`); they count as evicted from its block table, which is
  compacted as above. The packed blocks hold no token ranges (no prefix caching), are freed with the sequence
  and shared by its forks.
* Reservations (:meth:`BlockManager.reserve`): blocks taken out of the pool for memory held elsewhere under the
  same budget (SpecMemo: a speculative request's contiguous caches, see ``spec_solo.py``); they hold no tokens
  and return to the free list with :meth:`BlockManager.unreserve`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

NO_HASH = -1


class BlockSeq(Protocol):
    """What the block manager needs to know about a sequence (see ``scheduler.SeqState``)."""

    token_ids: list[int]
    num_prompt_tokens: int
    block_table: list[int]
    block_hashes: list[int]  # chained hashes of the leading full, computed blocks
    num_computed_tokens: int
    num_evicted: int  # slots a KV policy dropped: the sequence holds num_computed_tokens - num_evicted
    max_slots: int  # a sliding window's slot cap (0: none); see ring_slot
    ring_start: int  # the leading slots a sliding window never overwrites (attention sinks)
    num_slid: int  # tokens written over older ones so far
    lora_id: int  # the LoRA adapter it runs with (0: none); prefixes are cached per adapter
    packed_table: list[int]  # blocks holding its packed (quantized) KV chunks, in order
    num_packed: int  # tokens in those chunks (counted in num_evicted too)


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = NO_HASH
    token_ids: tuple[int, ...] = field(default=())
    pending_hash: int = NO_HASH  # the hash it will get once computed, while in flight


def chain_hash(prev_hash: int, tokens: tuple[int, ...] | list[int]) -> int:
    """Hash of a full block given the hash of the block before it (``NO_HASH`` for the first)."""
    return hash((prev_hash, *tokens))


def first_hash(lora_id: int) -> int:
    """The hash chained in front of a sequence's first block: prefixes computed under one LoRA adapter (or under
    none, ``lora_id == 0``) never match another's."""
    return NO_HASH if not lora_id else hash(("lora", lora_id))


def ring_slot(seq: BlockSeq) -> int | None:
    """The slot a sliding sequence's next generated token overwrites (the least recently written after its
    first ``ring_start``), once it holds ``max_slots``; None while it appends (its prompt is compacted)."""
    if (not seq.max_slots or seq.num_computed_tokens < seq.num_prompt_tokens
            or seq.num_computed_tokens - seq.num_evicted < seq.max_slots):
        return None
    return seq.ring_start + seq.num_slid % (seq.max_slots - seq.ring_start)


class BlockManager:
    """Allocates ``num_blocks`` blocks of ``block_size`` token slots to sequences."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in LRU order (oldest first). Values unused: an ordered set with O(1) removal.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.in_flight: dict[int, int] = {}  # hash -> block being computed that will hold it
        self.num_reserved = 0  # blocks lent out by reserve() (held, holding no tokens)
        # Counters for metrics.
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    # -- accounting ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence references (some may still hold reusable cached prefixes)."""
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def num_cached_free_blocks(self) -> int:
        return sum(1 for b in self.free if self.blocks[b].hash != NO_HASH)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def num_slots(seq: BlockSeq) -> int:
        """Slots the sequence's keys/values fill (its computed tokens less the evicted ones)."""
        return seq.num_computed_tokens - seq.num_evicted

    # -- allocation ---------------------------------------------------------------------------------
    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)  # least recently freed first
        b = self.blocks[block_id]
        assert b.ref_count == 0
        self._forget(b)  # its cached contents are about to be overwritten
        b.ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        b = self.blocks[block_id]
        assert b.ref_count > 0, f"block {block_id} freed twice"
        b.ref_count -= 1
        if b.ref_count == 0:
            self._land(b)  # freed before it was computed: nobody will compute it
            self.free[block_id] = None  # most recently freed: evicted last

    def _land(self, b: Block) -> None:
        """The block is no longer in flight (computed, or dropped)."""
        if b.pending_hash != NO_HASH:
            if self.in_flight.get(b.pending_hash) == b.block_id:
                del self.in_flight[b.pending_hash]
            b.pending_hash = NO_HASH

    def _mark_in_flight(self, seq: BlockSeq) -> None:
        """Register the sequence's allocated, full, not yet computed blocks as in flight."""
        if not self.enable_prefix_caching or seq.num_evicted:
            return
        bs = self.block_size
        full = min(len(seq.token_ids) // bs, len(seq.block_table))
        h = seq.block_hashes[-1] if seq.block_hashes else first_hash(seq.lora_id)
        for i in range(len(seq.block_hashes), full):
            h = chain_hash(h, seq.token_ids[i * bs:(i + 1) * bs])
            b = self.blocks[seq.block_table[i]]
            if b.hash == NO_HASH and b.pending_hash == NO_HASH:
                b.pending_hash = h
                self.in_flight.setdefault(h, b.block_id)

    def prefix_in_flight(self, token_ids: list[int], cached: list[int], lora_id: int = 0) -> bool:
        """Is the block after the ``cached`` prefix blocks (see :meth:`match_prefix`) being computed now?"""
        bs = self.block_size
        i = len(cached)
        if not self.in_flight or i >= (len(token_ids) - 1) // bs:
            return False
        prev = self.blocks[cached[-1]].hash if cached else first_hash(lora_id)
        return chain_hash(prev, token_ids[i * bs:(i + 1) * bs]) in self.in_flight

    def match_prefix(self, token_ids: list[int], lora_id: int = 0) -> list[int]:
        """Cached blocks holding a prefix of ``token_ids`` computed under LoRA adapter ``lora_id`` (no side effects).

        At most ``(len - 1) // block_size`` blocks: the last token is always recomputed because its
        logits are needed to sample the next one.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[int] = []
        h = first_hash(lora_id)
        for i in range((len(token_ids) - 1) // bs):
            toks = tuple(token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(h, toks)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != toks:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, cached: list[int], num_tokens: int) -> bool:
        """Can a new sequence reuse ``cached`` blocks and get enough blocks for ``num_tokens`` tokens?"""
        needed = self.blocks_for(num_tokens) - len(cached)
        reclaimed = sum(1 for b in cached if self.blocks[b].ref_count == 0)  # leave the free list
        return needed <= len(self.free) - reclaimed

    def allocate(self, seq: BlockSeq, cached: list[int], num_tokens: int) -> None:
        """Give a sequence with no blocks the ``cached`` prefix blocks plus fresh ones for ``num_tokens``."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        assert self.can_allocate(cached, num_tokens)
        self.prefix_queries += len(seq.token_ids)
        self.prefix_hits += len(cached) * self.block_size
        for block_id in cached:
            b = self.blocks[block_id]
            if b.ref_count == 0:
                del self.free[block_id]
            b.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(b.hash)
        seq.num_computed_tokens = len(cached) * self.block_size
        for _ in range(self.blocks_for(num_tokens) - len(cached)):
            seq.block_table.append(self._take_free())
        self._mark_in_flight(seq)

    def reserve(self, num: int) -> list[int] | None:
        """Take ``num`` free blocks out of the pool for memory held outside it (their contents unused), blocks
        holding no cached prefix first; None, taking nothing, when fewer than ``num`` are free."""
        if num > len(self.free):
            return None
        plain = [b for b in self.free if self.blocks[b].hash == NO_HASH][:num]
        cached = [b for b in self.free if self.blocks[b].hash != NO_HASH][:num - len(plain)]
        ids = []
        for block_id in (*plain, *cached):
            del self.free[block_id]
            b = self.blocks[block_id]
            self._forget(b)
            b.ref_count = 1
            ids.append(block_id)
        self.num_reserved += num
        return ids

    def unreserve(self, block_ids: list[int]) -> None:
        """Give blocks from :meth:`reserve` back to the pool."""
        for block_id in block_ids:
            self._release(block_id)
        self.num_reserved -= len(block_ids)

    def _cow_index(self, seq: BlockSeq) -> int | None:
        """The table index of a shared block the next write changes (copy it first), if any: the last block
        when it is partially filled, or the block of a sliding sequence's ring slot."""
        slot = ring_slot(seq)
        if slot is not None:
            i = slot // self.block_size
        elif seq.block_table and self.num_slots(seq) % self.block_size:
            i = len(seq.block_table) - 1
        else:
            return None
        return i if self.blocks[seq.block_table[i]].ref_count > 1 else None

    def _slots_after(self, seq: BlockSeq, num_new_tokens: int) -> int:
        n = self.num_slots(seq) + num_new_tokens
        return min(n, seq.max_slots) if seq.max_slots and seq.num_computed_tokens >= seq.num_prompt_tokens else n

    def num_new_blocks(self, seq: BlockSeq, num_new_tokens: int) -> int:
        total = self.blocks_for(self._slots_after(seq, num_new_tokens))
        return max(0, total - len(seq.block_table)) + (self._cow_index(seq) is not None)

    def can_append(self, seq: BlockSeq, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= len(self.free)

    def append_slots(self, seq: BlockSeq, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for ``num_new_tokens`` more tokens; returns ``(src, dst)`` block copies to perform."""
        assert self.can_append(seq, num_new_tokens)
        copies = []
        i = self._cow_index(seq)
        if i is not None:
            src = seq.block_table[i]
            dst = self._take_free()
            self._release(src)
            seq.block_table[i] = dst
            copies.append((src, dst))
        slot = ring_slot(seq)
        if slot is not None:  # its block's contents change: it no longer holds the tokens its hash names
            self._forget(self.blocks[seq.block_table[slot // self.block_size]])
        total = self.blocks_for(self._slots_after(seq, num_new_tokens))
        while len(seq.block_table) < total:
            seq.block_table.append(self._take_free())
        self._mark_in_flight(seq)
        return copies

    def fork(self, parent: BlockSeq, child: BlockSeq) -> None:
        """Let ``child`` share all of ``parent``'s blocks (copy-on-write for the partial last one)."""
        assert not child.block_table
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_evicted = parent.num_evicted
        child.num_slid = parent.num_slid
        for block_id in parent.packed_table:
            self.blocks[block_id].ref_count += 1
        child.packed_table = list(parent.packed_table)
        child.num_packed = parent.num_packed

    def compact(self, seq: BlockSeq, num_slots: int, reserve: int = 0) -> list[int]:
        """After a KV policy kept ``num_slots`` of the sequence's slots: its new block table (``blocks_for(num_slots)``
        blocks) and ``num_evicted`` set; the caller copies the kept slots from the old table into it before the
        next forward pass. Shared leading blocks are replaced by fresh ones, own ones reused (and forgotten
        by the prefix cache: they are about to hold other contents), trailing ones released first (their
        contents stay intact until reallocated, so a released block may serve as a fresh one: the caller
        reads every kept slot before writing any). ``reserve``: free blocks to leave for the caller (no cached
        prefix is copied into them).
        """
        old = seq.block_table
        n = self.blocks_for(num_slots)
        assert 0 < num_slots <= self.num_slots(seq) and n <= len(old)
        for block_id in reversed(old[n:]):
            self._release(block_id)
        table, replaced = [], []
        spare = len(self.free) - sum(1 for b in old[:n] if self.blocks[b].ref_count > 1) - reserve
        assert spare >= 0, "can_compact() was not checked"
        for block_id in old[:n]:
            b = self.blocks[block_id]
            keep_cached = b.hash != NO_HASH and spare > 0
            if b.ref_count > 1 or keep_cached:
                replaced.append(block_id)  # shared, or a cached prefix worth keeping: never written
                spare -= b.ref_count == 1
                block_id = self._take_free()
            else:
                self._forget(b)
            table.append(block_id)
        for block_id in reversed(replaced):  # after taking the fresh blocks, so none of them is taken back
            self._release(block_id)
        seq.block_table = table
        seq.block_hashes = []
        seq.num_evicted = seq.num_computed_tokens - num_slots
        return table

    def can_compact(self, seq: BlockSeq, num_slots: int, reserve: int = 0) -> bool:
        """Are there free blocks for the shared leading blocks that :meth:`compact` must replace (and ``reserve``
        more)?"""
        n = self.blocks_for(num_slots)
        shared = sum(1 for b in seq.block_table[:n] if self.blocks[b].ref_count > 1)
        released = sum(1 for b in seq.block_table[n:] if self.blocks[b].ref_count == 1)
        return shared + reserve <= len(self.free) + released

    def take_packed(self, seq: BlockSeq, num: int) -> list[int]:
        """``num`` free blocks appended to the sequence's packed table (see :meth:`compact`'s ``reserve``)."""
        assert num <= len(self.free)
        ids = [self._take_free() for _ in range(num)]
        seq.packed_table.extend(ids)
        return ids

    def _forget(self, b: Block) -> None:
        """Drop a block from the prefix cache (its contents are about to change)."""
        if b.hash != NO_HASH and self.hash_to_block.get(b.hash) == b.block_id:
            del self.hash_to_block[b.hash]
        b.hash, b.token_ids = NO_HASH, ()
        self._land(b)

    def commit(self, seq: BlockSeq) -> None:
        """Register the hashes of blocks that became full and computed (call after each forward)."""
        if seq.num_evicted or (seq.max_slots and seq.num_computed_tokens > seq.num_prompt_tokens):
            return  # compacted, or evicting while it decodes: its blocks no longer hold the token ranges hashes name
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            toks = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else first_hash(seq.lora_id), toks)
            seq.block_hashes.append(h)
            if self.enable_prefix_caching:
                b = self.blocks[seq.block_table[i]]
                self._land(b)
                if b.hash == NO_HASH:
                    b.hash, b.token_ids = h, toks
                    self.hash_to_block.setdefault(h, b.block_id)

    def free_seq(self, seq: BlockSeq) -> None:
        """Drop the sequence's references (blocks that reach zero join the free list)."""
        for block_id in reversed(seq.block_table):  # the tail is freed first, so it is evicted first
            self._release(block_id)
        for block_id in reversed(seq.packed_table):
            self._release(block_id)
        seq.packed_table = []
        seq.num_packed = 0
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.num_evicted = 0
        seq.num_slid = 0

    def check(self) -> None:
        """Assert internal invariants (tests)."""
        for b in self.blocks:
            assert b.ref_count >= 0
            assert (b.ref_count == 0) == (b.block_id in self.free), b
        for h, block_id in self.hash_to_block.items():
            assert self.blocks[block_id].hash == h
        for h, block_id in self.in_flight.items():
            b = self.blocks[block_id]
            assert b.pending_hash == h and b.ref_count > 0 and b.hash == NO_HASH, b
