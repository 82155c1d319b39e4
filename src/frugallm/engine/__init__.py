"""The engine: one request in, tokens out, for one prompt or thousands.

Modules, one concern each (the loop reads top to bottom in ``llm_engine.py``):

* ``inputs`` - ``InputProcessor``: a prompt and its sampling parameters validated and tokenized once
* ``sequence`` - per-choice state: incremental detokenization, stop strings, metrics, ``RequestOutput``
* ``block_manager`` - fixed-size KV blocks: ref counts, copy-on-write, hash-chained prefix caching (no torch)
* ``scheduler`` - waiting/running queues, chunked prefill under a token budget, preemption (no torch)
* ``paged_cache`` - ``PagedKVCache``, the ``KVCache`` the attention layer reads through block tables
* ``model_runner`` - builds each step's forward passes on the paged cache
* ``llm_engine`` - ``LLMEngine`` (``add_request`` / ``step`` / ``abort``); ``batched`` - ``generate_batched``
  (a list of prompts on a fresh engine sized to them) and ``batch_config``
* ``async_llm`` - ``AsyncLLM``: the engine in a background thread, one asyncio queue per request
* ``metrics`` - the engine's counters and histograms (rendered as Prometheus text by ``serve``)
* ``llm`` - ``LLM``, the public front: load, quantize, generate / stream / chat / score
* ``solo`` - ``SoloRunner``, ``LLM``'s own loop: one sequence (or a static batch) on a contiguous cache, speculation
* ``model_setup`` - ``LLM``'s load-time choices: device, dtype, quantization, LoRA slots, compile
* ``spec_solo`` - ``SoloSpec``: a lone server request decoded speculatively on ``SoloRunner`` beside the engine
* ``allocator`` - glibc malloc settings for CPU inference
"""
