"""The public entry point: ``LLM`` loads a model and generates, streams, chats and scores.

A thin front: the load-time choices are plain functions in ``model_setup.py``; generation runs on the paged engine's
loop (``llm_engine.py``: several prompts batched, one prompt alone on a pool sized to it, ``_on_engine``); KV policies
and speculative decoding of one prompt run on ``SoloRunner`` (``solo.py``, ``LLM``'s base class; which and why there).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Sequence as Seq
from typing import Any

import torch

from frugallm.engine.allocator import tune_malloc
from frugallm.engine.inputs import InputProcessor
from frugallm.engine.model_setup import (
    compile_decode,
    lora_slots,
    quantize,
    resolve_device,
    resolve_dtype,
    set_cpu_dtypes,
    set_packing,
)
from frugallm.engine.sequence import RequestOutput, Sequence
from frugallm.engine.solo import SoloRunner
from frugallm.engine.threads import ThreadGovernor, adaptive_threads_enabled
from frugallm.errors import FrugalError, InvalidRequestError
from frugallm.loading import STORED_MODES, LoadedModel, choose_weights, load_model
from frugallm.sampling import SamplingParams
from frugallm.structured import constraint_of

__all__ = ["LLM", "resolve_device", "resolve_dtype"]  # the dtype / device choices, for callers that load elsewhere


class LLM(SoloRunner):
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
        ``batching``: run ``generate`` / ``stream`` through the continuous-batching engine (False: the contiguous
        loop, several prompts as one static batch);
        ``compile``: ``torch.compile`` the decode step's layers (``compile_seconds`` records the cost);
        ``pack_weights``: bf16 CPU linears on packed copies (faster, +1x those weights' memory); None =
        when the copies take at most a quarter of the free memory;
        ``weights``: ``auto`` runs a GGUF's quantized weights as stored on CPU when ``dtype="auto"`` and no
        ``quant=`` (bf16 activations where the CPU has AVX512-BF16, else fp32; see ``loading.choose_weights``;
        ``llm.model.decode_dtype = torch.float32`` decodes in fp32), ``stored`` forces that, ``stored-q8``
        also quantizes decode activations to int8 per 32 values (llama.cpp's arithmetic: faster, not exact),
        ``dequantize`` converts them to ``dtype``. ``self.weights`` / ``source_info["weights_reason"]`` say what
        was done;
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
        self.dtype = torch.float32 if self.weights in STORED_MODES else resolve_dtype(dtype, self.device)
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
        from frugallm.spec import SpecStats

        self.spec_cfg = self._spec_config(spec)
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
        if self.device.type == "cpu":
            set_cpu_dtypes(self.model, self.dtype, self.weights)
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
            quantize(self.model, self.quant_spec, self.tokenizer, self.score, calib)
        if self.quant_spec is not None and self.device.type == "cpu" and self.dtype != torch.float32:
            from frugallm.quant.kernels import compute_dtype

            # Quantized matmuls take bf16 inputs on CPU: decoding in that dtype saves two casts per
            # projection (4 per layer), a large share of a batch-1 decode step.
            self.model.decode_dtype = compute_dtype(self.device, self.dtype)
        if self.device.type == "cpu":
            set_packing(self.model, pack_weights)
        if lora or max_loras:
            self.lora = lora_slots(self.model, self.config, self.dtype, lora or {}, max_loras or 4, max_lora_rank)
        self.compile_seconds = compile_decode(self.model, self.device, self.make_cache) if compile else None
        self._load_drafts(str(model), dtype, device, use_cache, weights, pack_weights)

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
        if self._one_loop(seqs):
            for _ in self._on_engine(seqs[0]):
                pass
            return [self.last_output]
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
            from frugallm.engine.batched import generate_batched

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
        self._check_constrainable([seq])
        if self._one_loop([seq]) or constraint_of(seq.params):  # structured output: token masks in the engine's step
            yield from self._on_engine(seq)
            return
        for _ in self._run([seq]):
            delta = seq.take_delta()
            if delta:
                yield delta
        self.last_output = self._output(seq)

    def _one_loop(self, seqs: list[Sequence]) -> bool:
        """Whether ``seqs`` run on the paged engine's loop as one stream: one prompt, batching on, no KV policy and
        no speculation (those stay on ``SoloRunner._run``: see ``solo.py``)."""
        return len(seqs) == 1 and self.batching and self.kv_spec is None and not self._speculates(seqs)

    def _on_engine(self, seq: Sequence) -> Iterator[str]:
        """One prompt on a paged engine sized to it (``LLMEngine.step``, the loop batches run on): yields its text
        deltas as tokens come; ``self.last_output`` then holds its output. Without a KV policy the pool keeps the
        single-stream loop's fp32 keys/values (``exact_kv``) and its ``kv_cache_bytes`` counts the slots holding
        tokens, as ``KVCache.nbytes`` does, not the blocks held."""
        from frugallm.engine.batched import batch_config
        from frugallm.engine.llm_engine import LLMEngine

        exact = self.kv_spec is None
        engine = LLMEngine(self, batch_config(self, [seq.prompt_ids], [seq.params], exact_kv=exact))
        rid = engine.add_request(seq.prompt_ids, seq.params, lora=seq.lora, arrival_time=seq.t_start)
        done = engine.requests[rid].seqs[0]
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.text:
                    yield out.text
        if exact:  # every token but the last sampled one has its keys/values in the cache
            done.kv_cache_bytes = (done.num_tokens - 1) * engine.cache.bytes_per_block // engine.cache.block_size
        out = done.output()
        out.prompt, out.request_id = seq.prompt, seq.request_id
        self.last_output = out

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
