"""``LLMEngine``: continuous batching over a paged KV cache.

The loop reads like nano-vllm's: ``step()`` = ``Scheduler.schedule()`` -> ``ModelRunner.run()`` ->
``Scheduler.postprocess()`` -> sample -> append tokens (detokenize, stop checks) -> free finished
sequences. Requests may be added or aborted between steps.

>>> engine = LLMEngine(llm, EngineConfig(max_num_seqs=8))
>>> rid = engine.add_request("Hello", SamplingParams(max_tokens=8, temperature=0))
>>> while engine.has_unfinished_requests():
...     for out in engine.step():
...         print(out.request_id, out.index, out.text, out.finish_reason)
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch

from frugallm.engine.block_manager import BlockManager
from frugallm.engine.metrics import EngineMetrics
from frugallm.engine.model_runner import ModelRunner
from frugallm.engine.paged_cache import PagedKVCache, pool_dtype
from frugallm.engine.scheduler import Scheduler, SchedulerConfig, SeqState, SeqStatus
from frugallm.engine.sequence import RequestOutput, Sequence
from frugallm.errors import FrugalError, InvalidRequestError
from frugallm.sampling import SamplingParams
from frugallm.sampling import sample_batch as sample


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

    def __post_init__(self) -> None:
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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merge(self, later: StepOutput) -> StepOutput:
        """One output carrying this one's tokens then ``later``'s (same request and choice)."""
        assert (later.request_id, later.index) == (self.request_id, self.index)
        lps = None if self.logprobs is None or later.logprobs is None else self.logprobs + later.logprobs
        return dataclasses.replace(later, text=self.text + later.text, token_ids=self.token_ids + later.token_ids,
                                   logprobs=lps)


@dataclass(eq=False)
class _Choice:
    request: _Request
    index: int
    seq: Sequence
    emitted_tokens: int = 0


@dataclass(eq=False)
class _Request:
    request_id: str
    choices: list[_Choice] = field(default_factory=list)
    states: list[SeqState] = field(default_factory=list)  # one per choice once forked

    @property
    def finished(self) -> bool:
        return all(c.seq.finished for c in self.choices)


class LLMEngine:
    """Continuous-batching engine around a loaded :class:`~frugallm.LLM` (its model and tokenizer)."""

    def __init__(self, llm: Any, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        self.llm = llm
        self.config = config
        self.tokenizer = llm.tokenizer
        mc = llm.config
        kv_dtype = pool_dtype(llm.dtype, llm.kv_dtype, llm.device)
        num_blocks = config.num_blocks or self.blocks_in(llm, config.kv_memory_gb, config.block_size, kv_dtype)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler_config, self.block_manager)
        self.cache = PagedKVCache(mc.num_layers, num_blocks, config.block_size, mc.num_kv_heads, mc.head_dim,
                                  kv_dtype, llm.device)
        self.runner = ModelRunner(llm.model, self.cache, llm.device)
        # A sequence alone must always fit in the pool, so preemption can always make progress.
        self.max_model_len = min(config.max_model_len or llm.max_model_len, llm.max_model_len,
                                 num_blocks * config.block_size)
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self.metrics = EngineMetrics()
        self.metrics.gauges = self.gauges

    @staticmethod
    def blocks_in(llm: Any, kv_memory_gb: float, block_size: int, kv_dtype: torch.dtype) -> int:
        """How many KV blocks of ``block_size`` tokens in ``kv_dtype`` fit in ``kv_memory_gb`` GiB."""
        mc = llm.config
        elem = torch.empty((), dtype=kv_dtype).element_size()
        bytes_per_block = 2 * mc.num_layers * block_size * mc.num_kv_heads * mc.head_dim * elem
        return max(1, int(kv_memory_gb * 2**30) // bytes_per_block)

    # -- requests -----------------------------------------------------------------------------------
    def encode(self, prompt: str | Seq[int]) -> list[int]:
        """Token ids of a prompt (text is tokenized with the model's special tokens); validates ids."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
        else:
            ids = [int(i) for i in prompt]
            vocab = self.llm.config.vocab_size
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise InvalidRequestError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        if not ids:
            raise InvalidRequestError("prompt is empty")
        return ids

    def check_request(self, prompt_ids: list[int], params: SamplingParams, n: int = 1) -> None:
        """Raise :class:`InvalidRequestError` if the request can never run (safe from any thread)."""
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt is {len(prompt_ids)} tokens but the context window is {self.max_model_len} tokens "
                "(the prompt plus at least one generated token must fit)"
            )
        if not 1 <= n <= self.config.max_num_seqs:
            raise InvalidRequestError(f"n must be in [1, {self.config.max_num_seqs}] (max_num_seqs), got {n}")

    def add_request(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        n: int = 1,
        arrival_time: float | None = None,
    ) -> str:
        """Queue a prompt; ``n`` samples share its prompt's KV blocks. Returns the request id."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        self.check_request(ids, params, n)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        req = _Request(rid)
        for i in range(n):
            seq = Sequence(next(self._ids), text, ids, params, self.tokenizer, self.max_model_len)
            if arrival_time is not None:
                seq.t_start = arrival_time
            if params.seed is not None and i:  # distinct but reproducible samples per choice
                seq.generator = torch.Generator().manual_seed((params.seed + i) % 2**64)
            req.choices.append(_Choice(req, i, seq))
        state = SeqState(list(ids), num_forks=n - 1, payload=req.choices[0])
        req.states.append(state)
        self.requests[rid] = req
        self.scheduler.add(state)
        with self.metrics.lock:
            self.metrics.prompt_tokens.inc(len(ids))
        return rid

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks; False if it is unknown or already finished."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for st in req.states:
            if st.status is not SeqStatus.FINISHED:
                self.scheduler.finish(st)
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
        rows, logits = self.runner.run(out)
        self.scheduler.postprocess(out)
        states: list[SeqState] = []
        logit_rows: list[int] = []
        for r, i in enumerate(rows):
            st = out.seqs[i]
            states.append(st)
            logit_rows.append(r)
            if st.num_forks:  # n > 1: the prompt is computed; the other samples start from its blocks
                req = st.payload.request
                for choice in req.choices[1:]:
                    child = SeqState(list(st.token_ids), num_prompt_tokens=st.num_prompt_tokens, payload=choice)
                    self.scheduler.fork(st, child)
                    req.states.append(child)
                    states.append(child)
                    logit_rows.append(r)
                st.num_forks = 0
        outputs: list[StepOutput] = []
        if states:
            assert logits is not None
            if len(logit_rows) != logits.shape[0]:
                logits = logits[torch.tensor(logit_rows, device=logits.device)]
            tokens = sample(logits, [st.payload.seq for st in states])
            for st, tok in zip(states, tokens, strict=True):
                outputs.append(self._append(st, tok))
        self.cache.num_used_blocks = self.block_manager.num_used_blocks
        with self.metrics.lock:
            self.metrics.generation_tokens.inc(len(states))
            self.metrics.preemptions.inc(len(out.preempted))
            self.metrics.prefix_queries.values[""] = self.block_manager.prefix_queries
            self.metrics.prefix_hits.values[""] = self.block_manager.prefix_hits
        return outputs

    def _append(self, st: SeqState, tok: int) -> StepOutput:
        choice: _Choice = st.payload
        seq = choice.seq
        seq.append(tok)
        st.token_ids.append(tok)
        req = choice.request
        if seq.finished:
            self.scheduler.finish(st)
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
        new = seq.output_ids[choice.emitted_tokens:]
        lps = seq.logprobs[choice.emitted_tokens:] if seq.logprobs is not None else None
        choice.emitted_tokens = len(seq.output_ids)
        return StepOutput(req.request_id, choice.index, seq.take_delta(), new, lps, seq.finish_reason,
                          len(seq.prompt_ids), len(seq.output_ids), st.num_cached_tokens)

    # -- introspection ------------------------------------------------------------------------------
    def gauges(self) -> dict[str, tuple[str, float]]:
        bm, sch = self.block_manager, self.scheduler
        return {
            "num_requests_running": ("Sequences in the running batch.", len(sch.running)),
            "num_requests_waiting": ("Sequences waiting to be scheduled.", len(sch.waiting)),
            "kv_blocks_used": ("KV-cache blocks referenced by sequences.", bm.num_used_blocks),
            "kv_blocks_free": ("KV-cache blocks free (some hold reusable cached prefixes).", bm.num_free_blocks),
            "kv_blocks_total": ("KV-cache blocks in the pool.", bm.num_blocks),
            "kv_block_size_tokens": ("Tokens per KV-cache block.", bm.block_size),
            "kv_cache_usage_ratio": ("Fraction of KV-cache blocks in use.", bm.num_used_blocks / bm.num_blocks),
        }

    def output(self, request_id: str) -> list[RequestOutput]:
        """Current state of each choice of a request still known to the engine."""
        return [c.seq.output() for c in self.requests[request_id].choices]

    def run_to_completion(self) -> None:
        while self.has_unfinished_requests():
            self.step()


def generate_batched(llm: Any, prompts_token_ids: list[list[int]], params: list[SamplingParams],
                     config: EngineConfig | None = None) -> list[RequestOutput]:
    """Generate for many prompts with continuous batching; one output per prompt, in order.

    The KV pool is sized to the batch (every sequence at full length, capped at ``kv_memory_gb``; past the
    cap sequences are preempted and recomputed, which does not change their tokens).
    """
    if len(prompts_token_ids) != len(params):
        raise InvalidRequestError(f"{len(prompts_token_ids)} prompts but {len(params)} sampling params")
    if not prompts_token_ids:
        return []
    if config is None:
        bs = EngineConfig.block_size
        need = [-(-min(len(p) + sp.max_tokens, llm.max_model_len) // bs)
                for p, sp in zip(prompts_token_ids, params, strict=True)]
        cap = LLMEngine.blocks_in(llm, EngineConfig.kv_memory_gb, bs, pool_dtype(llm.dtype, llm.kv_dtype, llm.device))
        seqs_cap = min(len(need), 256)
        config = EngineConfig(max_num_seqs=seqs_cap, max_num_batched_tokens=max(512, seqs_cap),
                              num_blocks=max(min(sum(need), cap), max(need)))
    engine = LLMEngine(llm, config)
    start = time.perf_counter()
    seqs = []
    for ids, sp in zip(prompts_token_ids, params, strict=True):
        rid = engine.add_request(ids, sp, arrival_time=start)
        seqs.append(engine.requests[rid].choices[0].seq)
    engine.run_to_completion()
    return [dataclasses.replace(s.output(), request_id=i) for i, s in enumerate(seqs)]
