"""``LLMEngine``: continuous batching over a paged KV cache.

The loop reads like nano-vllm's: ``step()`` = ``Scheduler.schedule()`` -> ``ModelRunner.run()`` ->
``Scheduler.postprocess()`` -> compact evicted KV -> sample -> append tokens (detokenize, stop checks) ->
free finished sequences. Requests may be added or aborted between steps.

KV policies (``EngineConfig.kv``, or ``kv=`` per request): an evictor that ``pages`` (SnapKV) picks each
sequence's kept slots in the pass that ends its prompt; the engine then compacts them into the sequence's
leading blocks and returns the others to the pool (``BlockManager.compact``), so a compressed sequence
holds ``budget`` of its prompt's blocks for the rest of its life. Its RoPE positions go on from the true
length (``num_computed_tokens``), attention reads its ``num_computed_tokens - num_evicted`` slots.

>>> engine = LLMEngine(llm, EngineConfig(max_num_seqs=8))
>>> rid = engine.add_request("Hello", SamplingParams(max_tokens=8, temperature=0))
>>> while engine.has_unfinished_requests():
...     for out in engine.step():
...         print(out.request_id, out.index, out.text, out.finish_reason)
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

from frugallm.engine.block_manager import BlockManager
from frugallm.engine.inputs import EngineRequest, InputProcessor
from frugallm.engine.metrics import EngineMetrics
from frugallm.engine.model_runner import ModelRunner
from frugallm.engine.packed_kv import KVPacker
from frugallm.engine.paged_cache import PagedKVCache, pool_dtype
from frugallm.engine.scheduler import Scheduler, SchedulerConfig, SeqStatus
from frugallm.engine.sequence import RequestOutput, Sequence
from frugallm.errors import FrugalError, InvalidRequestError
from frugallm.kv import KVSpecError, paged_policy, paged_quantizer
from frugallm.kv.speckv import draft_for
from frugallm.sampling import SamplingParams, prompt_logprobs
from frugallm.sampling import sample_batch as sample
from frugallm.structured import apply_bitmask


@dataclass(frozen=True)
class EngineConfig:
    """Batching and KV-memory settings. ``num_blocks`` wins over ``kv_memory_gb`` when both are set."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_blocks: int | None = None
    kv_memory_gb: float = 1.0
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_model_len: int | None = None  # default: the model's, capped to what the KV pool can hold
    kv: str | None = None  # KV policy of every request (see kv.paged_names()); default: the LLM's kv=
    # The pool in the LLM's kv_dtype (fp32 on CPU) even where pool_dtype picks bf16 (half models on CPU): LLM's
    # single-prompt generate / stream keep the numbers (and tokens) of the fp32 cache they always had.
    exact_kv: bool = False

    def __post_init__(self) -> None:
        paged_policy(self.kv)  # a KVSpecError naming the policies that run under batching
        checks = [
            (self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}"),
            (self.max_num_batched_tokens >= self.max_num_seqs,
             f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs ({self.max_num_seqs}) "
             "so that every running sequence can decode in each step"),
            (1 <= self.block_size <= 1024, f"block_size must be in [1, 1024], got {self.block_size}"),
            (self.num_blocks is None or self.num_blocks >= 1, f"num_blocks must be >= 1, got {self.num_blocks}"),
            (self.kv_memory_gb > 0, f"kv_memory_gb must be > 0, got {self.kv_memory_gb}"),
            (self.max_model_len is None or self.max_model_len >= 2,
             f"max_model_len must be >= 2, got {self.max_model_len}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise FrugalError(msg)

    @property
    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.enable_chunked_prefill)


@dataclass
class StepOutput:
    """What one step produced for one choice of a request: new text/tokens since the previous output.

    ``text`` holds back characters that could still become a stop string, so the concatenation of a
    choice's ``text`` fields is exactly its final text.
    """

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    prompt_logprobs: list[dict[int, float] | None] | None = None  # on a choice's first output, when asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, later: StepOutput) -> StepOutput:
        """One output carrying this one's tokens then ``later``'s (same request and choice)."""
        assert (later.request_id, later.index) == (self.request_id, self.index)
        lps = None if self.logprobs is None or later.logprobs is None else self.logprobs + later.logprobs
        return dataclasses.replace(later, text=self.text + later.text, token_ids=self.token_ids + later.token_ids,
                                   logprobs=lps, prompt_logprobs=self.prompt_logprobs or later.prompt_logprobs)


@dataclass(eq=False)
class Request:
    """A request in the engine: its ``n`` choices. ``seqs[0]`` computes the prompt; the others are forked
    from it (sharing its prompt's blocks) once that is done."""

    request_id: str
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


class LLMEngine:
    """Continuous-batching engine around a loaded :class:`~frugallm.LLM` (its model and tokenizer)."""

    def __init__(self, llm: Any, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        self.llm = llm
        self.config = config
        self.tokenizer = llm.tokenizer
        mc = llm.config
        kv_dtype = llm.kv_dtype if config.exact_kv else pool_dtype(llm.dtype, llm.kv_dtype, llm.device)
        num_blocks = config.num_blocks or self.blocks_in(llm, config.kv_memory_gb, config.block_size, kv_dtype)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.lora = getattr(llm, "lora", None)  # the LLM's LoraManager, when it has adapter slots
        sched = config.scheduler_config
        if self.lora is not None:
            sched = dataclasses.replace(sched, max_loras=self.lora.max_loras)
        self.scheduler = Scheduler(sched, self.block_manager)
        self.cache = PagedKVCache(mc.num_layers, num_blocks, config.block_size, mc.num_kv_heads, mc.head_dim,
                                  kv_dtype, llm.device)
        self.runner = ModelRunner(llm.model, self.cache, llm.device)
        self.runner.lora = self.lora
        # A sequence alone must always fit in the pool, so preemption can always make progress.
        self.max_model_len = min(config.max_model_len or llm.max_model_len, llm.max_model_len,
                                 num_blocks * config.block_size)
        self.inputs = InputProcessor(self.tokenizer, mc.vocab_size, self.max_model_len, config.max_num_seqs)
        llm.model.rope_tables(llm.device, self.max_model_len)  # every position a request can reach
        self.kv_policy = paged_policy(config.kv if config.kv is not None else getattr(llm, "kv_spec", None))
        # KIVI: packed chunks in the same pool (packed_kv.py); a layout that saves nothing fails here.
        self.packer = KVPacker(self.block_manager, self.cache, mc.num_kv_heads, mc.head_dim)
        quant = paged_quantizer(config.kv if config.kv is not None else getattr(llm, "kv_spec", None))
        self.kv_quant = None if quant is None else self.packer.codec(quant)
        self.num_uncompacted = 0  # sequences that fell back to the full cache (see _compact)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.metrics = EngineMetrics()
        self.metrics.gauges = self.gauges
        # Gauges of what runs beside the engine on its pool (spec_solo.SoloSpec: speculation's reserved blocks).
        self.extra_gauges: Callable[[], dict[str, tuple[str, float]]] = dict

    @staticmethod
    def blocks_in(llm: Any, kv_memory_gb: float, block_size: int, kv_dtype: torch.dtype) -> int:
        """How many KV blocks of ``block_size`` tokens in ``kv_dtype`` fit in ``kv_memory_gb`` GiB."""
        mc = llm.config
        elem = torch.empty((), dtype=kv_dtype).element_size()
        bytes_per_block = 2 * mc.num_layers * block_size * mc.num_kv_heads * mc.head_dim * elem
        return max(1, int(kv_memory_gb * 2**30) // bytes_per_block)

    # -- requests -----------------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | Seq[int] | EngineRequest,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        n: int = 1,
        arrival_time: float | None = None,
        lora: Any = None,
        kv: str | None = None,
    ) -> str:
        """Queue a prompt (validated here unless it is an :class:`EngineRequest` from ``self.inputs``);
        ``n`` samples share its prompt's KV blocks; ``lora``: a LoRA adapter name; ``kv``: this request's KV
        policy (``"full"``: none; default: the engine's). Returns the request id."""
        try:
            policy = self.kv_policy if kv is None else paged_policy(kv)
            quant = self.kv_quant if kv is None else paged_quantizer(kv)
            if quant is not None and kv is not None:
                quant = self.packer.codec(quant)
            if getattr(policy, "needs_draft", False):
                draft_for(self.llm.model, policy)  # SpecKV: its draft must be loaded (LLM(kv=...) loads it)
        except KVSpecError as e:
            raise InvalidRequestError(str(e)) from None
        if isinstance(prompt, EngineRequest):
            req = prompt
        else:
            req = self.inputs.process(prompt, params, request_id or "", n, arrival_time)
        if policy is not None and policy.evicts_during_decode and policy.sliding_sinks is None and req.n > 1:
            raise InvalidRequestError(f"kv {policy.describe()} evicts each sample's own slots while it decodes; "
                                      "its samples cannot share blocks: use n=1")
        if policy is not None and policy.prefill_queries(len(req.prompt_ids)) > self.config.max_num_batched_tokens:
            raise InvalidRequestError(
                f"kv {policy.describe()} reads the prompt's last {policy.prefill_queries(len(req.prompt_ids))} "
                f"queries, more than max_num_batched_tokens ({self.config.max_num_batched_tokens}) computes at once")
        if lora is not None:
            req = dataclasses.replace(req, lora=self.resolve_lora(lora))
        rid = req.request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        request = Request(rid)
        for i in range(req.n):
            seq = Sequence(next(self._ids), req.prompt, req.prompt_ids, req.params, self.tokenizer,
                           self.max_model_len, request, i)
            seq.t_start = req.arrival_time
            if req.matcher is not None:
                seq.matcher = req.matcher if i == 0 else req.matcher.copy()
            seq.lora = req.lora
            seq.kv_policy = policy
            seq.kv_quant = quant
            if policy is not None and policy.evicts_during_decode:
                # It holds its capacity plus the step's new token. A sliding window writes that over its oldest
                # slot after the sinks; a scoring policy (H2O) compacts its kept slots first, so the new token
                # always goes to the last slot.
                cap = policy.decode_capacity(policy.prefill_keep(len(req.prompt_ids), 0, self.llm.config.num_layers))
                sinks = policy.sliding_sinks
                seq.max_slots, seq.ring_start = cap + 1, cap if sinks is None else min(sinks, cap)
            if req.params.seed is not None and i:  # distinct but reproducible samples per choice
                seq.generator = torch.Generator().manual_seed((req.params.seed + i) % 2**64)
            request.seqs.append(seq)
        first = request.seqs[0]
        first.num_forks = req.n - 1
        self.requests[rid] = request
        self.scheduler.add(first)
        with self.metrics.lock:
            self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        return rid

    def adopt(self, rid: str, seq: Sequence) -> None:
        """Continue ``seq``, decoded so far outside the engine (``SoloSpec``'s hand-off), as request ``rid``: first in
        line, no blocks held; its prompt and tokens so far are computed again in one chunked pass, as after a
        preemption."""
        request = Request(rid, [seq])
        seq.request_id, seq.request, seq.index = next(self._ids), request, 0  # numbered as add_request numbers
        seq.num_computed_tokens, seq.block_table = 0, []
        self.requests[rid] = request
        self.scheduler.add(seq, first=True)

    def resolve_lora(self, lora: Any) -> Any:
        """A LoRA adapter name -> its ``LoraRequest`` (an unknown name is an ``InvalidRequestError`` naming it)."""
        if self.lora is None:
            raise InvalidRequestError(f"LoRA adapter {lora!r} requested, but no adapters are loaded")
        return self.lora.get(lora) if isinstance(lora, str) else lora

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks; False if it is unknown or already finished."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        scheduled = req.seqs[:1] if req.seqs[0].num_forks else req.seqs  # choices not forked yet hold nothing
        for seq in scheduled:
            if seq.status is not SeqStatus.FINISHED:
                self.scheduler.finish(seq)
        with self.metrics.lock:
            self.metrics.aborted.inc()
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step -----------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Run one iteration; returns an output for every choice that got a new token."""
        out = self.scheduler.schedule()
        if not out:
            return []
        # Pure decode steps are timed for the thread governor (fewer threads while the cores are crowded), keyed by
        # the batch size's power of two: steps of one bucket cost about the same.
        gov = self.llm.governor if out.num_tokens == len(out.seqs) else None
        if gov is not None:
            gov.pause()
        rows, logits = self.runner.run(out)
        if gov is not None:
            gov.step(1 << (len(out.seqs) - 1).bit_length())
        for i, lg in self.runner.all_logits.items():
            self._record_prompt_logprobs(out.seqs[i], lg)  # type: ignore[arg-type]
        self.scheduler.postprocess(out)
        for i, kept in self.runner.kept.items():
            self._compact(out.seqs[i], kept, self.runner.kept_stats[i])  # type: ignore[arg-type]
        seqs: list[Sequence] = []
        logit_rows: list[int] = []
        for r, i in enumerate(rows):
            seq: Sequence = out.seqs[i]  # type: ignore[assignment]  # the engine schedules Sequences
            seqs.append(seq)
            logit_rows.append(r)
            if seq.num_forks:  # n > 1: the prompt is computed; the other samples start from its blocks
                for child in seq.request.seqs[1:]:
                    self.scheduler.fork(seq, child)
                    child.prompt_logprobs = seq.prompt_logprobs
                    seqs.append(child)
                    logit_rows.append(r)
                seq.num_forks = 0
        outputs: list[StepOutput] = []
        if seqs:
            assert logits is not None
            if len(logit_rows) != logits.shape[0]:
                logits = logits[torch.tensor(logit_rows, device=logits.device)]
            self._constrain(logits, seqs)
            tokens = sample(logits, seqs)
            for seq, tok in zip(seqs, tokens, strict=True):
                if seq.matcher is not None:
                    seq.matcher.accept(tok)
                outputs.append(self._append(seq, tok))
                if seq.kv_quant is not None and not seq.finished:
                    self.packer.pack(seq)  # its oldest exact chunks, when whole ones are ready
        self.cache.num_used_blocks = self.block_manager.num_used_blocks
        with self.metrics.lock:
            self.metrics.generation_tokens.inc(len(seqs))
            self.metrics.preemptions.inc(len(out.preempted))
            self.metrics.prefix_queries.values[""] = self.block_manager.prefix_queries
            self.metrics.prefix_hits.values[""] = self.block_manager.prefix_hits
        return outputs

    def _compact(self, seq: Sequence, kept: list[torch.Tensor], stats: list[dict[str, torch.Tensor]]) -> None:
        """Keep only ``kept[layer] [kv_heads, keep]`` of a sequence's slots: move them into its leading blocks and
        free the rest (before it forks or takes its next token). ``stats``: the policy's per-slot statistics of
        the kept slots, per layer."""
        keep = kept[0].shape[1]
        assert all(k.shape[1] == keep for k in kept), "a paging policy keeps the same slot count in every layer"
        policy = seq.kv_policy
        scores_decode = policy is not None and policy.evicts_during_decode and policy.sliding_sinks is None
        if scores_decode:
            seq.kv_stats = stats
        # A scoring policy compacts its slots in place at every step: it needs blocks of its own even when it keeps
        # every prompt slot (compaction copies shared or cached ones).
        if keep >= self.block_manager.num_slots(seq) and not scores_decode:
            return
        if not self.block_manager.can_compact(seq, keep):
            # No free block to copy the shared prefix blocks it must not write: it runs without its policy (the
            # full cache, as a request with kv="full"), for the rest of its life.
            seq.kv_policy, seq.max_slots, seq.kv_stats = None, 0, None
            self.num_uncompacted += 1
            return
        old = list(seq.block_table)
        self.cache.compact(old, self.block_manager.compact(seq, keep), kept)

    @staticmethod
    def _constrain(logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Structured output: mask ``logits [S, vocab]`` rows of constrained sequences to their grammar's tokens."""
        rows = [r for r, s in enumerate(seqs) if s.matcher is not None]
        if not rows:
            return
        with torch.inference_mode():  # the logits are inference tensors (entered only here: it costs per step)
            bitmask = torch.full((len(rows), (logits.shape[-1] + 31) // 32), -1, dtype=torch.int32)
            for j, r in enumerate(rows):
                seqs[r].matcher.fill(bitmask, j)  # type: ignore[union-attr]
            apply_bitmask(logits, bitmask, rows)

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, logits: torch.Tensor) -> None:
        """Prompt log-probabilities from this step's logits ``[num_new, vocab]`` of ``seq`` (row ``j`` is
        position ``num_computed_tokens + j`` and predicts the token after it); positions already recorded
        (a preempted sequence computes its prompt again) are skipped."""
        lps = seq.prompt_logprobs
        assert lps is not None
        first = len(lps)  # the prompt token whose log-probability comes next
        start = seq.num_computed_tokens
        lo, hi = first - 1 - start, min(seq.num_prompt_tokens - 1 - start, logits.shape[0])
        if hi <= lo or lo < 0:
            return
        targets = torch.tensor(seq.token_ids[first:first + hi - lo], device=logits.device)
        lps += prompt_logprobs(logits[lo:hi], targets, seq.params.prompt_logprobs or 0)

    def _append(self, seq: Sequence, tok: int) -> StepOutput:
        seq.append(tok)
        req = seq.request
        if seq.finished:
            # Blocks it holds (shared and packed ones too).
            seq.kv_cache_bytes = (len(seq.block_table) + len(seq.packed_table)) * self.cache.bytes_per_block
            self.scheduler.finish(seq)
            m = seq.output().metrics
            with self.metrics.lock:
                self.metrics.requests.inc(label=seq.finish_reason or "")
                if "ttft_s" in m:
                    self.metrics.ttft.observe(m["ttft_s"])
                if "tpot_s" in m:
                    self.metrics.tpot.observe(m["tpot_s"])
                if "e2e_s" in m:
                    self.metrics.e2e.observe(m["e2e_s"])
            if req.finished:
                self.requests.pop(req.request_id, None)
        done = seq.num_emitted_tokens
        new = seq.token_ids[seq.num_prompt_tokens + done:]
        lps = seq.logprobs[done:] if seq.logprobs is not None else None
        seq.num_emitted_tokens = seq.num_output_tokens
        return StepOutput(req.request_id, seq.index, seq.take_delta(), new, lps, seq.finish_reason,
                          len(seq.prompt_ids), seq.num_output_tokens, seq.num_cached_tokens,
                          seq.prompt_logprobs if done == 0 else None)

    # -- introspection ------------------------------------------------------------------------------
    def gauges(self) -> dict[str, tuple[str, float]]:
        bm, sch = self.block_manager, self.scheduler
        return {
            "num_requests_running": ("Sequences in the running batch.", len(sch.running)),
            "num_requests_waiting": ("Sequences waiting to be scheduled.", len(sch.waiting)),
            "kv_blocks_used": ("KV-cache blocks referenced by sequences.", bm.num_used_blocks),
            "kv_blocks_free": ("KV-cache blocks free (some hold reusable cached prefixes).", bm.num_free_blocks),
            "kv_blocks_total": ("KV-cache blocks in the pool.", bm.num_blocks),
            "kv_blocks_packed": ("KV-cache blocks holding KIVI-packed chunks of running sequences.",
                                 sum(len(s.packed_table) for s in sch.running)),
            "kv_block_size_tokens": ("Tokens per KV-cache block.", bm.block_size),
            "kv_cache_usage_ratio": ("Fraction of KV-cache blocks in use.", bm.num_used_blocks / bm.num_blocks),
            **self.extra_gauges(),
        }

    def output(self, request_id: str) -> list[RequestOutput]:
        """Current state of each choice of a request still known to the engine."""
        return [s.output() for s in self.requests[request_id].seqs]

    def run_to_completion(self) -> None:
        while self.has_unfinished_requests():
            self.step()
