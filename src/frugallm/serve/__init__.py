"""Serving over HTTP: the OpenAI-compatible API in front of :class:`frugallm.engine.async_llm.AsyncLLM`.

* ``protocol`` - the request models (pydantic) and error bodies
* ``server`` - the FastAPI app: routes, middleware, errors
* ``commands`` - the ``frugallm serve`` subcommand
"""
