"""The ``transformers`` backend: Hugging Face ``AutoModelForCausalLM`` (a GGUF is dequantized to fp32 by
transformers). TTFT is a separate ``generate(max_new_tokens=1)``; TPOT = (e2e - ttft) / (G - 1)."""

from __future__ import annotations

import time
from typing import Any

import torch

from frugallm.errors import FrugalError
from frugallm.lab.peers.base import (
    DTYPE_NAMES,
    BatchResult,
    RequestTiming,
    Runner,
    importable,
    load_model_config,
    load_tokenizer,
)

TRANSFORMERS_MISSING = "transformers is not installed: pip install transformers accelerate"


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
        return None if importable("transformers") else TRANSFORMERS_MISSING

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
        self.dtype, self.device = DTYPE_NAMES.get(tdtype, str(tdtype)), str(dev)
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

