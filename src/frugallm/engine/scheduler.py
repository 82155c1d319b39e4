"""Iteration-level scheduling: which sequences run in the next forward pass, and with how many tokens.

Plain Python (no torch). Every step the engine calls :meth:`Scheduler.schedule`, runs the model on the
returned batch, then :meth:`Scheduler.postprocess`. Requests join and leave between steps (continuous
batching).

A sequence is described by how many of its tokens have keys/values in the cache
(``num_computed_tokens``); a step computes the next ``num_new`` of them. Prefill and decode are the same
thing seen this way: a decode is a step with one new token, a chunk of a long prompt is a step with
``num_new < remaining``. Only a step that reaches the last token produces logits to sample.

Policies:

* **Chunked prefill on** (default): running sequences first (decodes, or the next chunk of a prompt),
  then waiting ones in arrival order, until ``max_num_batched_tokens`` or ``max_num_seqs`` is reached; a
  prompt longer than a whole step's budget takes what is left of it, so running decodes are never
  starved. A prompt that would fit a whole step waits for the next one rather than being split: that split
  bounds no step's time and costs an extra pass and gather (numbers in docs/benchmarks.md).
* **Chunked prefill off**: a step either prefills whole prompts (priority, so time to first token is
  low, but running decodes pause) or decodes every running sequence. A prompt longer than the budget
  runs alone.
* **Shared prompts in flight**: a waiting sequence whose next prefix block is being computed by a
  running one (two identical prompts arriving together) is passed over for this step; in the next one
  that block is cached and it reuses it instead of computing the same tokens twice.
* **KV eviction at prefill**: a sequence with a KV policy (``kv_policy``, an evictor that ``pages``) stops
  a step at the end of its prompt, where the engine compacts its cache (see ``BlockManager.compact``), and
  the step that ends the prompt computes at least the prompt queries the policy reads
  (``prefill_queries``): chunks are cut so, and prefix-cache hits are capped so. After a preemption it
  recomputes its prompt, is compacted again, then computes its generated tokens (the same cache as before;
  one per step with a sliding window, each overwriting the slot it overwrote the first time).
* **One long compressible prefill at a time**: a prompt that a KV policy will shrink (an evictor compacts it when
  it ends, KIVI packs it right after) and that needs several passes is admitted only when no other such prompt is
  still prefilling and the free blocks hold its whole prompt. Its prompt holds all its blocks until it shrinks, so
  two at once would bind the pool long before the compressed sequences do, and one admitted into too few blocks
  would preempt decoding sequences (or itself) half-way.
* **Preemption by recompute**: when a running sequence needs a block and none is free, the most recently
  admitted sequence loses its blocks and returns to the front of the queue; it later prefills its prompt
  plus what it generated so far (prefix caching usually makes that cheap).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from frugallm.engine.block_manager import BlockManager


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass(eq=False)
class SeqState:
    """The scheduler's view of one sequence: its tokens, blocks and progress.

    ``token_ids`` is the prompt followed by the generated tokens. ``num_forks`` more sequences will be
    forked from this one (sharing its prompt blocks) when its prompt is computed (``n > 1``). The engine
    schedules its :class:`~frugallm.engine.sequence.Sequence`, a subclass; tests use this class alone.
    """

    token_ids: list[int]
    num_prompt_tokens: int = -1
    num_forks: int = 0
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the last admission
    num_preemptions: int = 0
    num_evicted: int = 0  # slots its KV policy dropped: its cache holds num_computed_tokens - num_evicted
    kv_policy: Any = None  # a kv.Evictor the paged engine runs at the end of the prompt; None: the full cache
    max_slots: int = 0  # sliding window (kv_policy slides): slots it holds at most, then writes over its oldest
    ring_start: int = 0  # its leading slots never written over (attention sinks)
    num_slid: int = 0  # tokens written over older ones
    kv_quant: Any = None  # kv.kivi.PagedKIVI: its oldest exact slots are packed into the pool (packed_kv.py)
    packed_table: list[int] = field(default_factory=list)  # blocks holding its packed KV chunks
    num_packed: int = 0  # tokens packed there (counted in num_evicted too)
    kv_stats: Any = None  # a scoring decode policy's per-layer slot statistics (H2O), set when its prompt is compacted
    lora: Any = None  # the LoRA adapter it runs with (a lora.LoraRequest); None: the base model

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def lora_id(self) -> int:
        return 0 if self.lora is None else self.lora.lora_id

    @property
    def needs_prompt_logits(self) -> bool:
        """True while every prompt position's logits are wanted: its prefix is then computed, not cached."""
        return False

    @property
    def num_remaining(self) -> int:
        """Tokens still to compute before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed_tokens


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    enable_chunked_prefill: bool = True
    max_loras: int = 0  # distinct LoRA adapters among running sequences (0: no limit)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so that every running sequence can decode in each step"
            )


@dataclass
class SchedulerOutput:
    """One step: ``seqs[i]`` computes its tokens ``[num_computed, num_computed + num_new[i])``."""

    seqs: list[SeqState] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) blocks, before the forward
    preempted: list[SeqState] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def __bool__(self) -> bool:
        return bool(self.seqs)

    def samples(self, i: int) -> bool:
        """Does ``seqs[i]`` reach its last token this step (so its logits are sampled)?"""
        return self.seqs[i].num_computed_tokens + self.num_new[i] == self.seqs[i].num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.bm = block_manager
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []
        self.num_preemptions = 0

    # -- queues -------------------------------------------------------------------------------------
    def add(self, seq: SeqState, first: bool = False) -> None:
        """Queue ``seq``; ``first``: ahead of the others, as a preempted sequence (its stream is running)."""
        seq.status = SeqStatus.WAITING
        if first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: SeqState) -> None:
        """Remove a sequence (finished or aborted) and free its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        if seq.block_table:
            self.bm.free_seq(seq)
        seq.status = SeqStatus.FINISHED

    def fork(self, parent: SeqState, child: SeqState) -> None:
        """Start ``child`` (same tokens as ``parent``) sharing ``parent``'s blocks, right after it."""
        assert parent.status is SeqStatus.RUNNING and child.token_ids == parent.token_ids
        self.bm.fork(parent, child)
        child.num_cached_tokens = parent.num_cached_tokens
        child.status = SeqStatus.RUNNING
        self.running.insert(self.running.index(parent) + 1, child)

    def _preempt(self, seq: SeqState, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _limit(self, seq: SeqState, num_new: int, computed: int) -> int:
        """``num_new`` tokens after ``computed`` ones, cut so that a sequence with a KV policy stops at the end of
        its prompt, whose pass computes at least the queries the policy reads; 0: not this step."""
        end = seq.num_prompt_tokens
        if seq.kv_policy is None:
            return num_new
        if computed >= end:  # a sliding window overwrites a slot per token: one per pass
            return min(num_new, 1) if seq.max_slots else num_new
        left = end - computed
        if num_new >= left:
            return left
        return max(0, min(num_new, left - seq.kv_policy.prefill_queries(end)))

    def _max_cached(self, seq: SeqState) -> int:
        """Prefix-cache blocks a sequence may reuse: with a KV policy, those before the queries it reads."""
        if seq.kv_policy is None:
            return len(seq.token_ids)
        end = seq.num_prompt_tokens
        return (end - seq.kv_policy.prefill_queries(end)) // self.bm.block_size

    @staticmethod
    def _shrinks(seq: SeqState) -> bool:
        """Will a KV policy shrink its blocks once its prompt is computed (evict at its end, or pack it)?"""
        return seq.kv_policy is not None or seq.kv_quant is not None

    def _long_prefill_waits(self, seq: SeqState, cached: list[int]) -> bool:
        """Must this compressible prompt of several passes wait (see the module docstring)?"""
        computed = len(cached) * self.bm.block_size
        if not self._shrinks(seq) or seq.num_tokens - computed <= self.config.max_num_batched_tokens:
            return False
        if any(self._shrinks(s) and s.num_computed_tokens < s.num_prompt_tokens for s in self.running):
            return True
        return not self.bm.can_allocate(cached, seq.num_tokens)

    def _num_seqs_after(self, seq: SeqState) -> int:
        return len(self.running) + 1 + seq.num_forks

    def _lora_fits(self, seq: SeqState) -> bool:
        """May ``seq`` join the running sequences without their LoRA adapters exceeding ``max_loras``?"""
        if not seq.lora_id or not self.config.max_loras:
            return True
        running = {s.lora_id for s in self.running} - {0}
        return seq.lora_id in running or len(running) < self.config.max_loras

    # -- the step -----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.config.enable_chunked_prefill:
            budget = self._schedule_running(out, self.config.max_num_batched_tokens)
            if not out.preempted:
                self._schedule_waiting(out, budget)
        else:
            self._schedule_waiting(out, self.config.max_num_batched_tokens)
            if not out.seqs:
                self._schedule_running(out, self.config.max_num_batched_tokens)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        chunked = self.config.enable_chunked_prefill
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_remaining, budget) if chunked else seq.num_remaining
            num_new = self._limit(seq, num_new, seq.num_computed_tokens)
            if not num_new:  # the pass that ends its prompt needs more of this step's budget
                i += 1
                continue
            if not chunked and out.seqs and num_new > budget:
                i += 1
                continue
            while not self.bm.can_append(seq, num_new):
                victim = self.running[-1]  # the most recently admitted; never one already scheduled
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.copies += self.bm.append_slots(seq, num_new)
                out.seqs.append(seq)
                out.num_new.append(num_new)
                budget -= num_new
                i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        chunked = self.config.enable_chunked_prefill
        i = 0
        while i < len(self.waiting) and budget > 0:
            seq = self.waiting[i]
            if self._num_seqs_after(seq) > self.config.max_num_seqs:
                break
            if not self._lora_fits(seq):
                i += 1  # a new adapter would exceed max_loras in the batch: wait for a slot, keep scanning
                continue
            cached = [] if seq.needs_prompt_logits else self.bm.match_prefix(seq.token_ids, seq.lora_id)
            cached = cached[:self._max_cached(seq)]
            if self.bm.prefix_in_flight(seq.token_ids, cached, seq.lora_id):
                i += 1  # a running sequence is computing its next prefix block: share it from the next step
                continue
            if self._long_prefill_waits(seq, cached):
                break
            computed = len(cached) * self.bm.block_size
            remaining = self._limit(seq, seq.num_tokens - computed, computed)
            if chunked:
                if out.seqs and budget < remaining <= self.config.max_num_batched_tokens:
                    # It fits a whole step: splitting it would only add a pass (and a gather) for its tail
                    # without bounding any step's time; admit it whole next step (arrival order kept).
                    break
                num_new = self._limit(seq, min(remaining, budget), computed)
                if not num_new:
                    break
            elif remaining <= budget or not out.seqs:
                num_new = remaining  # a prompt over the budget runs alone
            else:
                break
            total = len(cached) * self.bm.block_size + num_new
            if not self.bm.can_allocate(cached, total):
                break
            del self.waiting[i]
            self.bm.allocate(seq, cached, total)
            seq.num_cached_tokens = len(cached) * self.bm.block_size
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new.append(num_new)
            budget -= num_new

    def postprocess(self, out: SchedulerOutput) -> None:
        """Record the step's progress (call after the forward pass, before appending sampled tokens)."""
        for seq, n in zip(out.seqs, out.num_new, strict=True):
            seq.num_computed_tokens += n
            over = self.bm.num_slots(seq) - seq.max_slots
            if seq.max_slots and over > 0 and seq.num_computed_tokens > seq.num_prompt_tokens:
                seq.num_evicted += over  # the new token went over its oldest slot (the prompt's excess is compacted)
                seq.num_slid += over
            self.bm.commit(seq)
