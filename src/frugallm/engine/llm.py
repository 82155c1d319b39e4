"""The public entry point: ``LLM`` loads a model and generates, streams, chats and scores."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Sequence as Seq
from typing import Any

import psutil
import torch

from frugallm import cpu
from frugallm.engine.allocator import tune_malloc
from frugallm.engine.inputs import InputProcessor
from frugallm.engine.sequence import RequestOutput, Sequence
from frugallm.engine.threads import ThreadGovernor, adaptive_threads_enabled
from frugallm.errors import FrugalError, InvalidRequestError
from frugallm.loading import LoadedModel, choose_weights, load_model
from frugallm.model.kv_cache import ContiguousKVCache, KVCache
from frugallm.sampling import SamplingParams, sample_batch
from frugallm.structured import constraint_of

# Several prompts with spec=: at most this many decode one by one speculatively (above, batching wins); the cost of
# each extra row of a decode step relative to the step (weight reads dominate; CPU kernels measured 3-10 %).
SPEC_ONE_BY_ONE_MAX, BATCH_ROW_COST = 4, 0.05

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FrugalError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FrugalError("device cuda requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # CUDA: bf16 (no fp16 overflow risk, same speed). CPU: bf16 where frugallm's native bf16 kernel
        # runs (AVX512-BF16; the fastest decode there: 122.6 vs 109.6 tok/s for fp16), else fp16, whose
        # matrix-vector products (decode) stream weights ~2x faster than bf16 through F.linear; large
        # matmuls switch to the CPU's fast compute dtype inside Linear (see LLM.__init__).
        if device.type == "cpu":
            from frugallm.model import packed

            return torch.bfloat16 if packed.backend(2) == "native" else torch.float16
        return torch.bfloat16
    if dtype not in _DTYPES:
        raise FrugalError(f"unknown dtype {dtype!r}; choices: auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


class LLM:
    """Load a model (``"default"``, a ``.gguf`` path or a Hugging Face folder) and run it.

    >>> llm = LLM("default", dtype="float32", device="cpu")
    >>> llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))[0].text
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = "default",
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        max_model_len: int | None = None,
        use_cache: bool = True,
        progress: bool = False,
        threads: int | None = None,
        quant: str | None = None,
        kv: str | None = None,
        calib: str | None = None,
        batching: bool = True,
        compile: bool = False,
        pack_weights: bool | None = None,
        weights: str = "auto",
        lora: Mapping[str, str | os.PathLike[str]] | None = None,
        max_loras: int | None = None,
        max_lora_rank: int = 16,
        spec: str | None = None,
    ) -> None:
        """``quant``: weight quantization spec (``int4:group=32``, ``gptq:bits=4``, see ``frugallm.quant``);
        ``kv``: KV-cache policy spec (``snapkv:budget=0.25+kivi:bits=2``, see ``frugallm.kv``);
        ``calib``: calibration text file for methods that need one (default: the built-in corpus);
        ``batching``: run multi-prompt ``generate`` calls through the continuous-batching engine;
        ``compile``: ``torch.compile`` the decode step's layers (``compile_seconds`` records the cost);
        ``pack_weights``: bf16 CPU linears on packed copies (faster, +1x those weights' memory); None =
        when the copies take at most a quarter of the free memory;
        ``weights``: ``auto`` runs a GGUF's quantized weights as stored on CPU when ``dtype="auto"`` and no
        ``quant=`` (bf16 activations where the CPU has AVX512-BF16, else fp32; see ``loading.choose_weights``;
        ``llm.model.decode_dtype = torch.float32`` decodes in fp32), ``stored`` forces that, ``dequantize``
        converts them to ``dtype``. ``self.weights`` / ``source_info["weights_reason"]`` say what was done;
        ``lora``: PEFT adapters ``{name: folder}`` (LoRA / rsLoRA / DoRA) run beside the weights, chosen per prompt
        by ``generate(..., lora=name)``; ``max_loras`` of them stay loaded (LRU, default 4), ranks <= ``max_lora_rank``
        (default 16); ``spec``: speculative decoding (``ngram:k=8``, ``draft:model=qwen2.5-coder-0.5b:k=4``,
        ``self:layers=8``, see ``frugallm.spec``) for single-sequence generation: greedy output is the target's,
        sampled output follows the target's distribution; ``spec_stats`` accumulates acceptance and timing."""
        if threads is not None:
            if not isinstance(threads, int) or not 1 <= threads <= 4096:
                raise FrugalError(f"threads must be in [1, 4096], got {threads}")
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        # torch's default thread count drops while other processes crowd the cores (engine/threads.py: 10x and
        # more at 2 cores); an explicit ``threads`` is kept as given.
        self.governor = (ThreadGovernor(torch.get_num_threads())
                         if threads is None and self.device.type == "cpu" and adaptive_threads_enabled() else None)
        self.weights, weights_reason = choose_weights(model, weights, dtype, self.device, quant=bool(quant))
        # As stored, weights and norms stay fp32 and the GGUF kernel accumulates in fp32; decode activations are
        # bf16 where the CPU has AVX512-BF16 (exact code x bf16 products, see below), else fp32.
        self.dtype = torch.float32 if self.weights == "stored" else resolve_dtype(dtype, self.device)
        if self.device.type == "cpu":
            tune_malloc()
        # Parse technique specs before the (slow) load so a typo fails at once.
        self.quant_spec = None
        if quant:
            from frugallm.quant import parse_quant_spec

            self.quant_spec = parse_quant_spec(quant)
        self.kv_spec = None
        if kv:
            from frugallm.kv import parse_kv_spec

            self.kv_spec = parse_kv_spec(kv)
        from frugallm.spec import SpecStats, parse_spec

        self.spec_cfg = parse_spec(spec)
        if self.spec_cfg is not None and self.kv_spec is not None and self.kv_spec.compresses_cache:
            raise FrugalError(f"spec={self.spec_cfg} with kv={self.kv_spec}: a compressed KV cache cannot drop the "
                              "keys/values of rejected drafts yet; use one of them")
        self.spec_stats = SpecStats()  # every speculative run so far
        self.spec_gate: Callable[[], bool] | None = None  # False: plain steps for now (a busy server)
        self.last_spec_stats: SpecStats | None = None
        loaded: LoadedModel = load_model(
            model, self.dtype, self.device, weights=self.weights, use_cache=use_cache, progress=progress
        )
        loaded.source_info.update(weights=self.weights, weights_reason=weights_reason)
        self.loaded = loaded
        self.model = loaded.model
        # KV cache dtype: on CPU, half-precision caches make decode attention slow (see Attention), so
        # half models keep fp32 keys/values there; KV policies that quantize shrink them anyway.
        self.batching = batching
        self.kv_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        if self.device.type == "cpu" and (self.dtype == torch.float16 or self.weights == "stored"):
            # Prefill is compute bound: bf16 where the CPU multiplies it natively (AVX512-BF16 / AMX), else
            # fp32 (fp16 and emulated bf16 matmuls run at ~1.5 GFLOP/s on an AVX2 CPU, fp32 at 60-88).
            # Weights run as stored are dequantized to this dtype per prefill pass (GGUFLinear).
            self.model.prefill_dtype = torch.bfloat16 if cpu.fast_bf16() else torch.float32
        if self.device.type == "cpu" and self.weights == "stored" and cpu.fast_bf16():
            # Decode in bf16 too: the kernel multiplies the codes with the bf16 activations in vdpbf16ps (exact
            # products, fp32 sums; Q4_K / Q6_K 1.2-1.6x its fp32-activation path at one row); the rest of the
            # step runs as a bf16 model's. ``model.decode_dtype = torch.float32`` restores the fp32 path.
            self.model.decode_dtype = torch.bfloat16
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = min(
            max_model_len or loaded.config.max_position_embeddings, loaded.config.max_position_embeddings
        )
        self._next_id = 0
        self.lora = None  # LoraManager: adapter slots beside every projection (GPTQ calibration already decodes)
        self.inputs = InputProcessor(self.tokenizer, self.config.vocab_size, self.max_model_len)
        stored = loaded.source_info.get("quant_spec") if loaded.source_format == "quantized" else None
        if stored is not None:
            if self.quant_spec is not None:
                raise FrugalError(f"{loaded.path} is already quantized ({stored}); drop quant=")
            from frugallm.quant import parse_quant_spec

            self.quant_spec = parse_quant_spec(stored)
        elif self.quant_spec is not None:
            self._quantize(calib)
        if self.quant_spec is not None and self.device.type == "cpu" and self.dtype != torch.float32:
            from frugallm.quant.kernels import compute_dtype

            # Quantized matmuls take bf16 inputs on CPU: decoding in that dtype saves two casts per
            # projection (4 per layer), a large share of a batch-1 decode step.
            self.model.decode_dtype = compute_dtype(self.device, self.dtype)
        if self.device.type == "cpu":
            pack = self.model.set_packing(pack_weights is not False)
            if pack and pack_weights is None and pack > psutil.virtual_memory().available // 4:
                self.model.set_packing(False)
        if lora or max_loras:
            self._add_lora_slots(lora or {}, max_loras or 4, max_lora_rank)
        self.compile_seconds: float | None = None
        if compile:
            self._compile()
        self.draft: LLM | None = None
        if self.spec_cfg is not None and self.spec_cfg.method == "draft":
            from frugallm.spec import check_same_vocab

            # Same dtype and weight handling as the target (a GGUF draft runs as stored too), no techniques.
            self.draft = LLM(self.spec_cfg.model, dtype=dtype, device=device, use_cache=use_cache,
                             weights=weights, pack_weights=pack_weights)
            check_same_vocab(self.tokenizer, self.draft.tokenizer, str(model), self.spec_cfg.model)
        self.kv_draft: LLM | None = None  # the draft model of SpecKV / SpecPC (kv=speckv:draft=...)
        if self.kv_spec is not None:
            from frugallm.kv.speckv import attach_draft, draft_name
            from frugallm.spec import check_same_vocab

            name = draft_name(self.kv_spec, self.spec_cfg.model if self.spec_cfg is not None else None)
            if name is not None:
                own = self.draft is not None and name == self.spec_cfg.model
                self.kv_draft = self.draft if own else LLM(name, dtype=dtype, device=device, use_cache=use_cache,
                                                           weights=weights, pack_weights=pack_weights)
                check_same_vocab(self.tokenizer, self.kv_draft.tokenizer, str(model), name)
                attach_draft(self.model, self.kv_draft.model, name, self.kv_draft.kv_dtype)
                attach_draft(self.model, self.kv_draft.model, None, self.kv_draft.kv_dtype)

    def set_spec(self, spec: str | None) -> None:
        """Turn speculative decoding on (or off with None) after loading, as ``LLM(spec=...)`` would (``serve``
        loads its model without techniques, then calls this)."""
        from frugallm.spec import check_same_vocab, parse_spec

        cfg = parse_spec(spec)
        if cfg is not None and self.kv_spec is not None and self.kv_spec.compresses_cache:
            raise FrugalError(f"spec={cfg} with kv={self.kv_spec}: a compressed KV cache cannot drop the "
                              "keys/values of rejected drafts yet; use one of them")
        self.draft = None
        if cfg is not None and cfg.method == "draft":
            # A target run as stored takes a GGUF draft as stored too; otherwise the target's dtype.
            self.draft = LLM(cfg.model, dtype="auto" if self.weights == "stored" else self.dtype, device=self.device)
            check_same_vocab(self.tokenizer, self.draft.tokenizer, str(self.loaded.path), cfg.model)
        self.spec_cfg = cfg

    def _compile(self) -> None:
        """Compile the decode step now (one dummy step), timing it; inductor caches the result on disk."""
        from frugallm.paths import cache_dir

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
        self.model.compile_decode()
        t0 = time.perf_counter()
        with torch.inference_mode():
            one = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self.model(one, one, self.make_cache(1, 2))
        self.compile_seconds = time.perf_counter() - t0

    def _add_lora_slots(self, adapters: Mapping[str, Any], max_loras: int, max_lora_rank: int) -> None:
        from frugallm.lora import LoraManager

        if not isinstance(adapters, Mapping):
            raise FrugalError(f"lora must be a mapping {{name: adapter folder}}, got {type(adapters).__name__}")
        # Adapters compute in the decode activations' dtype (bf16 for half and as-stored CPU models).
        dtype = self.model.decode_dtype or self.dtype
        self.lora = LoraManager(self.model, self.config, max_loras, max_lora_rank,
                                torch.bfloat16 if dtype == torch.float16 else dtype)
        for name, path in adapters.items():
            self.lora.add(name, path)

    def _lora_request(self, name: str | None) -> Any:
        if name is None:
            return None
        if self.lora is None:
            raise InvalidRequestError(f"LoRA adapter {name!r} requested, but this LLM has none (LLM(lora=...))")
        return self.lora.get(name)

    def _set_lora(self, seqs: list[Sequence], lora: str | Seq[str | None] | None) -> None:
        """Give each sequence its LoRA adapter: one name for all, or one (or None) per prompt."""
        if lora is None:
            return
        names = [lora] * len(seqs) if isinstance(lora, str) else list(lora)
        if len(names) != len(seqs):
            raise InvalidRequestError(f"{len(seqs)} prompts but {len(names)} LoRA adapter names")
        for s, name in zip(seqs, names, strict=True):
            s.lora = self._lora_request(name)

    def _bind_lora(self, seqs: list[Sequence], tokens: int) -> None:
        if self.lora is not None:
            self.lora.bind([s.lora for s in seqs], tokens)

    def _quantize(self, calib: str | None) -> None:
        from frugallm.quant import quantize_model

        run_calib = None
        if self.quant_spec.method == "gptq":
            from frugallm.corpus import load_corpus
            from frugallm.quant.calibrate import StopCalibration

            # The corpus tail: quality evaluation (lab/quality.py) scores windows from the start of the same
            # built-in corpus, so calibrating on its head would evaluate GPTQ on its calibration tokens.
            ids = self.tokenizer.encode(load_corpus(calib)[-200_000:])
            windows = [ids[i : i + 256] for i in range(0, min(len(ids), 16 * 256) - 255, 256)]

            def run_calib() -> None:
                for w in windows:
                    with contextlib.suppress(StopCalibration):  # the block being calibrated was reached
                        self.score(w)

            run_calib.stops_early = True  # type: ignore[attr-defined]

        quantize_model(self.model, self.quant_spec, calib=run_calib)

    # -- helpers --------------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """Bytes of all weights as stored (packed codes, scales, ...), tied tensors counted once."""
        seen: set[int] = set()
        total = 0
        for t in (*self.model.parameters(), *self.model.buffers()):
            if t is not None and t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

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

    def _sequences(
        self, prompts: str | Seq[Any], params: SamplingParams | Seq[SamplingParams] | None
    ) -> list[Sequence]:
        if isinstance(prompts, str) or (isinstance(prompts, Seq) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise InvalidRequestError("no prompts given")
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        seqs = []
        reqs = [self.inputs.process(p, sp) for p, sp in zip(prompts, plist, strict=True)]  # all valid, then run
        for r in reqs:
            seqs.append(Sequence(self._next_id, r.prompt, r.prompt_ids, r.params, self.tokenizer, self.max_model_len))
            self._next_id += 1
        return seqs

    # -- the generation loop --------------------------------------------------------------------
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

    def _run_spec(self, seq: Sequence, cache: KVCache, logits: torch.Tensor, capacity: int) -> Iterator[list[Sequence]]:
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

    def _output(self, seq: Sequence) -> RequestOutput:
        out = seq.output()
        if self.last_spec_stats is not None and self._speculates([seq]):
            out.metrics.update(self.last_spec_stats.as_dict())  # type: ignore[arg-type]
        return out

    # -- public API -----------------------------------------------------------------------------
    def generate(
        self, prompts: str | Seq[Any], params: SamplingParams | Seq[SamplingParams] | None = None,
        lora: str | Seq[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one or many prompts (strings or token-id lists); one output per prompt. ``lora``: the
        adapter name for every prompt, or one name (or None) per prompt."""
        seqs = self._sequences(prompts, params)
        self._set_lora(seqs, lora)
        # Prompt logprobs and structured output are computed by the paged engine.
        wants_engine = any(s.params.prompt_logprobs is not None or constraint_of(s.params) for s in seqs)
        self._check_constrainable(seqs)
        if len(seqs) > 1 and not wants_engine and self._spec_one_by_one(seqs):
            outs = []
            for s in seqs:  # each prompt alone, speculatively
                for _ in self._run([s]):
                    pass
                outs.append(self._output(s))
            return outs
        if (len(seqs) > 1 or wants_engine) and self.batching and self._kv_pages():
            # Continuous batching over a paged KV cache (KV policies other than kv.paged_names() still use the
            # static batch; spec= batches decode without speculation: it pays at batch 1, see frugallm.spec).
            from frugallm.engine.llm_engine import generate_batched

            outs = generate_batched(self, [s.prompt_ids for s in seqs], [s.params for s in seqs],
                                    loras=[s.lora for s in seqs])
            for s, o in zip(seqs, outs, strict=True):
                o.prompt, o.request_id = s.prompt, s.request_id
            return outs
        for _ in self._run(seqs):
            pass
        return [self._output(s) for s in seqs]

    def _kv_pages(self) -> bool:
        """Whether the paged engine runs this LLM's KV policy (none, or one of ``kv.paged_names()``)."""
        if self.kv_spec is None:
            return True
        from frugallm.kv import KVSpecError, paged_policy

        try:
            paged_policy(self.kv_spec)
        except KVSpecError:
            return False
        return True

    def stream(self, prompt: str | Seq[int], params: SamplingParams | None = None,
               lora: str | None = None) -> Iterator[str]:
        """Yield text deltas for one prompt as tokens are generated."""
        (seq,) = self._sequences([prompt] if isinstance(prompt, str) else [list(prompt)], params)
        self._set_lora([seq], lora)
        if constraint_of(seq.params):  # structured output: token masks live in the paged engine's step
            self._check_constrainable([seq])
            from frugallm.engine.llm_engine import LLMEngine, batch_config

            engine = LLMEngine(self, batch_config(self, [seq.prompt_ids], [seq.params]))
            rid = engine.add_request(seq.prompt_ids, seq.params, lora=seq.lora)
            seq = engine.requests[rid].seqs[0]
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.text:
                        yield out.text
            self.last_output = seq.output()
            return
        for _ in self._run([seq]):
            delta = seq.take_delta()
            if delta:
                yield delta
        self.last_output = self._output(seq)

    def _check_constrainable(self, seqs: list[Sequence]) -> None:
        """Structured output runs in the paged engine only: refuse it where the static loop would run (and
        silently drop the constraint)."""
        if any(constraint_of(s.params) for s in seqs) and not (self.batching and self._kv_pages()):
            why = f"kv={self.kv_spec} (a policy the paged engine does not run)" if self.batching else "batching=False"
            raise InvalidRequestError(f"json_schema / grammar need the batching engine, which {why} turns off",
                                      "json_schema")

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def chat(
        self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation (or a list of them) and generate."""
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        return self.generate([self.chat_prompt(c) for c in convs], params)

    @torch.inference_mode()
    def score(self, token_ids: Seq[int], lora: str | None = None) -> torch.Tensor:
        """Teacher-forced next-token logits ``[len(token_ids), vocab]`` (fp32) for one sequence."""
        ids = [int(i) for i in token_ids]
        if not ids:
            raise InvalidRequestError("token_ids is empty")
        if len(ids) > self.max_model_len:
            raise InvalidRequestError(f"{len(ids)} tokens exceed the context window of {self.max_model_len}")
        x = torch.tensor([ids], device=self.device)
        pos = torch.arange(len(ids), device=self.device)[None]
        cache = self.make_cache(1, len(ids))
        if self.lora is not None:
            self.lora.bind([self._lora_request(lora)], len(ids))
        elif lora is not None:
            self._lora_request(lora)  # raises: no adapters
        return self.model(x, pos, cache, "all")[0]
