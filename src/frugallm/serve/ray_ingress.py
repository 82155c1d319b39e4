"""The ingress deployment of the Ray Serve application: ``FrugalIngress``, one replica, no CPU.

The plain server's Host / API key / body-size guard, then the relay to an engine replica (``ray_replica.py``).
``/health`` and ``/metrics`` answer for all replicas (``replica`` label), from the reports on the board. A replica
that dies under a request gives that request an error: 503 before the answer started, an SSE ``error`` event after
(never a silent loss). ``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` go to one replica (which checks the
adapter); once it succeeded the change is recorded on the board and every other replica applies it before its next
request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from frugallm.engine.metrics import Counter
from frugallm.serve.app import _Guard
from frugallm.serve.protocol import error_body, json_error
from frugallm.serve.ray_options import RayServeOptions
from frugallm.serve.ray_replica import STALE_AFTER_S, ReplicaBoard, board_name
from frugallm.serve.relay import merge_metrics, portable_scope, route_key

log = logging.getLogger("frugallm.serve")

ADAPTER_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


class _Asgi(Response):
    """A Starlette response that is a whole ASGI app: Ray Serve awaits ``response(scope, receive, send)``."""

    def __init__(self, app: Any) -> None:
        super().__init__()
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class FrugalIngress:
    """The HTTP entry: the plain server's guard, ``/health`` and ``/metrics`` for all replicas, the relay."""

    def __init__(self, engine: Any, options: RayServeOptions) -> None:
        self.engine, self.options = engine, options
        self.statuses = Counter("http_responses", "HTTP responses by status code.", label="status")
        self.asgi = _Guard(self._relay, api_key=options.api_key, max_body_bytes=options.max_body_bytes,
                           statuses=self.statuses,
                           allowed_hosts=None if options.allowed_hosts is None else list(options.allowed_hosts))
        self.board = ReplicaBoard.options(name=board_name(serve.get_replica_context().app_name),
                                          get_if_exists=True).remote()
        self.adapters_version = 0  # of the board's adapter changes (this one ingress replica writes them)

    async def __call__(self, request: Request) -> Response:
        return _Asgi(self.asgi)

    async def _reply(self, send: Callable, resp: Response) -> None:
        await send({"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})

    async def _relay(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/health":
            return await self._reply(send, await self._health())
        if path == "/metrics":
            return await self._reply(send, await self._metrics())
        chunks = []
        while True:
            try:
                message = await receive()
            except HTTPException as e:  # the guard's body limit, for a body sent without Content-Length
                return await self._reply(send, json_error(e.status_code, str(e.detail)))
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        key = route_key(body, self.options.served_model_name)
        adapter = key.model if key.model and key.model != self.options.served_model_name else ""
        stream = self.engine.options(stream=True, multiplexed_model_id=adapter).http.remote(
            key, portable_scope(scope), body, self.adapters_version)
        started, sse, status = False, False, 0
        try:
            async for message in stream:
                if message["type"] == "http.response.start":
                    started, status = True, message["status"]
                    sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                              for k, v in message.get("headers", []))
                await send(message)
        except asyncio.CancelledError:
            stream.cancel()  # the client went away: the replica aborts the request
            raise
        except Exception as e:  # the replica died (or failed) under this request: answer it with an error
            log.warning("request to %s failed on its replica: %r", path, e)
            detail = f"the replica serving this request failed ({type(e).__name__}); retry"
            if not started:
                return await self._reply(send, json_error(503, detail, code="replica_failed"))
            if sse:
                event = json.dumps({"error": {"message": detail, "type": "server_error", "code": "replica_failed"}})
                await send({"type": "http.response.body", "body": f"data: {event}\n\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if status == 200 and path in ADAPTER_ROUTES:
            # One replica loaded (checked) or unloaded it; the others follow before their next request.
            name = json.loads(body)["lora_name"]
            lora_path = json.loads(body)["lora_path"] if path == ADAPTER_ROUTES[0] else None
            self.adapters_version = await self.board.set_adapter.remote(name, lora_path)

    async def _snapshot(self) -> dict[str, tuple[float, bool, str]]:
        return await self.board.snapshot.remote(STALE_AFTER_S)

    async def _health(self) -> Response:
        replicas = await self._snapshot()
        states = {r: {"status": "ok" if alive else "down", "age_s": round(age, 1)}
                  for r, (age, alive, _) in sorted(replicas.items())}
        if not any(alive for _, alive, _ in replicas.values()):
            body = error_body("no engine replica is running (yet)", "service_unavailable")
            return JSONResponse({**body, "replicas": states}, status_code=503)
        return JSONResponse({"status": "ok", "replicas": states})

    async def _metrics(self) -> Response:
        replicas = await self._snapshot()
        texts = [(r, text) for r, (_, _, text) in sorted(replicas.items())]
        texts.append(("ingress", "\n".join(self.statuses.render())))
        return Response(merge_metrics(texts), media_type="text/plain; version=0.0.4; charset=utf-8")
