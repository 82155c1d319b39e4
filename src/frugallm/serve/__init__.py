"""Serving: continuous batching over a paged KV cache, an async engine and an OpenAI-compatible server.

Modules, one concern each:

* ``block_manager`` - fixed-size KV blocks: ref counts, copy-on-write, hash-chained prefix caching (no torch)
* ``scheduler`` - waiting/running queues, chunked prefill under a token budget, preemption (no torch)
* ``paged_cache`` - ``PagedKVCache``, the ``KVCache`` the attention layer reads through block tables
* ``model_runner`` - builds each step's forward passes on the paged cache, and samples
* ``engine`` - ``LLMEngine`` (``add_request`` / ``step`` / ``abort``) and ``generate_batched``
* ``async_engine`` - ``AsyncLLM``: the engine in a background thread, one asyncio queue per request
* ``protocol`` / ``server`` - OpenAI request models and the FastAPI app; ``metrics`` - Prometheus text
* ``commands`` - the ``frugallm serve`` subcommand
"""

from __future__ import annotations

from typing import Any

__all__ = ["AsyncLLM", "EngineConfig", "LLMEngine", "generate_batched"]


def __getattr__(name: str) -> Any:  # lazy: the torch-free modules import without the engine
    if name == "AsyncLLM":
        from frugallm.serve.async_engine import AsyncLLM

        return AsyncLLM
    if name in ("EngineConfig", "LLMEngine", "generate_batched"):
        from frugallm.serve import engine

        return getattr(engine, name)
    raise AttributeError(name)
