"""The OpenAI-compatible HTTP app (FastAPI) over an :class:`AsyncLLM`: middleware, errors, plain routes.

Routes: ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``openai.py``; SSE when
``stream``), ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info`` (``tokenize.py``), ``GET /health``,
``GET /metrics`` (Prometheus text). Bad input of any kind is a 4xx with an OpenAI-style ``{"error": {...}}`` body;
a missing or wrong API key is 401 on every path but ``/health`` (checked before the body is read); a ``Host``
outside ``allowed_hosts`` is 400. A client that disconnects cancels its request, which frees its KV blocks.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from frugallm.engine.async_llm import AsyncLLM, EngineDeadError, QueueFullError
from frugallm.engine.metrics import Counter
from frugallm.errors import FrugalError
from frugallm.serve.lora_routes import LoraRoutes
from frugallm.serve.openai import OpenAIRoutes
from frugallm.serve.protocol import json_error
from frugallm.serve.tokenize import TokenizeRoutes

log = logging.getLogger("frugallm.serve")

DEFAULT_MAX_BODY_BYTES = 2 * 2**20


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
OPEN_PATHS = ("/health",)  # answered without the API key (liveness probes)


def default_allowed_hosts(bind_host: str) -> list[str] | None:
    """Host names a server bound to ``bind_host`` accepts: on loopback, the loopback names and the bind
    address (a page on another site whose DNS name is rebound to 127.0.0.1 then gets 400); None (any)
    when bound elsewhere, where clients reach it under names the server cannot know."""
    import ipaddress

    name = bind_host.strip("[]").lower()
    try:
        loopback = ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = name == "localhost"
    if not loopback:
        return None
    return [*LOOPBACK_HOSTS, f"[{name}]" if ":" in name else name]


def _host_name(host: str) -> str:
    """``Host`` header without its port, lower-cased: ``[::1]:8000`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _Guard:
    """ASGI middleware: Host check, API key on every path but ``/health`` (before the body is read), body
    size limit, status counts."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, statuses: Counter,
                 allowed_hosts: list[str] | None = None) -> None:
        self.app, self.api_key, self.max_body, self.statuses = app, api_key, max_body_bytes, statuses
        self.allowed_hosts = None if allowed_hosts is None or "*" in allowed_hosts else {
            _host_name(h) for h in allowed_hosts}

    async def _reply(self, send: Callable[..., Awaitable[None]], resp: JSONResponse) -> None:
        self.statuses.inc(label=str(resp.status_code))
        await send({"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        if self.allowed_hosts is not None and host is not None and _host_name(host) not in self.allowed_hosts:
            return await self._reply(send, json_error(
                400, f"Host {host!r} is not served here (DNS rebinding guard); allowed: "
                f"{', '.join(sorted(self.allowed_hosts))} (serve --allowed-hosts adds names)", code="host_not_allowed"))
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                msg = "Missing API key (use 'Authorization: Bearer KEY')" if not token else "Incorrect API key provided"
                return await self._reply(send, json_error(401, msg, code="invalid_api_key"))
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            status = 413 if length.isdigit() else 400
            return await self._reply(send, json_error(
                status, f"request body exceeds {self.max_body} bytes" if status == 413 else "bad Content-Length",
                code="request_too_large" if status == 413 else None))
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, f"request body exceeds {self.max_body} bytes")
            return msg

        started = False

        async def counting_send(msg: dict) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                self.statuses.inc(label=str(msg["status"]))
            await send(msg)

        try:
            await self.app(scope, limited_receive, counting_send)
        except Exception:
            # Unhandled errors are answered (500) by Starlette's ServerErrorMiddleware, outside this guard.
            if not started:
                self.statuses.inc(label="500")
            raise


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    if e.get("type") == "json_invalid":
        return f"invalid JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # Union members show up in the location ("prompt.str"); keep the field path readable.
    loc = [x for x in loc if not (x in ("str", "list[str]", "list[int]", "int", "float", "bool") or "[" in x)]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    if e.get("type") == "missing":
        msg = "field required"
    return (f"{param}: {msg}" if param else msg), param


def create_app(
    async_llm: AsyncLLM,
    served_model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """Build the FastAPI app. The caller starts ``async_llm``; the app shuts it down on exit.

    ``api_key``: required on every path but ``/health`` (``/metrics``, ``/docs`` and ``/openapi.json`` too).
    ``allowed_hosts``: ``Host`` names accepted (see :func:`default_allowed_hosts`); None or ``"*"``: any."""
    engine = async_llm.engine
    max_len = engine.max_model_len
    created = int(time.time())
    statuses = Counter("http_responses", "HTTP responses by status code.", label="status")
    adapters = LoraRoutes(engine, served_model_name, created)  # LoRA adapters: cards, load / unload

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        async_llm.shutdown()

    app = FastAPI(title="frugallm", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat completions.")
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, statuses=statuses,
                       allowed_hosts=allowed_hosts)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        return json_error(400, msg, param)

    @app.exception_handler(HTTPException)
    async def _on_http(request: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI's body parser says only "There was an error parsing the body" for what json.loads raises
        # besides JSONDecodeError: name the cause.
        cause = exc.__cause__
        if isinstance(cause, RecursionError):
            return json_error(400, "invalid JSON body: nested too deeply (Python's JSON parser stops at ~1,000 "
                              "levels)")
        if isinstance(cause, UnicodeDecodeError):
            return json_error(400, f"invalid JSON body: not UTF-8 (byte 0x{cause.object[cause.start]:02x} at "
                              f"position {cause.start}); send UTF-8 text")
        return json_error(exc.status_code, str(exc.detail))

    @app.exception_handler(FrugalError)
    async def _on_frugal(request: Request, exc: FrugalError) -> JSONResponse:
        return json_error(400, str(exc), getattr(exc, "param", None))

    @app.exception_handler(QueueFullError)
    async def _on_full(request: Request, exc: QueueFullError) -> JSONResponse:
        resp = json_error(429, str(exc), code="queue_full")
        resp.headers["Retry-After"] = str(exc.retry_after)
        return resp

    @app.exception_handler(EngineDeadError)
    async def _on_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return json_error(503, str(exc))

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return json_error(500, f"internal error: {type(exc).__name__}")

    # -- plain routes ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        if not async_llm.is_alive:
            return json_error(503, "engine is not running")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        text = engine.metrics.render() + "\n".join(statuses.render()) + "\n"
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict[str, Any]:
        return {"id": served_model_name, "object": "model", "created": created, "owned_by": "frugallm",
                "max_model_len": max_len}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(), *adapters.cards()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Any:
        if model_id != served_model_name and (card := adapters.card(model_id)) is not None:
            return card
        if model_id != served_model_name:
            return json_error(404, f"model {model_id!r} not found; available: {served_model_name}", "model",
                               "model_not_found")
        return model_card()

    app.include_router(OpenAIRoutes(async_llm, served_model_name).router)
    app.include_router(adapters.router)
    app.include_router(TokenizeRoutes(engine.tokenizer, engine.inputs.vocab_size, max_len, served_model_name).router)
    return app

