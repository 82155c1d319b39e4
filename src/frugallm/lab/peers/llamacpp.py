"""The ``llama.cpp`` backend: ``llama-cpp-python`` (optional extra ``frugallm[llamacpp]``), GGUF only, one
sequence at a time (its high-level API has no static batch); TTFT = time to the first streamed chunk."""

from __future__ import annotations

import time

import torch

from frugallm.errors import FrugalError
from frugallm.lab.peers.base import BatchResult, RequestTiming, Runner, importable, load_model_config, load_tokenizer

LLAMA_CPP_MISSING = "llama-cpp-python is not installed: pip install 'frugallm[llamacpp]'"


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
        return None if importable("llama_cpp") else LLAMA_CPP_MISSING

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

