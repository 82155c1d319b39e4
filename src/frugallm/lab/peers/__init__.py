"""Backends that ``frugallm bench`` drives on the same token ids: frugallm itself and its peers.

A backend is a :class:`~frugallm.lab.peers.base.Runner`: it loads a model once, then
``generate(prompts, gen_len)`` runs one static batch greedily for exactly ``gen_len`` tokens and returns
per-request timings. Capability flags (``can_score``, ``kv_reason``) say what a backend cannot report, so the
bench never special-cases backend types.

One module per backend: ``frugal.py`` (``frugallm``: :class:`frugallm.LLM`), ``hf_transformers.py``
(``transformers``: Hugging Face ``AutoModelForCausalLM``), ``llamacpp.py`` (``llama.cpp``: ``llama-cpp-python``);
``base.py`` holds the :class:`~frugallm.lab.peers.base.Runner` interface, its results, and the model's config and
tokenizer. This module names them (:data:`BACKENDS`) and loads one (:func:`make_runner`).
"""

from __future__ import annotations

import torch

from frugallm.errors import FrugalError
from frugallm.lab.peers.base import Runner
from frugallm.lab.peers.frugal import FrugalRunner
from frugallm.lab.peers.hf_transformers import TransformersRunner
from frugallm.lab.peers.llamacpp import LlamaCppRunner

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
