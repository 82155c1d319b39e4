"""BlockManager and Scheduler alone: plain Python, no model, no torch."""

from __future__ import annotations

import ast
import random
from pathlib import Path
from typing import Any

import pytest

from frugallm.engine.block_manager import NO_HASH, BlockManager, chain_hash
from frugallm.engine.scheduler import Scheduler, SchedulerConfig, SeqState, SeqStatus

ENGINE = Path(__file__).resolve().parents[2] / "src" / "frugallm" / "engine"


@pytest.mark.parametrize("module", ["block_manager.py", "scheduler.py"])
def test_no_torch_import(module: str) -> None:
    tree = ast.parse((ENGINE / module).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    torch_free = {"frugallm.engine.block_manager"}  # the only engine module these two may import
    assert not [m for m in imported if m.split(".")[0] == "torch" or (m.startswith("frugallm.engine")
                                                                       and m not in torch_free)]


def seq(n: int, start: int = 100) -> SeqState:
    return SeqState(list(range(start, start + n)))


# -- block manager ------------------------------------------------------------------------------------
def test_allocate_and_free_accounting() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    s = seq(9)
    assert bm.can_allocate([], 9)
    bm.allocate(s, [], 9)
    assert len(s.block_table) == 3 and bm.num_used_blocks == 3 and bm.num_free_blocks == 7
    s.num_computed_tokens = 9
    assert bm.num_new_blocks(s, 3) == 0  # slots 9..11 fit in block 3
    assert bm.num_new_blocks(s, 4) == 1
    assert bm.append_slots(s, 4) == []
    assert len(s.block_table) == 4
    bm.free_seq(s)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 10
    assert s.block_table == [] and s.num_computed_tokens == 0
    bm.check()


def test_cannot_allocate_beyond_pool() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    assert bm.can_allocate([], 8)
    assert not bm.can_allocate([], 9)
    a = seq(8)
    bm.allocate(a, [], 8)
    assert not bm.can_allocate([], 1)
    a.num_computed_tokens = 8
    assert not bm.can_append(a, 1)


def test_prefix_cache_hit_reuses_blocks_and_refcounts() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(10)
    bm.allocate(a, bm.match_prefix(a.token_ids), 10)
    assert bm.match_prefix(a.token_ids) == []  # nothing is registered before it is computed
    a.num_computed_tokens = 10
    bm.commit(a)
    assert len(a.block_hashes) == 2  # two full blocks; the partial third is not cached
    assert a.block_hashes[1] == chain_hash(chain_hash(NO_HASH, (100, 101, 102, 103)), (104, 105, 106, 107))

    b = SeqState(a.token_ids[:8] + [7, 7, 7])  # same first two blocks, different tail
    hits = bm.match_prefix(b.token_ids)
    assert hits == a.block_table[:2]
    used = bm.num_used_blocks
    bm.allocate(b, hits, len(b.token_ids))
    assert b.num_computed_tokens == 8
    assert bm.num_used_blocks == used + 1  # only the tail block is new
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.free_seq(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    bm.check()


def test_in_flight_blocks_are_announced_until_computed_or_freed() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(10)
    bm.allocate(a, [], 10)
    b = SeqState(list(a.token_ids))
    assert bm.match_prefix(b.token_ids) == [] and bm.prefix_in_flight(b.token_ids, [])  # a computes it
    assert not bm.prefix_in_flight([7] * 10, [])
    bm.check()
    a.num_computed_tokens = 10
    bm.commit(a)  # computed: cached now, no longer in flight
    assert not bm.in_flight and bm.match_prefix(b.token_ids) == a.block_table[:2]
    c = seq(9, start=500)
    bm.allocate(c, [], 9)
    assert bm.prefix_in_flight(list(c.token_ids), [])
    bm.free_seq(c)  # dropped before it was computed: nobody is computing it any more
    assert not bm.in_flight
    bm.check()


def test_prefix_cache_survives_free_until_reused() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(9)
    bm.allocate(a, [], 9)
    a.num_computed_tokens = 9
    bm.commit(a)
    table = list(a.block_table)
    bm.free_seq(a)
    assert bm.num_used_blocks == 0
    # A later identical prompt still hits (blocks are free but keep their contents and hashes).
    b = seq(9)
    assert bm.match_prefix(b.token_ids) == table[:2]
    # Evicting: allocating every block for something else forgets the cached prefix.
    c = seq(16, start=500)
    bm.allocate(c, [], 16)
    assert bm.match_prefix(b.token_ids) == []
    bm.check()


def test_prefix_hash_is_chained_and_verified() -> None:
    bm = BlockManager(num_blocks=16, block_size=2)
    a = SeqState([1, 2, 3, 4, 5])
    bm.allocate(a, [], 5)
    a.num_computed_tokens = 5
    bm.commit(a)
    assert bm.match_prefix([1, 2, 3, 4, 9]) == a.block_table[:2]
    assert bm.match_prefix([9, 9, 3, 4, 5]) == []  # same second block, different first: chain differs
    # The last token is always recomputed (its logits are needed), so a full-length hit is cut short.
    assert bm.match_prefix([1, 2, 3, 4]) == a.block_table[:1]
    # A forged hash collision is caught by comparing the tokens.
    h = chain_hash(NO_HASH, (7, 7))
    bm.hash_to_block[h] = a.block_table[0]
    bm.blocks[a.block_table[0]].hash = h
    assert bm.match_prefix([7, 7, 1]) == []


def test_no_prefix_caching() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = SeqState([1, 2, 3, 4, 5])
    bm.allocate(a, [], 5)
    a.num_computed_tokens = 5
    bm.commit(a)
    assert bm.match_prefix([1, 2, 3, 4, 5]) == [] and not bm.hash_to_block


def test_fork_shares_blocks_and_copy_on_write() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    parent = seq(6)
    bm.allocate(parent, [], 6)
    parent.num_computed_tokens = 6
    bm.commit(parent)
    child = SeqState(list(parent.token_ids))
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert [bm.blocks[i].ref_count for i in parent.block_table] == [2, 2]
    used = bm.num_used_blocks
    # Both append a token. The shared partial block (slot 6 of block 1) must be copied first.
    assert bm.num_new_blocks(parent, 1) == 1
    copies = bm.append_slots(parent, 1)
    shared_full, old_partial = child.block_table
    assert copies == [(old_partial, parent.block_table[1])]
    assert parent.block_table[0] == shared_full and parent.block_table[1] != old_partial
    assert bm.num_used_blocks == used + 1
    # The child is now the only owner of the old partial block: it writes in place.
    assert bm.append_slots(child, 1) == []
    assert [bm.blocks[i].ref_count for i in child.block_table] == [2, 1]
    # A full shared block is never copied: appending past it takes a fresh block.
    parent.num_computed_tokens = child.num_computed_tokens = 8
    assert bm.append_slots(parent, 1) == []
    bm.free_seq(parent)
    bm.free_seq(child)
    assert bm.num_used_blocks == 0
    bm.check()


def test_block_manager_random_ops_keep_invariants() -> None:
    rng = random.Random(0)
    bm = BlockManager(num_blocks=24, block_size=4)
    live: list[SeqState] = []
    vocab = [1, 2, 3]  # tiny vocabulary: many shared prefixes
    for _ in range(2000):
        op = rng.random()
        if op < 0.3:
            s = SeqState([rng.choice(vocab) for _ in range(rng.randint(1, 20))])
            hits = bm.match_prefix(s.token_ids)
            if bm.can_allocate(hits, s.num_tokens):
                bm.allocate(s, hits, s.num_tokens)
                s.num_computed_tokens = s.num_tokens
                bm.commit(s)
                live.append(s)
        elif op < 0.6 and live:
            s = rng.choice(live)
            s.token_ids.append(rng.choice(vocab))
            if bm.can_append(s, 1):
                bm.append_slots(s, 1)
                s.num_computed_tokens += 1
                bm.commit(s)
            else:
                s.token_ids.pop()
        elif op < 0.7 and live:
            p = rng.choice(live)
            c = SeqState(list(p.token_ids))
            bm.fork(p, c)
            live.append(c)
        elif live:
            s = live.pop(rng.randrange(len(live)))
            bm.free_seq(s)
        bm.check()
        refs = [0] * bm.num_blocks
        for s in live:
            assert len(s.block_table) == -(-s.num_computed_tokens // 4)
            for b in s.block_table:
                refs[b] += 1
        assert refs == [b.ref_count for b in bm.blocks]
    for s in live:
        bm.free_seq(s)
    assert bm.num_used_blocks == 0


# -- scheduler ----------------------------------------------------------------------------------------
def make(num_blocks: int = 64, block_size: int = 4, **cfg: Any) -> Scheduler:
    cfg.setdefault("max_num_seqs", min(16, cfg.get("max_num_batched_tokens", 512)))
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size))


def run_step(sch: Scheduler, sampled_token: int = 1) -> list[tuple[int, int]]:
    """Schedule, 'run' (nothing to compute) and append a token to every sequence that samples."""
    out = sch.schedule()
    samples = [out.samples(i) for i in range(len(out.seqs))]
    sch.postprocess(out)
    for s, smp in zip(out.seqs, samples, strict=True):
        if smp:
            s.token_ids.append(sampled_token)
    return [(s.seq_id, n) for s, n in zip(out.seqs, out.num_new, strict=True)]


def test_chunked_prefill_respects_token_budget_and_decodes_first() -> None:
    sch = make(max_num_batched_tokens=8)
    a, b = seq(3), seq(20, start=300)
    sch.add(a)
    sch.add(b)
    assert run_step(sch) == [(a.seq_id, 3), (b.seq_id, 5)]  # b's prompt is chunked into the rest
    assert a.num_tokens == 4 and b.num_tokens == 20  # a sampled; b did not reach its end
    assert run_step(sch) == [(a.seq_id, 1), (b.seq_id, 7)]  # the decode goes first, b takes the rest
    assert run_step(sch) == [(a.seq_id, 1), (b.seq_id, 7)]
    assert run_step(sch) == [(a.seq_id, 1), (b.seq_id, 1)]  # b's prompt finished (5+7+7+1 = 20)
    assert b.num_tokens == 21


def test_chunked_prefill_does_not_split_a_prompt_that_fits_a_step() -> None:
    sch = make(max_num_batched_tokens=8)
    a, b, c = seq(3), seq(6, start=300), seq(20, start=500)
    for s in (a, b, c):
        sch.add(s)
    assert run_step(sch) == [(a.seq_id, 3)]  # b (6 tokens) fits a whole step: it waits rather than split 3+3
    # c is longer than any step: chunked into whatever is left of each step's budget
    assert run_step(sch) == [(a.seq_id, 1), (b.seq_id, 6), (c.seq_id, 1)]
    assert run_step(sch) == [(a.seq_id, 1), (b.seq_id, 1), (c.seq_id, 6)]


def test_no_chunked_prefill_runs_whole_prompts_first() -> None:
    sch = make(max_num_batched_tokens=8, enable_chunked_prefill=False)
    a, b, c = seq(3), seq(20, start=300), seq(4, start=500)
    for s in (a, b, c):
        sch.add(s)
    assert run_step(sch) == [(a.seq_id, 3)]  # b does not fit next to a; it will not be split
    assert run_step(sch) == [(b.seq_id, 20)]  # over the budget: runs alone
    assert run_step(sch) == [(c.seq_id, 4)]
    assert run_step(sch) == [(a.seq_id, 1), (b.seq_id, 1), (c.seq_id, 1)]  # then decodes


def test_max_num_seqs() -> None:
    sch = make(max_num_seqs=2)
    seqs = [seq(3, start=100 * i) for i in range(3)]
    for s in seqs:
        sch.add(s)
    assert [i for i, _ in run_step(sch)] == [seqs[0].seq_id, seqs[1].seq_id]
    assert len(sch.waiting) == 1
    sch.finish(seqs[0])
    assert [i for i, _ in run_step(sch)] == [seqs[1].seq_id, seqs[2].seq_id]


def test_forks_count_against_max_num_seqs() -> None:
    sch = make(max_num_seqs=3)
    a = seq(3)
    b = SeqState(list(range(50, 53)), num_forks=2)  # n = 3
    sch.add(a)
    sch.add(b)
    run_step(sch)
    assert sch.running == [a] and sch.waiting[0] is b


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    sch = make(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    a, b = seq(7), seq(7, start=300)
    sch.add(a)
    sch.add(b)
    run_step(sch)  # both prompts: 2 blocks each, pool full
    assert sch.bm.num_free_blocks == 0
    run_step(sch)  # token 8 of each fits in block 2
    assert a.num_tokens == b.num_tokens == 9
    out = sch.schedule()  # token 9 needs a third block for each: b (admitted last) is preempted
    assert out.seqs == [a] and out.preempted == [b]
    assert b.status is SeqStatus.WAITING and sch.waiting[0] is b and b.block_table == []
    assert b.num_computed_tokens == 0 and b.num_tokens == 9  # it keeps its generated tokens
    sch.postprocess(out)
    a.token_ids.append(1)
    sch.finish(a)
    # b is recomputed: its prompt plus generated tokens, then it samples again. Its first block is
    # still cached; its second was freed first (tails are evicted first) and went to a.
    out = sch.schedule()
    assert out.seqs == [b] and out.num_new == [9 - 4] and b.num_cached_tokens == 4
    assert out.samples(0)
    assert sch.num_preemptions == 1


def test_victim_is_the_last_admitted_sequence() -> None:
    sch = make(num_blocks=3, block_size=2, max_num_batched_tokens=64)
    a, b = seq(2), seq(2, start=300)
    sch.add(a)
    sch.add(b)
    run_step(sch)  # one block each, one free
    out = sch.schedule()  # both need a second block: a (first admitted) gets it, b is preempted
    assert out.seqs == [a] and out.preempted == [b]


def test_abort_frees_everything() -> None:
    sch = make(num_blocks=8, block_size=4, max_num_batched_tokens=4)
    a, b = seq(10), seq(3, start=300)
    sch.add(a)
    sch.add(b)
    run_step(sch)  # a is mid-prefill, b waiting
    assert a.status is SeqStatus.RUNNING and b.status is SeqStatus.WAITING
    sch.finish(a)
    sch.finish(b)
    assert not sch.has_unfinished() and sch.bm.num_used_blocks == 0


def test_fork_in_scheduler() -> None:
    sch = make()
    p = SeqState([1, 2, 3, 4, 5], num_forks=1)
    sch.add(p)
    out = sch.schedule()
    sch.postprocess(out)
    c = SeqState([1, 2, 3, 4, 5])
    sch.fork(p, c)
    assert sch.running == [p, c] and c.num_computed_tokens == 5 and c.block_table == p.block_table
    p.token_ids.append(9)
    c.token_ids.append(8)
    out = sch.schedule()
    assert out.seqs == [p, c] and len(out.copies) == 1  # p copies the shared partial block


def test_identical_prompts_arriving_together_share_blocks() -> None:
    sch = make(block_size=4)
    a, b, c = seq(10), seq(10), seq(6, start=300)
    for s in (a, b, c):
        sch.add(s)
    assert run_step(sch) == [(a.seq_id, 10), (c.seq_id, 6)]  # b waits for the blocks a is computing
    assert run_step(sch) == [(a.seq_id, 1), (c.seq_id, 1), (b.seq_id, 2)]  # then reuses them
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    sch.bm.check()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4)
