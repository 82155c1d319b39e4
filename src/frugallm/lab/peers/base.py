"""What every backend of ``frugallm bench`` shares: the :class:`Runner` interface, its per-request timings, and
the model's config and tokenizer read once without loading weights (so every backend gets the same token ids)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from frugallm.config import ModelConfig
from frugallm.tokenizer.tokenizer import Tokenizer

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# ------------------------------------------------------------------------------------------ model files


def importable(name: str) -> bool:
    """Whether the optional package ``name`` can be imported here (without importing it)."""
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

