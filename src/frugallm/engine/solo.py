"""``SoloRunner``: the LLM's contiguous-cache loop, one sequence (or a static batch) on a ``KVCache`` of its own.

Plain generation does not run here: one prompt without a KV policy or speculation runs on the paged engine's loop
(``LLM._on_engine``: a pool sized to it, its blocks read in place, ``PagedKVCache.bind_run``: the same logits as this
loop, bit for bit, at the same step cost: ``benchmarks/solo_vs_engine.py``). This loop runs what the engine cannot
yet:

* KV policies that compress a contiguous cache (every spec ``kv.paged_policy`` refuses: gemfilter, lacache, specpc,
  think, xquant, and combinations the engine does not run): their caches (``make_cache``) rewrite, quantize or
  re-select slots in layouts the block pool does not hold; several prompts run as one left-padded static batch.
  One prompt with a paged policy (``kv.paged_names()``: h2o, kivi, snapkv, speckv, streamingllm) runs here too:
  this loop is the reference their batched runs are tested against (same greedy tokens);
* speculative decoding of one prompt (``spec=``): ``SpecDecoder`` verifies k+1 tokens per pass, truncates the cache
  after rejected drafts and keeps a draft cache beside it; the engine has no k+1-token verify steps in its
  scheduler, no block truncation and no per-sequence draft cache yet. Also the choice to decode a few prompts one
  by one speculatively rather than batched without (``_spec_one_by_one``);
* ``LLM(batching=False)``: everything, as one static batch.

``LLM`` inherits it (``class LLM(SoloRunner)``: the attributes below are the ones ``LLM.__init__`` sets);
``SoloSpec`` (``spec_solo.py``) runs it beside the paged engine in the server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from frugallm.engine.sequence import RequestOutput, Sequence
from frugallm.errors import FrugalError
from frugallm.loading.base import STORED_MODES
from frugallm.model.kv_cache import ContiguousKVCache, KVCache
from frugallm.sampling import sample_batch

# Several prompts with spec=: at most this many decode one by one speculatively (above, batching wins); the cost of
# each extra row of a decode step relative to the step (weight reads dominate; CPU kernels measured 3-10 %).
SPEC_ONE_BY_ONE_MAX, BATCH_ROW_COST = 4, 0.05


class SoloRunner:
    """The contiguous-cache loop of :class:`~frugallm.LLM` (see the module docstring); a mixin over its state."""

    model: Any  # frugallm.model.Transformer
    loaded: Any  # frugallm.loading.LoadedModel
    tokenizer: Any
    weights: str  # "stored": a GGUF's quantized weights run as stored
    config: Any  # frugallm.config.ModelConfig
    device: torch.device
    dtype: torch.dtype
    kv_dtype: torch.dtype
    kv_spec: Any  # frugallm.kv.KVSpec | None
    kv_draft: Any  # LLM | None: SpecKV / SpecPC's draft model
    spec_cfg: Any  # frugallm.spec.SpecConfig | None
    spec_stats: Any  # frugallm.spec.SpecStats: every speculative run so far
    last_spec_stats: Any  # frugallm.spec.SpecStats | None: the last one
    spec_gate: Callable[[], bool] | None
    draft: Any  # LLM | None: spec=draft's model
    governor: Any  # engine.threads.ThreadGovernor | None
    lora: Any  # frugallm.lora.LoraManager | None
    batching: bool

    def make_cache(self, batch: int, capacity: int, pad_lens: list[int] | None = None) -> KVCache:
        """The KV cache for one batch: the configured KV policy's cache, or the plain contiguous one."""
        self.model.rope_tables(self.device, capacity)  # cover the positions this cache can hold
        if self.kv_spec is not None:
            from frugallm.kv import build_kv_cache

            return build_kv_cache(
                self.kv_spec,
                self.model,
                batch=batch,
                capacity=capacity,
                dtype=self.kv_dtype,
                device=self.device,
                pad_lens=pad_lens,
                # Compressed caches keep exact slots in the model's half dtype (lossless: keys come from
                # half activations) and attend in kv_dtype; the plain cache stays fp32 (no per-step cast).
                store_dtype=self.dtype if self.dtype in (torch.float16, torch.bfloat16) else None,
            )
        cfg = self.config
        return ContiguousKVCache(
            cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim, capacity, self.kv_dtype, self.device, pad_lens
        )

    # -- the loop -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self, seqs: list[Sequence]) -> Iterator[list[Sequence]]:
        """Static batch: left-padded prefill, then one decode step per token; yields after each step.
        One sequence with ``spec=`` decodes speculatively (``frugallm.spec.SpecDecoder``)."""
        b = len(seqs)
        prompts = [s.prompt_ids for s in seqs]
        if self.kv_spec is not None and self.kv_spec.selector is not None:
            from frugallm.kv import select_prompt_tokens

            # GemFilter-style: prefill only the selected prompt tokens (positions renumbered from 0).
            prompts = [select_prompt_tokens(self.kv_spec, self.model, p) or p for p in prompts]
        lens = [len(p) for p in prompts]
        t = max(lens)
        pads = [t - n for n in lens]
        ids = torch.zeros(b, t, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, pads[i] :] = torch.tensor(p)
        pos = (torch.arange(t)[None, :] - torch.tensor(pads)[:, None]).clamp(min=0)
        capacity = t + max(s.max_new for s in seqs)
        spec = self._speculates(seqs)
        if spec:
            capacity += self.spec_cfg.k + 1  # room for the candidates of the last round
        cache = self.make_cache(b, capacity, pads if any(pads) else None)
        dev = self.device
        self._bind_lora(seqs, t)
        if self.kv_draft is not None:  # SpecKV: the draft's lookahead tokens follow the prompt and vote
            from frugallm.kv.speckv import prefill_with_lookahead

            logits = prefill_with_lookahead(self.kv_spec, self.model, ids.to(dev), pos.to(dev), cache, pads)
        else:
            logits = self.model(ids.to(dev), pos.to(dev), cache, "last")  # [B, vocab]
        if spec:
            yield from self._run_spec(seqs[0], cache, logits, capacity)
            return
        next_pos = pos[:, -1:].to(dev) + 1
        while True:
            tokens = sample_batch(logits, seqs)
            for s, tok in zip(seqs, tokens, strict=True):
                if not s.finished:
                    s.append(tok)
            if all(s.finished for s in seqs):
                kv = cache.nbytes()  # measured from the cache's own storage, for the whole batch
                for s in seqs:
                    s.kv_cache_bytes = kv
                yield seqs
                return
            yield seqs
            inp = torch.tensor(tokens, device=dev).view(b, 1)
            self._bind_lora(seqs, 1)
            if self.governor is not None:
                self.governor.pause()  # time the step itself, not the consumer between steps
            logits = self.model(inp, next_pos, cache, "last")
            if self.governor is not None:
                self.governor.step(b)
            next_pos += 1

    def _bind_lora(self, seqs: list[Sequence], tokens: int) -> None:
        if self.lora is not None:
            self.lora.bind([s.lora for s in seqs], tokens)

    def _output(self, seq: Sequence) -> RequestOutput:
        out = seq.output()
        if self.last_spec_stats is not None and self._speculates([seq]):
            out.metrics.update(self.last_spec_stats.as_dict())  # type: ignore[arg-type]
        return out

    # -- speculative decoding -------------------------------------------------------------------
    def set_spec(self, spec: str | None) -> None:
        """Turn speculative decoding on (or off with None) after loading, as ``LLM(spec=...)`` would (``serve``
        loads its model without techniques, then calls this)."""
        from frugallm.spec import check_same_vocab

        cfg = self._spec_config(spec)
        self.draft = None
        if cfg is not None and cfg.method == "draft":
            # A target run as stored takes a GGUF draft as stored too; otherwise the target's dtype. The draft's own
            # weights= (e.g. stored-q8: int8 activations) changes only its guesses, never the verified output.
            stored = self.weights in STORED_MODES or cfg.weights in STORED_MODES
            self.draft = type(self)(cfg.model, dtype="auto" if stored else self.dtype, device=self.device,
                                    weights=cfg.weights or "auto")
            check_same_vocab(self.tokenizer, self.draft.tokenizer, str(self.loaded.path), cfg.model)
        self.spec_cfg = cfg

    def _spec_config(self, spec: str | None) -> Any:
        """``spec`` parsed (a ``frugallm.spec.SpecConfig`` or None), refused beside a KV policy that compresses."""
        from frugallm.spec import parse_spec

        cfg = parse_spec(spec)
        if cfg is not None and self.kv_spec is not None and self.kv_spec.compresses_cache:
            raise FrugalError(f"spec={cfg} with kv={self.kv_spec}: a compressed KV cache cannot drop the "
                              "keys/values of rejected drafts yet; use one of them")
        return cfg

    def _load_drafts(self, model: str, dtype: Any, device: Any, use_cache: bool, weights: str,
                     pack_weights: bool | None) -> None:
        """At load: the draft models of ``spec=draft:...`` and of SpecKV / SpecPC (``kv=speckv:draft=...``), one
        model when both name the same. ``model``: the target's name, for the vocabulary check's error."""
        from frugallm.spec import check_same_vocab

        self.draft = None
        if self.spec_cfg is not None and self.spec_cfg.method == "draft":
            # Same dtype and weight handling as the target (a GGUF draft runs as stored too), no techniques, unless
            # the spec gives the draft its own weights mode (stored-q8: a cheaper, inexact draft; output unchanged).
            own = self.spec_cfg.weights
            self.draft = type(self)(self.spec_cfg.model, dtype="auto" if own in STORED_MODES else dtype,
                                    device=device, use_cache=use_cache, weights=own or weights,
                                    pack_weights=pack_weights)
            check_same_vocab(self.tokenizer, self.draft.tokenizer, model, self.spec_cfg.model)
        self.kv_draft = None
        if self.kv_spec is not None:
            from frugallm.kv.speckv import attach_draft, draft_name

            name = draft_name(self.kv_spec, self.spec_cfg.model if self.spec_cfg is not None else None)
            if name is not None:
                own = self.draft is not None and name == self.spec_cfg.model
                self.kv_draft = self.draft if own else type(self)(name, dtype=dtype, device=device,
                                                                  use_cache=use_cache, weights=weights,
                                                                  pack_weights=pack_weights)
                check_same_vocab(self.tokenizer, self.kv_draft.tokenizer, model, name)
                attach_draft(self.model, self.kv_draft.model, name, self.kv_draft.kv_dtype)
                attach_draft(self.model, self.kv_draft.model, None, self.kv_draft.kv_dtype)

    def _speculates(self, seqs: list[Sequence]) -> bool:
        """Whether ``_run`` decodes ``seqs`` speculatively: one sequence, no adapters, a request it serves exactly."""
        from frugallm.spec import supports

        return self.spec_cfg is not None and len(seqs) == 1 and self.lora is None and supports(seqs[0].params)

    def _spec_one_by_one(self, seqs: list[Sequence]) -> bool:
        """Whether several prompts decode one after another, each speculatively, rather than batched without
        speculation (the paged engine does not speculate).

        Decode is bound by reading the weights: a batched step of ``B`` rows costs about one step plus
        ``BATCH_ROW_COST`` of it per extra row, and emits ``B`` tokens; a speculative sequence emits
        ``SpecStats.measured_speedup`` tokens per plain step's time (draft time and switched-off stretches
        included). One after another wins when that speedup beats the batch's. Before anything is measured, only
        two prompts go one by one (at worst about 1.9x the batched time, once; the measurement decides after).
        Without batching the static batch would not speculate at all, so then always."""
        if self.spec_cfg is None or not all(self._speculates([s]) for s in seqs):
            return False
        if not self.batching:
            return True
        b = len(seqs)
        if b > SPEC_ONE_BY_ONE_MAX:
            return False
        gain = self.spec_stats.measured_speedup
        return b <= 2 if gain is None else gain > b / (1 + BATCH_ROW_COST * (b - 1))

    def _proposer(self):  # noqa: ANN202 - frugallm.spec.Proposer
        from frugallm.spec import build_proposer

        draft = self.draft
        return build_proposer(
            self.spec_cfg, self.model, kv_dtype=self.kv_dtype,
            draft_model=None if draft is None else draft.model,
            draft_weight_bytes=0 if draft is None else draft.weight_bytes(),
        )

    def _run_spec(self, seq: Sequence, cache: KVCache, logits: torch.Tensor, capacity: int) -> Iterator[list[Sequence]]:
        """``_run``'s speculative rounds for one sequence, from its prefill ``logits [1, vocab]``."""
        from frugallm.spec import SpecDecoder, SpecStats

        proposer = self._proposer()
        proposer.begin(seq.prompt_ids, capacity)
        stats = SpecStats()
        self.last_spec_stats = stats

        def sample_first() -> None:
            seq.append(sample_batch(logits, [seq])[0])

        decoder = SpecDecoder(self.spec_cfg, proposer, stats, gate=self.spec_gate)
        for _ in decoder.run(self.model, cache, seq, self.device, sample_first):
            if seq.finished:
                seq.kv_cache_bytes = cache.nbytes()
                # SpecMemo: what speculation adds to the plain run's memory: the proposer's weights and cache,
                # the target's slots reserved for one round's candidates, the verify pass's logits.
                per_slot = cache.reserved_bytes() // max(capacity, 1)
                stats.memory_bytes = (proposer.memory_bytes() + (self.spec_cfg.k + 1) * per_slot
                                      + (self.spec_cfg.k + 1) * self.config.vocab_size * 4)
                self.spec_stats.merge(stats)
            yield [seq]
