"""Scale-out on Ray Serve: N engine replicas behind Ray Serve's HTTP proxy, the same OpenAI API.

Two deployments, as Ray Serve LLM arranges them (an ingress that reads the request, a handle that picks the replica):

* ``FrugalEngine`` (N replicas): each loads the model and runs the plain server's app
  (:func:`frugallm.serve.app.create_app` over :class:`AsyncLLM`); the ingress hands it a request's scope and body and
  it streams the ASGI messages back (:func:`frugallm.serve.relay.call_asgi`), so routes, validation and errors are
  the plain server's. The request's ``model``, when it names an adapter, is the call's multiplexed model id
  (``serve.multiplexed``): Ray sends it to a replica that has that adapter loaded. Other requests go where their
  prefix was seen before (Ray's ``PrefixCacheAffinityRouter``; least loaded of two when queue lengths differ by
  more than ``imbalanced_threshold``; see ``ray_router.py``). ``check_health`` fails when the engine thread stops
  (Ray replaces the replica); every few seconds a replica reports its ``/metrics`` and health to a board actor.
* ``FrugalIngress`` (one replica, no CPU): the Host / API key / body-size guard of the plain server, then the relay.
  ``/health`` and ``/metrics`` answer for all replicas (``replica`` label). A replica that dies under a request
  gives that request an error: 503 before the answer started, an SSE ``error`` event after (never a silent loss).
  ``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` go to one replica (which checks the adapter); once it
  succeeded the change is recorded on the board and every other replica applies it before its next request.

Python users build the application themselves::

    from ray import serve
    from frugallm.serve.ray_app import RayServeOptions, build_app, engine_builder

    app = build_app(engine_builder("default", dtype="float32"), RayServeOptions("default", replicas=2))
    serve.run(app, name="frugallm", route_prefix="/")
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from frugallm.engine.async_llm import DEFAULT_MAX_QUEUE, AsyncLLM
from frugallm.engine.llm import LLM
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.engine.metrics import Counter
from frugallm.errors import FrugalError, InvalidRequestError
from frugallm.serve.app import DEFAULT_MAX_BODY_BYTES, _Guard, create_app
from frugallm.serve.protocol import error_body, json_error
from frugallm.serve.relay import REPLICA_HEADER, RouteKey, call_asgi, merge_metrics, portable_scope, route_key

log = logging.getLogger("frugallm.serve")

ENGINE = "FrugalEngine"
INGRESS = "FrugalIngress"
REPORT_PERIOD_S = 2.0  # how often a replica reports its metrics and health to the board
ADAPTER_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
STALE_AFTER_S = 3 * REPORT_PERIOD_S + 5.0  # a replica silent this long is gone (Ray is replacing it)
ROUTERS = {
    "prefix": "frugallm.serve.ray_router:AdapterPrefixRouter",  # adapters, then Ray's prefix-cache affinity
    "pow2": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",  # Ray's default, adapter-aware
}


@dataclass(frozen=True)
class RayServeOptions:
    """How the Ray application serves: the plain server's options, the replica count and resources, routing.

    ``max_ongoing_requests`` per replica defaults to ``max_queue``: Ray never holds back a request the engine would
    admit, and the engine's own cap answers 429 past it. ``router``: ``prefix`` (Ray's PrefixCacheAffinityRouter,
    adapter-aware) or ``pow2`` (Ray's default: least loaded of two, adapter-aware)."""

    served_model_name: str
    replicas: int = 1
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    allowed_hosts: tuple[str, ...] | None = None
    max_queue: int = DEFAULT_MAX_QUEUE
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    router: str = "prefix"
    imbalanced_threshold: int = 8
    max_ongoing_requests: int | None = None
    app_name: str = "frugallm"
    extra_router_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise FrugalError(f"--replicas must be an integer >= 1, got {self.replicas!r}")
        if self.router not in ROUTERS:
            raise FrugalError(f"unknown Ray router {self.router!r}; choose one of: {', '.join(ROUTERS)}")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise FrugalError("replica CPUs and GPUs must be >= 0")
        if self.max_queue < 1:
            raise FrugalError(f"--max-queue must be >= 1, got {self.max_queue}")

    @property
    def ongoing(self) -> int:
        return self.max_ongoing_requests or self.max_queue


def engine_builder(model: str, engine_config: EngineConfig | None = None, **llm_kwargs: Any
                   ) -> Callable[[], LLMEngine]:
    """A picklable function that loads ``LLM(model, **llm_kwargs)`` and wraps it in an :class:`LLMEngine` (each
    replica calls it once, in its engine thread)."""
    return functools.partial(_make_engine, model, engine_config or EngineConfig(), llm_kwargs)


def _make_engine(model: str, engine_config: EngineConfig, llm_kwargs: dict[str, Any]) -> LLMEngine:
    return LLMEngine(LLM(model, **llm_kwargs), engine_config)


def router_class(name: str) -> str:
    """The import path of router ``name``, or of Ray's default router where this Ray lacks what it needs."""
    import importlib

    module, _, cls = ROUTERS[name].partition(":")
    try:
        if hasattr(importlib.import_module(module), cls):
            return ROUTERS[name]
    except ImportError as e:
        log.warning("Ray router %r is not available with this Ray (%s); using Ray's default router", name, e)
    return ROUTERS["pow2"]


def _board_name(app_name: str) -> str:
    return f"frugallm_board::{app_name}"


@ray.remote(num_cpus=0)
class ReplicaBoard:
    """Latest health and ``/metrics`` text of every engine replica (pushed by the replicas, read by the ingress), and
    the adapters loaded or unloaded over HTTP since the start (``name -> path``, None: unloaded), which every
    replica applies before its next request."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, bool, str]] = {}
        self.adapters: dict[str, str | None] = {}
        self.version = 0

    def set_adapter(self, name: str, path: str | None) -> int:
        self.adapters[name] = path
        self.version += 1
        return self.version

    def adapter_changes(self) -> tuple[int, dict[str, str | None]]:
        return self.version, dict(self.adapters)

    def report(self, replica: str, alive: bool, metrics: str) -> None:
        self.reports[replica] = (time.time(), alive, metrics)

    def snapshot(self, max_age_s: float) -> dict[str, tuple[float, bool, str]]:
        """``replica -> (age_s, alive, metrics)`` of the replicas heard from within ``max_age_s``."""
        now = time.time()
        for r in [r for r, (t, _, _) in self.reports.items() if now - t > max_age_s]:
            del self.reports[r]
        return {r: (now - t, alive, text) for r, (t, alive, text) in self.reports.items()}


class FrugalEngine:
    """One engine replica: the plain server's app on an :class:`AsyncLLM`, reached through :meth:`http`."""

    async def __init__(self, build: Callable[[], LLMEngine], options: RayServeOptions) -> None:
        self.options = options
        self.async_llm = await asyncio.to_thread(AsyncLLM.launch, build, options.max_queue)
        self.app = create_app(self.async_llm, options.served_model_name, api_key=options.api_key,
                              max_body_bytes=options.max_body_bytes,
                              allowed_hosts=None if options.allowed_hosts is None else list(options.allowed_hosts))
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self._header = (REPLICA_HEADER.encode(), self.replica.encode())
        lora = self.async_llm.engine.lora
        self._adapter: Callable[[str], Any] | None = None
        if lora is not None:
            # Ray's multiplexing: the adapters this replica holds, so Ray routes a request for one here.
            # Its LRU bound is the engine's slot count; the engine loads the weights into a slot on first use.
            async def adapter(name: str) -> Any:
                return lora.get(name)

            self._adapter = serve.multiplexed(max_num_models_per_replica=lora.max_loras)(adapter)
        self._board_name = _board_name(context.app_name)
        self._board: Any = None
        self._adapters_version = 0  # of the board's adapter changes applied here
        self._adapters_lock = asyncio.Lock()
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    async def http(self, key: RouteKey, scope: dict[str, Any], body: bytes, adapters_version: int = 0
                   ) -> AsyncIterator[dict[str, Any]]:
        """Answer one HTTP request (``scope`` from :func:`portable_scope`): its ASGI messages, streamed. First apply
        the adapters loaded or unloaded through the ingress up to ``adapters_version``."""
        if adapters_version > self._adapters_version:
            await self._apply_adapter_changes()
        model = serve.get_multiplexed_model_id()
        if model and self._adapter is not None:
            with contextlib.suppress(InvalidRequestError):  # not an adapter: the app answers (404 if unknown)
                await self._adapter(model)
        async for message in call_asgi(self.app, scope, body):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self._header]}
            yield message

    def check_health(self) -> None:
        """Ray calls this periodically; raising makes Ray replace the replica."""
        if not self.async_llm.is_alive:
            raise RuntimeError(f"frugallm engine thread of replica {self.replica} stopped: {self.async_llm.error!r}")

    async def _scrape(self, path: str) -> tuple[int, str]:
        headers = [(b"host", b"localhost")]
        if self.options.api_key:
            headers.append((b"authorization", f"Bearer {self.options.api_key}".encode()))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
        status, chunks = 500, []
        async for m in call_asgi(self.app, scope, b""):
            if m["type"] == "http.response.start":
                status = m["status"]
            elif m["type"] == "http.response.body":
                chunks.append(m.get("body", b""))
        return status, b"".join(chunks).decode()

    async def _board_handle(self) -> Any:
        if self._board is None:
            self._board = await asyncio.to_thread(ray.get_actor, self._board_name)
        return self._board

    async def _apply_adapter_changes(self) -> None:
        """Load and unload here what was loaded and unloaded through the ingress (on another replica)."""
        async with self._adapters_lock:  # concurrent requests apply the changes once
            version, changes = await (await self._board_handle()).adapter_changes.remote()
            if version > self._adapters_version:
                await self._apply(changes)
                self._adapters_version = version

    async def _apply(self, changes: dict[str, str | None]) -> None:
        lora = self.async_llm.engine.lora
        if lora is not None:
            present = set(lora.names())
            for name, path in changes.items():
                if path is None and name in present:
                    lora.remove(name)
                elif path is not None and name not in present:
                    try:
                        await asyncio.to_thread(lora.add, name, path)
                    except FrugalError as e:  # it loaded on the replica that took the request; not here
                        log.error("replica %s: LoRA adapter %r from %s does not load here: %s", self.replica, name,
                                  path, e)

    async def _report_loop(self) -> None:
        while True:
            try:
                board = await self._board_handle()
                _, text = await self._scrape("/metrics")
                health, _ = await self._scrape("/health")
                await board.report.remote(self.replica, health == 200, text)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the ingress (which owns the board) is starting or was replaced
                log.debug("replica %s: board not reachable (%s)", self.replica, e)
                self._board = None
            await asyncio.sleep(REPORT_PERIOD_S)

    def __del__(self) -> None:
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.cancel()
        if getattr(self, "async_llm", None) is not None:
            self.async_llm.shutdown()


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
        self.board = ReplicaBoard.options(name=_board_name(serve.get_replica_context().app_name),
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


def build_app(build: Callable[[], LLMEngine], options: RayServeOptions) -> Any:
    """The Ray Serve application (``serve.run(app, route_prefix="/")`` serves it): ``options.replicas`` engine
    replicas, each built by ``build`` (picklable: :func:`engine_builder`), behind one ingress."""
    # Prefix tree bounded: Ray's default keeps every prompt's text for the life of the application.
    prefix_kwargs = {"imbalanced_threshold": options.imbalanced_threshold, "do_eviction": True}
    router = RequestRouterConfig(
        request_router_class=router_class(options.router),
        request_router_kwargs={**(prefix_kwargs if options.router == "prefix" else {}), **options.extra_router_kwargs},
    )
    resources: dict[str, Any] = {"num_cpus": options.replica_cpus}
    if options.replica_gpus:
        resources["num_gpus"] = options.replica_gpus
    engine = serve.deployment(FrugalEngine, name=ENGINE, num_replicas=options.replicas,
                              max_ongoing_requests=options.ongoing, ray_actor_options=resources,
                              request_router_config=router, health_check_period_s=5.0,
                              graceful_shutdown_timeout_s=10.0, max_constructor_retry_count=3)
    ingress = serve.deployment(FrugalIngress, name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=max(options.ongoing * options.replicas, 100))
    return ingress.bind(engine.bind(build, options), options)


def _cause(text: str) -> str:
    """The replica's own error in Ray's deployment-failure text (its last ``SomethingError: message`` line)."""
    import re

    found = re.findall(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", text, flags=re.MULTILINE)
    ours = [f"{kind}: {msg}" for kind, msg in found if kind not in ("RuntimeError", "RayTaskError", "RayActorError",
                                                                    "DeploymentUnavailableError")]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return ours[-1] if ours else " | ".join(lines[-3:])


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve_forever(build: Callable[[], LLMEngine], options: RayServeOptions, *, address: str | None, host: str,
                  port: int) -> int:
    """``frugallm serve --ray``: join the Ray cluster at ``address`` (None: a new local one, unless ``RAY_ADDRESS``
    names one; ``auto``: the one ``ray start`` runs on this machine; ``ray://host:10001``: Ray Client), start Serve's
    HTTP proxy on ``host:port``, deploy, and serve until interrupted; then remove the application (and stop Ray
    when it was started here)."""
    own_cluster = address is None and not ray.is_initialized()
    # SIGTERM (a service manager, `kill`) cleans up like Ctrl-C; so does SIGINT where the shell started this process
    # with SIGINT ignored (a background job of a script).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise FrugalError(f"cannot join the Ray cluster at {address!r}: {e}") from None
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(build_app(build, options), name=options.app_name, route_prefix="/")
        except RuntimeError as e:  # a replica failed to start: Ray's status has its traceback
            detail = str(e)
            with contextlib.suppress(Exception):
                app = serve.status().applications[options.app_name]
                detail = app.deployments[ENGINE].message or app.message or detail
            raise FrugalError(f"the Ray deployment did not start: {_cause(detail)}") from None
        cluster = ray.get_runtime_context().gcs_address
        print(f"frugallm: serving {options.served_model_name!r} on http://{host}:{port}/v1 through Ray Serve | "
              f"{options.replicas} replica(s) | router {options.router} | cluster {cluster} | "
              f"api key {'on' if options.api_key else 'off'}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        with contextlib.suppress(Exception):
            serve.delete(options.app_name)
        if own_cluster:
            serve.shutdown()
            ray.shutdown()
