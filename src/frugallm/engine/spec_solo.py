"""``SoloSpec``: speculative decoding in the server while it is nearly idle (``serve --spec``).

Speculation pays at batch 1 and loses at batch 8-32 (vLLM's and llama.cpp's users report the reversal): a verify
pass of ``k + 1`` rows costs about what a batched step of ``k + 1`` sequences costs, and a busy batch already fills
those rows with real tokens. So the server speculates only when it holds at most ``max_batch`` sequences:

* a request that arrives while the paged engine has nothing to do (``n = 1``, no adapter, no structured output,
  no prompt logprobs, a request ``SpecDecoder`` serves exactly) runs *solo*, on the LLM's single-sequence path
  (``LLM._run``: contiguous cache, ``SpecDecoder``), one round per turn of the engine thread;
* requests arriving meanwhile go to the paged engine as usual; the engine thread then alternates one engine step
  and one solo round, and the solo sequence decodes plainly (its rounds gated off) while the server holds more
  than ``max_batch`` sequences, speculating again once it holds fewer.

Under load the engine is never idle, so nothing runs solo and throughput is the engine's own. The solo
sequence's contiguous cache (and the draft's) lives outside the engine's block pool: ``memory_bytes`` says how much.
"""

from __future__ import annotations

from typing import Any

from frugallm.engine.inputs import EngineRequest
from frugallm.engine.llm_engine import LLMEngine, StepOutput
from frugallm.engine.sequence import Sequence

DEFAULT_MAX_BATCH = 2  # sequences in the server (the solo one included) up to which it speculates


class SoloSpec:
    """At most one request at a time, decoded speculatively beside ``engine`` (see the module docstring). Used only
    by the engine thread."""

    def __init__(self, engine: LLMEngine, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.engine, self.llm, self.max_batch = engine, engine.llm, max_batch
        self.request_id: str | None = None
        self.seq: Sequence | None = None
        self._steps: Any = None
        self.llm.spec_gate = self._gate

    @property
    def running(self) -> bool:
        return self.request_id is not None

    def accepts(self, req: EngineRequest) -> bool:
        """Whether ``req`` runs solo: nothing else in the server, and a request the single-sequence path serves
        exactly as the engine would."""
        from frugallm.spec import supports

        llm = self.llm
        return (not self.running and not self.engine.has_unfinished_requests() and llm.spec_cfg is not None
                and req.n == 1 and req.lora is None and req.matcher is None and req.params.prompt_logprobs is None
                and llm.lora is None and llm.kv_spec is None and self.engine.kv_policy is None
                and supports(req.params))

    def start(self, req: EngineRequest) -> None:
        self.request_id = req.request_id
        self.seq = Sequence(-1, req.prompt, req.prompt_ids, req.params, self.llm.tokenizer, self.engine.max_model_len)
        self._steps = self.llm._run([self.seq])

    def _gate(self) -> bool:
        """Speculate this round: the server holds at most ``max_batch`` sequences, this one included."""
        return 1 + sum(len(r.seqs) for r in self.engine.requests.values()) <= self.max_batch

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
        return out

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
        """What solo speculation holds outside the block pool (the last run's cache, draft and candidates)."""
        stats = self.llm.last_spec_stats
        return 0 if stats is None else stats.memory_bytes

    def _clear(self) -> None:
        if self._steps is not None:
            self._steps.close()
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
