"""Serving over HTTP: the OpenAI-compatible API in front of :class:`frugallm.engine.async_llm.AsyncLLM`.

* ``protocol`` - the request models (pydantic) and OpenAI-style error bodies
* ``app`` - the FastAPI app: middleware (Host check, API key, body limit, status counts), errors, ``/health``,
  ``/metrics``, ``/v1/models``
* ``openai`` - ``/v1/completions`` and ``/v1/chat/completions`` on one stream-or-collect path
* ``commands`` - the ``frugallm serve`` subcommand
"""
