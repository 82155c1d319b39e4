"""Backends that ``frugallm bench`` drives on the same token ids: frugallm itself and its peers.

A backend is a :class:`Runner`: it loads a model once, then ``generate(prompts, gen_len)`` runs one
static batch greedily for exactly ``gen_len`` tokens and returns per-request timings. Capability flags
(``can_score``, ``kv_reason``) say what a backend cannot report, so the bench never special-cases
backend types.

* ``frugallm``: :class:`frugallm.LLM` (``quant=`` / ``kv=`` / ``spec=`` passed through only when given).
* ``transformers``: Hugging Face ``AutoModelForCausalLM`` (a GGUF is dequantized to fp32 by
  transformers). TTFT is a separate ``generate(max_new_tokens=1)``; TPOT = (e2e - ttft) / (G - 1).
* ``llama.cpp``: ``llama-cpp-python`` (optional extra ``frugallm[llamacpp]``), GGUF only, one sequence
  at a time (its high-level API has no static batch); TTFT = time to the first streamed chunk.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from frugallm.config import ModelConfig
from frugallm.errors import FrugalError
from frugallm.tokenizer.tokenizer import Tokenizer

LLAMA_CPP_MISSING = "llama-cpp-python is not installed: pip install 'frugallm[llamacpp]'"
TRANSFORMERS_MISSING = "transformers is not installed: pip install transformers accelerate"

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# ------------------------------------------------------------------------------------------ model files


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or half-imported package counts as absent
        return False


def load_model_config(model: str | Path) -> ModelConfig:
    """The config of a model without its weights: ``default``, a ``.gguf``, a HF folder or a JSON config.

    Cached per file version: parsing a GGUF's metadata takes seconds (its vocabulary is in it).
    """
    from frugallm.loading import resolve_model_path

    path = resolve_model_path(str(model)).resolve()
    st = path.stat()
    return _config_of(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _config_of(path: Path, mtime_ns: int, size: int) -> ModelConfig:
    if path.suffix.lower() == ".json":
        return ModelConfig.from_json_file(path)
    from frugallm.loading import describe

    return describe(path).config


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: Path) -> Tokenizer:
    """frugallm's tokenizer of a model (so every backend gets the same token ids)."""
    from frugallm.loading import describe

    return describe(path).tokenizer()


# ------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RequestTiming:
    """One request of a batch. ``tpot_s`` is None when fewer than two tokens were generated."""

    ttft_s: float
    tpot_s: float | None
    e2e_s: float
    output_tokens: int


@dataclass(frozen=True)
class BatchResult:
    requests: list[RequestTiming]
    wall_s: float  # the generation run that produced all output tokens (throughput denominator)
    kv_cache_bytes: int | None  # whole batch, measured from the cache storage; None: see Runner.kv_reason


class Runner:
    """A loaded model of one backend. Subclasses set the attributes below in ``__init__``."""

    source_quantization: str | None = None  # the file's own quantization (see :func:`source_quantization`)

    backend: ClassVar[str] = ""
    can_score: ClassVar[bool] = False  # score(ids) gives teacher-forced logits (for quality)
    score_reason: ClassVar[str] = ""  # why not, when can_score is False
    kv_reason: ClassVar[str] = ""  # why kv_cache_bytes is None, when it is
    notes: ClassVar[tuple[str, ...]] = ()  # caveats recorded with every result of this backend
    kv_bits: ClassVar[int | None] = None  # K/V element bits when kv_cache_bytes is unknown (roofline)

    config: ModelConfig
    tokenizer: Tokenizer
    path: Path
    dtype: str  # "float32" | "float16" | "bfloat16" | "gguf" (llama.cpp runs the file's own types)
    device: str
    load_s: float

    @classmethod
    def missing(cls) -> str | None:
        """Why this backend cannot run here (an optional package is absent), or None."""
        return None

    def weight_bytes(self) -> int:
        raise NotImplementedError

    def take_spec_stats(self) -> Any:
        """Speculative-decoding counters of the runs since the last call; None: this runner does not speculate."""
        return None

    def speculation_off(self) -> contextlib.AbstractContextManager[None]:
        """A context in which ``generate`` decodes without speculation (a no-op where there is none)."""
        return contextlib.nullcontext()

    def compute_dtype(self, tokens: int) -> str:
        """The dtype (a ``dtype`` name) that a forward pass over ``tokens`` tokens of the whole batch
        multiplies in. The roofline bounds each phase by that dtype's peak, so MFU is only right if this
        is what really runs; by default the weights' dtype."""
        return self.dtype

    def generate(self, prompts: list[list[int]], gen_len: int) -> BatchResult:
        """Greedy, exactly ``gen_len`` new tokens per prompt (EOS ignored)."""
        raise NotImplementedError

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Teacher-forced logits ``[len(token_ids), vocab]`` (fp32)."""
        raise NotImplementedError(self.score_reason)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def close(self) -> None:
        """Drop the model so the next one can be loaded in the same memory."""
        for attr in ("llm", "model"):
            if hasattr(self, attr):
                setattr(self, attr, None)


_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


def source_quantization(loaded: Any) -> str | None:
    """How the model file's weights were already quantized, e.g. ``"GGUF Q4_1 67% + Q8_0 31%"`` (shares of the
    tensor bytes), or None for float weights. ``--quant`` on such a file re-quantizes quantized weights, and the
    fp32 reference is that file dequantized, not the original model."""
    if loaded.source_format == "quantized":
        return f"frugallm quantized folder ({loaded.source_info.get('quant_spec')})"
    types = loaded.source_info.get("tensor_type_bytes") or {}
    quant = {k: v for k, v in types.items() if k.upper() not in _FLOAT_TYPES}
    if not quant:
        return None
    total = sum(types.values())
    parts = sorted(quant.items(), key=lambda kv: -kv[1])
    return f"{loaded.source_format.upper()} " + " + ".join(f"{k} {v / total:.0%}" for k, v in parts)


class FrugalRunner(Runner):
    backend = "frugallm"
    can_score = True

    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", threads: int | None = None,
                 quant: str | None = None, kv: str | None = None, use_cache: bool = True,
                 spec: str | None = None, weights: str = "auto") -> None:
        from frugallm import LLM

        extra: dict[str, Any] = {} if weights == "auto" else {"weights": weights}
        if quant:
            extra["quant"] = quant
        if kv:
            extra["kv"] = kv
        if spec:
            extra["spec"] = spec
        t0 = time.perf_counter()
        try:
            self.llm = LLM(model, dtype=dtype, device=device, threads=threads, use_cache=use_cache, **extra)
        except TypeError as e:
            if extra and "unexpected keyword" in str(e):
                raise FrugalError(f"this frugallm build does not support {'/'.join(extra)} options yet: {e}") from None
            raise
        self.load_s = time.perf_counter() - t0
        self.config, self.tokenizer = self.llm.config, self.llm.tokenizer
        self.path = Path(self.llm.loaded.path)
        self.source_quantization = source_quantization(self.llm.loaded)
        self.dtype = _DTYPE_NAMES.get(self.llm.dtype, str(self.llm.dtype))
        self.device = str(self.llm.device)

    def weight_bytes(self) -> int:
        return int(self.llm.weight_bytes())

    def take_spec_stats(self) -> Any:
        """The ``frugallm.spec.SpecStats`` of the runs since the last call (None without ``spec=``)."""
        from frugallm.spec import SpecStats

        if self.llm.spec_cfg is None:
            return None
        stats, self.llm.spec_stats = self.llm.spec_stats, SpecStats()
        return stats

    @contextlib.contextmanager
    def speculation_off(self) -> Iterator[None]:
        """Decode without ``spec=`` for a while: the same loaded model (and draft) as the speculative runs."""
        cfg, self.llm.spec_cfg = self.llm.spec_cfg, None
        try:
            yield
        finally:
            self.llm.spec_cfg = cfg

    def compute_dtype(self, tokens: int) -> str:
        """What ``Transformer.forward`` picks: ``prefill_dtype`` from ``PREFILL_MIN_TOKENS`` tokens on (CPU fp16
        models: bf16 where the CPU multiplies it natively, else fp32), ``decode_dtype`` below, else the
        weights' dtype; quantized CPU matmuls then run in ``quant.kernels.compute_dtype`` of that."""
        from frugallm.model.llama import PREFILL_MIN_TOKENS

        model = self.llm.model
        act = (model.prefill_dtype if tokens >= PREFILL_MIN_TOKENS else model.decode_dtype) or self.llm.dtype
        if self.llm.quant_spec is not None:
            from frugallm.quant.kernels import compute_dtype

            act = compute_dtype(self.llm.device, act)
        return _DTYPE_NAMES.get(act, str(act))

    def generate(self, prompts: list[list[int]], gen_len: int) -> BatchResult:
        from frugallm import SamplingParams

        params = SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params)
        wall = time.perf_counter() - t0
        reqs = [RequestTiming(o.metrics["ttft_s"], o.metrics.get("tpot_s"), o.metrics["e2e_s"],
                              len(o.token_ids)) for o in outs]
        kv = outs[0].metrics.get("kv_cache_bytes")
        return BatchResult(reqs, wall, None if kv is None else int(kv))

    def score(self, token_ids: list[int]) -> torch.Tensor:
        return self.llm.score(token_ids).float()


def _cache_nbytes(cache: Any) -> int | None:
    """Bytes held by a transformers cache (DynamicCache with ``.layers``, or legacy tuples)."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    tensors: list[Any] = []
    if layers is not None:
        for layer in layers:
            tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    elif isinstance(cache, (tuple, list)):
        for kv in cache:
            tensors += list(kv)
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors) if tensors else None


class TransformersRunner(Runner):
    backend = "transformers"
    can_score = True
    notes = ("transformers: TTFT is a separate generate(max_new_tokens=1) run; "
             "TPOT = (e2e - ttft) / (gen_len - 1)",)

    @classmethod
    def missing(cls) -> str | None:
        return None if _importable("transformers") else TRANSFORMERS_MISSING

    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", threads: int | None = None) -> None:
        try:
            import transformers
        except ImportError:
            raise FrugalError(TRANSFORMERS_MISSING) from None
        from frugallm.engine.llm import resolve_device, resolve_dtype
        from frugallm.loading import resolve_model_path

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        dev = resolve_device(device)
        # transformers dequantizes a GGUF to fp32; "auto" keeps that rather than frugallm's CPU fp16.
        tdtype = torch.float32 if dtype == "auto" else resolve_dtype(dtype, dev)
        self.path = resolve_model_path(model)
        t0 = time.perf_counter()
        if self.path.is_dir():
            m = transformers.AutoModelForCausalLM.from_pretrained(str(self.path), dtype=tdtype)
        else:
            m = transformers.AutoModelForCausalLM.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                                  dtype=tdtype)
        self.model = m.to(dev).eval()
        self.load_s = time.perf_counter() - t0
        self.config = load_model_config(self.path)
        self.tokenizer = load_tokenizer(self.path)
        self.dtype, self.device = _DTYPE_NAMES.get(tdtype, str(tdtype)), str(dev)
        self._pad = next(iter(self.tokenizer.eos_ids), 0)

    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for t in (*self.model.parameters(), *self.model.buffers()):
            if t.data_ptr() not in seen:  # tied embeddings share storage
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    @torch.inference_mode()
    def _gen(self, ids: torch.Tensor, n: int, with_cache: bool = False) -> tuple[float, Any]:
        self.sync()
        t0 = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=self._pad, return_dict_in_generate=with_cache)
        self.sync()
        return time.perf_counter() - t0, out

    def generate(self, prompts: list[list[int]], gen_len: int) -> BatchResult:
        lens = {len(p) for p in prompts}
        if len(lens) != 1:
            raise FrugalError("transformers backend: prompts of one batch must have the same length")
        ids = torch.tensor(prompts, device=self.device)
        ttft, _ = self._gen(ids, 1)
        e2e, out = self._gen(ids, gen_len, with_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        tpot = (e2e - ttft) / (gen_len - 1) if gen_len > 1 else None
        n_out = int(out.sequences.shape[1]) - ids.shape[1]
        return BatchResult([RequestTiming(ttft, tpot, e2e, n_out) for _ in prompts], e2e, _cache_nbytes(cache))

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        x = torch.tensor([token_ids], device=self.device)
        return self.model(x).logits[0].float()


class LlamaCppRunner(Runner):
    """llama-cpp-python (optional extra), through its high-level API (``Llama``,
    ``create_completion(stream=True)``). Tested when the package is installed; skipped otherwise."""

    backend = "llama.cpp"
    score_reason = "llama.cpp backend: logits_all=False (teacher-forced logits are not kept)"
    kv_reason = "llama-cpp-python does not expose its KV-cache size"
    kv_bits = 16  # llama.cpp's default f16 K/V cache
    notes = ("llama.cpp: the high-level API runs one sequence at a time, so a batch runs sequentially",
             "llama.cpp: weight_bytes is the GGUF file size (weights run in their stored types)")

    @classmethod
    def missing(cls) -> str | None:
        return None if _importable("llama_cpp") else LLAMA_CPP_MISSING

    def __init__(self, model: str, threads: int | None = None, n_ctx: int = 2048, device: str = "cpu") -> None:
        try:
            import llama_cpp
        except ImportError:
            raise FrugalError(LLAMA_CPP_MISSING) from None
        from frugallm.loading import resolve_model_path

        self.path = resolve_model_path(model)
        if self.path.is_dir():
            raise FrugalError(f"llama.cpp backend needs a .gguf model, got the folder {self.path}")
        n_gpu = -1 if device.startswith("cuda") else 0
        t0 = time.perf_counter()
        n_threads = threads or torch.get_num_threads()  # the same thread count as the other backends,
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=n_threads,  # prefill too
                                   n_threads_batch=n_threads, n_batch=512, n_gpu_layers=n_gpu, logits_all=False,
                                   verbose=False)
        self.load_s = time.perf_counter() - t0
        self.config = load_model_config(self.path)
        self.tokenizer = load_tokenizer(self.path)
        self.dtype, self.device = "gguf", "cuda" if n_gpu else "cpu"
        # min_new_tokens does not exist in llama.cpp: forbid EOS so every request yields gen_len tokens.
        self._no_eos = {int(self.llm.token_eos()): -1e9}

    def weight_bytes(self) -> int:
        return self.path.stat().st_size

    def generate(self, prompts: list[list[int]], gen_len: int) -> BatchResult:
        reqs = []
        start = time.perf_counter()
        for ids in prompts:
            self.llm.reset()  # forget the previous prompt, or its prefix cache would skip the prefill
            t0 = time.perf_counter()
            first, last, chunks = None, t0, 0
            for chunk in self.llm.create_completion(prompt=list(ids), max_tokens=gen_len, temperature=0.0,
                                                    top_k=1, stream=True, logit_bias=self._no_eos):
                if not chunk["choices"][0].get("text"):
                    continue  # the final chunk only carries finish_reason
                last = time.perf_counter()
                first = first if first is not None else last
                chunks += 1
            # A chunk may hold several tokens (incomplete UTF-8 is held back); n_tokens counts the
            # evaluated ones, which excludes the last sampled token.
            n_out = min(gen_len, max(chunks, int(self.llm.n_tokens) - len(ids) + 1))
            first = first if first is not None else last
            tpot = (last - first) / (n_out - 1) if n_out > 1 else None
            reqs.append(RequestTiming(first - t0, tpot, last - t0, n_out))
        return BatchResult(reqs, time.perf_counter() - start, None)


BACKENDS: dict[str, type[Runner]] = {r.backend: r for r in (FrugalRunner, TransformersRunner, LlamaCppRunner)}


def make_runner(backend: str, model: str, *, dtype: str = "auto", device: str = "auto", threads: int | None = None,
                quant: str | None = None, kv: str | None = None, use_cache: bool = True,
                n_ctx: int = 2048, spec: str | None = None, weights: str = "auto") -> Runner:
    """Load ``model`` with ``backend``; FrugalError for an unknown backend or a missing optional peer."""
    if backend not in BACKENDS:
        raise FrugalError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    why = BACKENDS[backend].missing()
    if why:
        raise FrugalError(why)
    if backend != "frugallm" and (quant or kv or spec or weights != "auto"):
        raise FrugalError(f"--quant/--kv/--spec/--weights are frugallm engine options; backend {backend} does not "
                          "take them")
    if backend == "frugallm":
        return FrugalRunner(model, dtype, device, threads, quant, kv, use_cache, spec, weights)
    if backend == "transformers":
        return TransformersRunner(model, dtype, device, threads)
    if dtype not in ("auto", "gguf"):
        raise FrugalError(f"llama.cpp backend runs the GGUF's own tensor types; --dtype {dtype} is not supported")
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else device
    return LlamaCppRunner(model, threads, n_ctx, "cpu" if dev == "auto" else dev)
