"""BlockManager.compact and the scheduler's KV-policy cuts, alone (plain Python, no model)."""

from __future__ import annotations

from dataclasses import dataclass

from frugallm.engine.block_manager import NO_HASH, BlockManager
from frugallm.engine.scheduler import Scheduler, SchedulerConfig, SeqState


@dataclass(frozen=True)
class Window:
    """A stand-in paging evictor: reads the prompt's last ``window`` queries."""

    window: int

    def prefill_queries(self, n_tokens: int) -> int:
        return min(self.window, n_tokens)


def computed(bm: BlockManager, n: int, start: int = 100) -> SeqState:
    """A sequence whose ``n`` prompt tokens are computed (full blocks registered in the prefix cache)."""
    s = SeqState(list(range(start, start + n)))
    bm.allocate(s, bm.match_prefix(s.token_ids), n)
    s.num_computed_tokens = n
    bm.commit(s)
    return s


def test_compact_frees_the_tail_and_keeps_cached_prompt_blocks() -> None:
    bm = BlockManager(num_blocks=20, block_size=4)
    s = computed(bm, 22)  # 6 blocks
    old = list(s.block_table)
    table = bm.compact(s, 7)  # 2 blocks kept
    bm.check()
    assert len(table) == 2 and bm.num_used_blocks == 2
    assert s.num_evicted == 15 and bm.num_slots(s) == 7 and s.block_hashes == []
    # Free blocks were there: the kept slots went to fresh blocks; the old prompt blocks keep their hashes.
    assert not set(table) & set(old)
    assert all(bm.blocks[b].hash != NO_HASH for b in old[:5])
    again = SeqState(list(range(100, 122)))
    assert bm.match_prefix(again.token_ids) == old[:5]
    # A compacted sequence registers nothing more, and appends after its kept slots.
    s.token_ids += [1, 2]
    bm.append_slots(s, 1)
    s.num_computed_tokens += 1
    bm.commit(s)
    assert len(s.block_table) == 2 and s.block_hashes == []
    bm.free_seq(s)
    assert s.num_evicted == 0 and bm.num_used_blocks == 0
    bm.check()


def test_compact_never_writes_a_shared_block() -> None:
    bm = BlockManager(num_blocks=9, block_size=4)
    a = computed(bm, 16)  # 4 blocks, registered
    b = computed(bm, 20)  # shares a's 4 blocks (prefix hit), 1 own block
    assert b.block_table[:4] == a.block_table
    assert bm.can_compact(b, 8)
    table = bm.compact(b, 8)
    bm.check()
    assert not set(table) & set(a.block_table)  # copy-on-write: fresh blocks for the shared ones
    assert all(bm.blocks[x].ref_count == 1 for x in a.block_table)
    assert bm.match_prefix(list(range(100, 117))) == a.block_table  # a's blocks still serve the prefix


def test_compact_into_released_tail_blocks_keeps_the_leading_ones_cached() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    s = computed(bm, 16)
    old = list(s.block_table)
    table = bm.compact(s, 6)
    bm.check()
    assert sorted(table) == sorted(old[2:])  # the pool was full: the released tail blocks hold the kept slots
    assert bm.match_prefix(list(range(100, 109))) == old[:2]  # the prompt's first blocks still serve as a prefix


def test_compact_in_place_when_no_block_is_free() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    s = computed(bm, 16)
    old = list(s.block_table)
    table = bm.compact(s, 13)  # still 4 blocks: nothing released, nothing free
    bm.check()
    assert table == old  # written in place ...
    assert all(bm.blocks[x].hash == NO_HASH for x in table)  # ... and forgotten by the prefix cache first
    assert bm.match_prefix(list(range(100, 117))) == []


def test_can_compact_needs_a_free_block_per_shared_one() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = computed(bm, 8)
    b = computed(bm, 12)  # shares 2 blocks, holds 1 own: the pool has 1 free block
    assert bm.num_free_blocks == 1
    assert bm.can_compact(b, 8)  # 2 shared blocks: 1 free + its released own block
    c = computed(bm, 4, start=500)  # takes the last free block
    assert not bm.can_compact(b, 8) and bm.can_compact(b, 4)  # 1 shared block: its released own one
    assert a.block_table and c.block_table


def test_scheduler_stops_at_the_prompt_end_with_the_policy_window() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16), bm)
    s = SeqState(list(range(100, 120)))  # 20 prompt tokens, chunks of 16 at most
    s.kv_policy = Window(8)
    sched.add(s)
    sizes = []
    while s.num_computed_tokens < 20:
        out = sched.schedule()
        sizes.append(out.num_new[0])
        sched.postprocess(out)
    assert sizes == [12, 8]  # 16 would leave 4: the pass ending the prompt computes the 8 queries it reads


def test_scheduler_caps_prefix_hits_before_the_policy_window() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    computed(bm, 40)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), bm)
    s = SeqState(list(range(100, 140)))
    s.kv_policy = Window(10)
    sched.add(s)
    out = sched.schedule()
    assert s.num_cached_tokens == 28 and out.num_new == [12]  # (40 - 10) // 4 = 7 blocks reused


def test_scheduler_stops_a_recompute_at_the_prompt_end() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), bm)
    s = SeqState(list(range(100, 120)) + [1, 2, 3], num_prompt_tokens=20)  # preempted after 3 tokens
    s.kv_policy = Window(4)
    sched.add(s)
    out = sched.schedule()
    assert out.num_new == [20] and not out.samples(0)
    sched.postprocess(out)
    out = sched.schedule()
    assert out.num_new == [3] and out.samples(0)
