"""OpenAI-compatible HTTP server (FastAPI) over an :class:`AsyncLLM`.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE when
``stream``), ``GET /health``, ``GET /metrics`` (Prometheus text). Bad input of any kind is a 4xx with an
OpenAI-style ``{"error": {...}}`` body; a missing or wrong API key on ``/v1/*`` is 401 (checked before the
body is read). A client that disconnects cancels its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from frugallm.engine.async_llm import AsyncLLM, EngineDeadError
from frugallm.engine.llm_engine import StepOutput
from frugallm.engine.metrics import Counter
from frugallm.errors import FrugalError, InvalidRequestError
from frugallm.serve.protocol import ChatCompletionRequest, CompletionRequest, error_body

log = logging.getLogger("frugallm.serve")

DEFAULT_MAX_BODY_BYTES = 2 * 2**20
_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 503: "service_unavailable"}


def _json_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An OpenAI-style error response: ``{"error": {"message", "type", "param", "code"}}``."""
    etype = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error_body(message, etype, param, code), status_code=status)


class _Guard:
    """ASGI middleware: API key on ``/v1/*`` (before the body is read), body size limit, status counts."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, statuses: Counter) -> None:
        self.app, self.api_key, self.max_body, self.statuses = app, api_key, max_body_bytes, statuses

    async def _reply(self, send: Callable[..., Awaitable[None]], resp: JSONResponse) -> None:
        self.statuses.inc(label=str(resp.status_code))
        await send({"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith("/v1"):
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                msg = "Missing API key (use 'Authorization: Bearer KEY')" if not token else "Incorrect API key provided"
                return await self._reply(send, _json_error(401, msg, code="invalid_api_key"))
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            status = 413 if length.isdigit() else 400
            return await self._reply(send, _json_error(
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

        async def counting_send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                self.statuses.inc(label=str(msg["status"]))
            await send(msg)

        await self.app(scope, limited_receive, counting_send)


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
) -> FastAPI:
    """Build the FastAPI app. The caller starts ``async_llm``; the app shuts it down on exit."""
    engine = async_llm.engine
    tokenizer = engine.tokenizer
    max_len = engine.max_model_len
    created = int(time.time())
    statuses = Counter("http_responses", "HTTP responses by status code.", label="status")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        async_llm.shutdown()

    app = FastAPI(title="frugallm", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat completions.")
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, statuses=statuses)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        return _json_error(400, msg, param)

    @app.exception_handler(HTTPException)
    async def _on_http(request: Request, exc: HTTPException) -> JSONResponse:
        return _json_error(exc.status_code, str(exc.detail))

    @app.exception_handler(FrugalError)
    async def _on_frugal(request: Request, exc: FrugalError) -> JSONResponse:
        return _json_error(400, str(exc))

    @app.exception_handler(EngineDeadError)
    async def _on_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return _json_error(503, str(exc))

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return _json_error(500, f"internal error: {type(exc).__name__}")

    # -- plain routes ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        if not async_llm.is_alive:
            return _json_error(503, "engine is not running")
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
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Any:
        if model_id != served_model_name:
            return _json_error(404, f"model {model_id!r} not found; available: {served_model_name}", "model",
                               "model_not_found")
        return model_card()

    # -- helpers --------------------------------------------------------------------------------------
    def check_model(name: str | None) -> JSONResponse | None:
        if name is not None and name != served_model_name:
            return _json_error(404, f"The model {name!r} does not exist; available: {served_model_name}",
                               "model", "model_not_found")
        return None

    def resolve_max_tokens(requested: int | None, prompt_lens: list[int], default: int | None) -> int:
        longest = max(prompt_lens)
        if longest >= max_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, your prompt is {longest} "
                "tokens (at least one token must be generated).")
        if requested is None:
            return min(default, max_len - longest) if default else max_len - longest
        if longest + requested > max_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{longest + requested} tokens ({longest} in the prompt, {requested} for the completion). "
                "Please reduce the prompt or max_tokens.")
        return requested

    def tok_str(tid: int) -> str:
        return tokenizer.decode([tid], skip_special_tokens=False)

    def top_entries(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda kv: -kv[1])[:k]

    def completion_logprobs(out: StepOutput, k: int, offset: int) -> dict[str, Any]:
        toks, lps, tops, offs = [], [], [], []
        for tid, entry in zip(out.token_ids, out.logprobs or [], strict=False):
            s = tok_str(tid)
            toks.append(s)
            lps.append(entry.get(tid))
            top: dict[str, float] = {}
            for t, lp in top_entries(entry, k):  # best first; distinct ids may decode to the same text
                top.setdefault(tok_str(t), lp)
            tops.append(top if k else None)
            offs.append(offset)
            offset += len(s)
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def chat_logprobs(out: StepOutput, k: int) -> list[dict[str, Any]]:
        content = []
        for tid, entry in zip(out.token_ids, out.logprobs or [], strict=False):
            s = tok_str(tid)
            content.append({"token": s, "logprob": entry.get(tid), "bytes": list(s.encode()),
                            "top_logprobs": [{"token": (ts := tok_str(t)), "logprob": lp, "bytes": list(ts.encode())}
                                             for t, lp in top_entries(entry, k)]})
        return content

    def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached}}

    class _Usage:
        """Per-request token accounting across choices (prompt counted once per prompt)."""

        def __init__(self, n: int) -> None:
            self.n = n
            self.prompt: dict[int, int] = {}
            self.cached: dict[int, int] = {}
            self.completion = 0

        def add(self, out: StepOutput) -> None:
            p = out.index // self.n
            self.prompt[p] = out.num_prompt_tokens
            self.cached[p] = max(self.cached.get(p, 0), out.num_cached_tokens)
            self.completion += len(out.token_ids)

        def body(self) -> dict[str, Any]:
            return usage(sum(self.prompt.values()), self.completion, sum(self.cached.values()))

    async def until_disconnect(request: Request, agen: AsyncIterator[StepOutput],
                               on_out: Callable[[StepOutput], None]) -> bool:
        """Consume ``agen``; False (and the request aborted) if the client went away first."""

        async def consume() -> None:
            async for out in agen:
                on_out(out)

        task = asyncio.ensure_future(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    task.result()
                    return True
                if await request.is_disconnected():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    return False
        except asyncio.CancelledError:
            task.cancel()
            raise

    def sse(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def prepare(req: CompletionRequest | ChatCompletionRequest, prompts: list[Any], default_max: int | None,
                logprobs: int | None) -> tuple[list[list[int]], Any]:
        req.unsupported()
        ids = [engine.encode(p) for p in prompts]
        requested = getattr(req, "max_completion_tokens", None) or req.max_tokens
        max_tokens = resolve_max_tokens(requested, [len(x) for x in ids], default_max)
        params = req.sampling_params(max_tokens, logprobs)
        for x in ids:
            engine.check_request(x, params, req.n)
        return ids, params

    # -- completions ----------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        if (bad := check_model(req.model)) is not None:
            return bad
        ids, params = prepare(req, req.prompts(), 16, req.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        n_choices = len(ids) * req.n
        k = req.logprobs or 0
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        agen = async_llm.generate_many(ids, params, req.n, rid)
        echo = [tokenizer.decode(x, skip_special_tokens=False) if not isinstance(p, str) else p
                for p, x in zip(req.prompts(), ids, strict=True)] if req.echo else None

        chunk = _chunker(rid, "text_completion", now, served_model_name, include_usage)

        if req.stream:
            async def events() -> AsyncIterator[str]:
                acc = _Usage(req.n)
                offsets = [0] * n_choices
                if echo:
                    for i in range(n_choices):
                        yield sse(chunk([{"index": i, "text": echo[i // req.n], "logprobs": None,
                                          "finish_reason": None}]))
                try:
                    async for out in agen:
                        acc.add(out)
                        lp = None
                        if req.logprobs is not None:
                            lp = completion_logprobs(out, k, offsets[out.index])
                            offsets[out.index] += sum(len(t) for t in lp["tokens"])
                        if out.text or out.finished or lp:
                            yield sse(chunk([{"index": out.index, "text": out.text, "logprobs": lp,
                                              "finish_reason": out.finish_reason}]))
                except InvalidRequestError as e:
                    yield sse(error_body(str(e)))
                except Exception as e:  # the engine failed mid-stream: tell the client, then end
                    yield sse(error_body(f"internal error: {e}", "server_error"))
                if include_usage:
                    yield sse(chunk([], acc.body()))
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts = [echo[i // req.n] if echo else "" for i in range(n_choices)]
        lps: list[dict[str, list]] = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                                      for _ in range(n_choices)]
        finish: list[str | None] = [None] * n_choices
        acc = _Usage(req.n)

        def on_out(out: StepOutput) -> None:
            acc.add(out)
            texts[out.index] += out.text
            finish[out.index] = out.finish_reason
            if req.logprobs is not None:
                part = completion_logprobs(out, k, sum(len(t) for t in lps[out.index]["tokens"]))
                for key in part:
                    lps[out.index][key] += part[key]

        if not await until_disconnect(request, agen, on_out):
            return _json_error(499, "client disconnected")
        choices = [{"index": i, "text": texts[i], "logprobs": lps[i] if req.logprobs is not None else None,
                    "finish_reason": finish[i]} for i in range(n_choices)]
        return {"id": rid, "object": "text_completion", "created": now, "model": served_model_name,
                "choices": choices, "usage": acc.body()}

    # -- chat completions -----------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        if (bad := check_model(req.model)) is not None:
            return bad
        prompt = tokenizer.apply_chat_template(req.conversation(), add_generation_prompt=True)
        k = req.top_logprobs or 0
        ids, params = prepare(req, [prompt], None, k if req.logprobs else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        agen = async_llm.generate_many(ids, params, req.n, rid)

        chunk = _chunker(rid, "chat.completion.chunk", now, served_model_name, include_usage)

        if req.stream:
            async def events() -> AsyncIterator[str]:
                acc = _Usage(req.n)
                for i in range(req.n):
                    yield sse(chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}]))
                try:
                    async for out in agen:
                        acc.add(out)
                        lp = {"content": chat_logprobs(out, k)} if req.logprobs else None
                        if out.text or out.finished or lp:
                            delta = {"content": out.text} if out.text else {}
                            yield sse(chunk([{"index": out.index, "delta": delta, "logprobs": lp,
                                              "finish_reason": out.finish_reason}]))
                except InvalidRequestError as e:
                    yield sse(error_body(str(e)))
                except Exception as e:
                    yield sse(error_body(f"internal error: {e}", "server_error"))
                if include_usage:
                    yield sse(chunk([], acc.body()))
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts = [""] * req.n
        lps: list[list[dict[str, Any]]] = [[] for _ in range(req.n)]
        finish: list[str | None] = [None] * req.n
        acc = _Usage(req.n)

        def on_out(out: StepOutput) -> None:
            acc.add(out)
            texts[out.index] += out.text
            finish[out.index] = out.finish_reason
            if req.logprobs:
                lps[out.index] += chat_logprobs(out, k)

        if not await until_disconnect(request, agen, on_out):
            return _json_error(499, "client disconnected")
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": {"content": lps[i]} if req.logprobs else None, "finish_reason": finish[i]}
                   for i in range(req.n)]
        return {"id": rid, "object": "chat.completion", "created": now, "model": served_model_name,
                "choices": choices, "usage": acc.body()}

    return app


def _chunker(rid: str, obj: str, created: int, model: str, include_usage: bool
             ) -> Callable[..., dict[str, Any]]:
    """Builds the response/chunk bodies of one request (``usage`` only when the client asked for it)."""

    def chunk(choices: list[dict[str, Any]], use: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if include_usage:
            body["usage"] = use
        return body

    return chunk
