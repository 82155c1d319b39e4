"""``SoloSpec``: speculative decoding in the server while it is nearly idle (``serve --spec``).

Speculation pays at batch 1 and loses at batch 8-32 (vLLM's and llama.cpp's users report the reversal): a verify
pass of ``k + 1`` rows costs about what a batched step of ``k + 1`` sequences costs, and a busy batch already fills
those rows with real tokens. So the server speculates only when it holds at most ``max_batch`` sequences:

* a request that arrives while the paged engine has nothing to do (``n = 1``, no adapter, no structured output,
  no prompt logprobs, a request ``SpecDecoder`` serves exactly) runs *solo*, on the LLM's single-sequence path
  (``LLM._run``: contiguous cache, ``SpecDecoder``), one round per turn of the engine thread;
* requests arriving meanwhile go to the paged engine as usual. Once the server holds more than ``max_batch``
  sequences, the solo sequence is handed to the engine (``handoff``, the default): it joins the engine's batch as a
  waiting sequence holding its prompt and the tokens decoded so far, which the engine computes again in one
  chunked pass (as after a preemption) and continues; its stream goes on under the same request id. A solo
  sequence decoded beside the engine costs a whole one-row forward pass per engine step (the batch's weights are
  read twice), which halved a 4-request server's throughput; the re-prefill costs one pass. With
  ``handoff=False`` it stays solo instead, decoding plainly (its rounds gated off) while the server is busy and
  speculating again once it holds fewer sequences.

Under load the engine is never idle, so nothing runs solo and throughput is the engine's own.

SpecMemo (one memory budget): the solo sequence's contiguous caches are charged to the engine's block pool, as
blocks of the pool's byte size taken out of it (``BlockManager.reserve``, planned by ``spec.memo.plan`` before
anything is allocated), so ``--kv-memory-gb`` bounds them too:

* the request's own cache (prompt + output + the ``k + 1`` candidate slots) and the verify logits, for its whole
  life; a request the pool cannot hold so goes to the engine and decodes plainly there
  (``SpecStats.memory_fallbacks``);
* the draft's cache (``draft`` / ``self``) while it speculates: when the gate turns speculation off (a busy server,
  or the engine's sequences need more blocks than are free) the proposer frees its cache and the blocks go back;
  they are taken again when it turns on, and while the pool cannot spare them it decodes plainly
  (``SpecStats.memory_gated_steps``). Speculation never makes the engine preempt a sequence or run out of memory.

``gauges()`` (in the engine's ``/metrics``) report the blocks held and the bytes speculation adds.

The budget is one, the storage is not (yet): the reserved blocks sit unused in the pool's preallocated tensors
while the solo caches are tensors of their own, so the process holds the pool plus those caches. Backing the caches
by the reserved blocks' memory needs the solo loop (``SoloRunner._run``, the proposer's ``begin``) to build them
from given storage.
"""

from __future__ import annotations

from typing import Any

from frugallm.engine.inputs import EngineRequest
from frugallm.engine.llm_engine import LLMEngine, StepOutput
from frugallm.engine.sequence import Sequence
from frugallm.spec.memo import MemoPlan, blocks_for_bytes, plan

DEFAULT_MAX_BATCH = 2  # sequences in the server (the solo one included) up to which it speculates


class SoloSpec:
    """At most one request at a time, decoded speculatively beside ``engine`` (see the module docstring). Used only
    by the engine thread."""

    def __init__(self, engine: LLMEngine, max_batch: int = DEFAULT_MAX_BATCH, handoff: bool = True) -> None:
        self.engine, self.llm, self.max_batch, self.handoff = engine, engine.llm, max_batch, handoff
        self.handoffs = 0  # solo requests handed to the engine's batch
        self.request_id: str | None = None
        self.seq: Sequence | None = None
        self._steps: Any = None
        self.plan: MemoPlan | None = None  # the solo request's memory
        self._request_blocks: list[int] = []  # reserved for its cache, candidates and logits
        self._draft_blocks: list[int] | None = None  # reserved for the draft's cache; None while not held
        self.llm.spec_gate = self._gate
        engine.extra_gauges = self.gauges

    @property
    def running(self) -> bool:
        return self.request_id is not None

    def accepts(self, req: EngineRequest) -> bool:
        """Whether ``req`` runs solo: nothing else in the server, and a request the single-sequence path serves
        exactly as the engine would."""
        from frugallm.spec import supports

        llm = self.llm
        if not (not self.running and not self.engine.has_unfinished_requests() and llm.spec_cfg is not None
                and req.n == 1 and req.lora is None and req.matcher is None and req.params.prompt_logprobs is None
                and llm.lora is None and llm.kv_spec is None and self.engine.kv_policy is None
                and supports(req.params)):
            return False
        memo = self._plan(req)
        need = self._blocks(memo.request_bytes) + self._blocks(memo.draft_kv)
        if need > self.engine.block_manager.num_free_blocks:  # SpecMemo: the pool cannot hold it speculating
            llm.spec_stats.memory_fallbacks += 1
            return False
        return True

    def start(self, req: EngineRequest) -> None:
        """Run ``req`` solo (after :meth:`accepts`): its memory is taken out of the pool first."""
        self.request_id = req.request_id
        self.seq = Sequence(-1, req.prompt, req.prompt_ids, req.params, self.llm.tokenizer, self.engine.max_model_len)
        self.plan = self._plan(req)
        bm = self.engine.block_manager
        blocks = bm.reserve(self._blocks(self.plan.request_bytes))
        assert blocks is not None, "accepts() checked the pool"
        self._request_blocks = blocks
        self._draft_blocks = bm.reserve(self._blocks(self.plan.draft_kv))
        self._steps = self.llm._run([self.seq])

    def _plan(self, req: EngineRequest) -> MemoPlan:
        llm = self.llm
        max_new = min(req.params.max_tokens, self.engine.max_model_len - len(req.prompt_ids))
        draft = llm.draft.config if getattr(llm, "draft", None) is not None else None
        return plan(llm.spec_cfg, llm.config, draft, len(req.prompt_ids), max_new, llm.kv_dtype)

    def _blocks(self, nbytes: int) -> int:
        return blocks_for_bytes(nbytes, self.engine.cache.bytes_per_block)

    def _busy(self) -> bool:
        """The server holds more than ``max_batch`` sequences, the solo one included."""
        return 1 + sum(len(r.seqs) for r in self.engine.requests.values()) > self.max_batch

    def _gate(self) -> bool:
        """Speculate this round: the server holds at most ``max_batch`` sequences, this one included, the engine's
        sequences find the blocks they need to finish, and the draft's cache is charged to the pool (taken here)."""
        if self._busy() or self._engine_short():
            self._release_draft()
            return False
        if self._draft_blocks is None and self.plan is not None:
            self._draft_blocks = self.engine.block_manager.reserve(self._blocks(self.plan.draft_kv))
            if self._draft_blocks is None:
                self.llm.spec_stats.memory_gated_steps += 1
                return False
        return True

    def _engine_short(self) -> bool:
        """Whether the engine's sequences need more blocks to finish than the pool has free (with the draft's
        blocks given back, they fit: speculation must not make the engine preempt)."""
        bm = self.engine.block_manager
        need = 0
        for r in self.engine.requests.values():
            for s in r.seqs:
                if not s.finished:
                    total = min(len(s.prompt_ids) + s.params.max_tokens, self.engine.max_model_len)
                    need += max(0, bm.blocks_for(total) - len(s.block_table))
        return need > bm.num_free_blocks

    def _release_draft(self) -> None:
        if self._draft_blocks is not None:
            self.engine.block_manager.unreserve(self._draft_blocks)
            self._draft_blocks = None

    def reserved_blocks(self) -> int:
        """Pool blocks the solo request holds now (its cache, candidates and logits; the draft's cache)."""
        draft = self._draft_blocks
        return len(self._request_blocks) + len(draft or ())

    def added_bytes(self) -> int:
        """What speculation adds now to decoding the solo request without it: candidate slots, verify logits and
        the draft's cache while held (draft weights aside: ``memory_bytes``)."""
        memo, held = self.plan, self._draft_blocks is not None  # read once: /metrics reads from another thread
        if memo is None:
            return 0
        return memo.candidates_kv + memo.logits + (memo.draft_kv if held else 0)

    def gauges(self) -> dict[str, tuple[str, float]]:
        bpb = self.engine.cache.bytes_per_block
        return {
            "spec_kv_blocks_reserved": ("KV-pool blocks charged to the request decoded speculatively (its contiguous "
                                        "cache, candidate slots, verify logits, the draft's cache).",
                                        self.reserved_blocks()),
            "spec_kv_bytes_reserved": ("Bytes of those blocks.", self.reserved_blocks() * bpb),
            "spec_memory_added_bytes": ("Memory speculation adds to that request now (candidate slots, verify "
                                        "logits, draft cache; not the draft's weights).", self.added_bytes()),
            "spec_memory_fallbacks": ("Requests decoded without speculation: the KV pool could not spare the blocks "
                                      "their speculative memory takes.", self.llm.spec_stats.memory_fallbacks),
            "spec_handoffs": ("Requests decoded speculatively alone, then handed to the engine's batch when the "
                              "server got busy.", self.handoffs),
        }

    def step(self) -> StepOutput:
        """One round of the solo request (its first call: prefill and first token); what it produced."""
        seq = self.seq
        assert seq is not None and self.request_id is not None
        next(self._steps, None)
        done = seq.num_emitted_tokens
        new = seq.token_ids[seq.num_prompt_tokens + done:]
        seq.num_emitted_tokens = seq.num_output_tokens
        out = StepOutput(self.request_id, 0, seq.take_delta(), new, None, seq.finish_reason, len(seq.prompt_ids),
                         seq.num_output_tokens, 0)
        if seq.finished:
            self._count(seq)
            self._clear()
        elif self.handoff and self._busy():
            self._hand_off()
        return out

    def _hand_off(self) -> None:
        """Move the solo sequence into the engine's batch (see the module docstring): a waiting sequence of the
        same request id, its tokens so far computed again by the engine (no blocks held yet, as after a
        preemption); the solo loop, its caches and its reserved blocks are dropped first, so the pool has them."""
        seq, rid, engine = self.seq, self.request_id, self.engine
        assert seq is not None and rid is not None
        self.seq = None  # _clear must not touch it
        self._clear()
        engine.adopt(rid, seq)
        self.handoffs += 1

    def abort(self, request_id: str) -> bool:
        """Drop the solo request if it is ``request_id``."""
        if request_id != self.request_id:
            return False
        self._clear()
        return True

    def fail(self) -> str | None:
        """After an error in :meth:`step`: drop the solo request; its id."""
        rid = self.request_id
        self._clear()
        return rid

    def memory_bytes(self) -> int:
        """What the last solo run's speculation added (draft weights and cache, candidate slots, verify logits)."""
        stats = self.llm.last_spec_stats
        return 0 if stats is None else stats.memory_bytes

    def _clear(self) -> None:
        if self._steps is not None:
            self._steps.close()
        self._release_draft()
        self.engine.block_manager.unreserve(self._request_blocks)
        self._request_blocks, self.plan = [], None
        self.request_id, self.seq, self._steps = None, None, None

    def _count(self, seq: Sequence) -> None:
        """The engine's request counters and latency histograms, as for its own requests."""
        m = seq.output().metrics
        metrics = self.engine.metrics
        with metrics.lock:
            metrics.requests.inc(label=seq.finish_reason or "")
            for key, hist in (("ttft_s", metrics.ttft), ("tpot_s", metrics.tpot), ("e2e_s", metrics.e2e)):
                if key in m:
                    hist.observe(m[key])


def solo_for(engine: LLMEngine | None) -> SoloSpec | None:
    """The solo speculation of ``engine``'s LLM when it was given ``spec=`` (``serve --spec``), else None."""
    if engine is None or getattr(engine.llm, "spec_cfg", None) is None:
        return None
    return SoloSpec(engine)
