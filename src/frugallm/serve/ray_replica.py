"""The engine deployment of the Ray Serve application: ``FrugalEngine`` replicas and the ``ReplicaBoard`` actor.

Each replica loads the model (``engine_builder``) and runs the plain server's app (:func:`frugallm.serve.app.create_app`
over :class:`AsyncLLM`); the ingress (``ray_ingress.py``) hands it a request's scope and body and it streams the ASGI
messages back (:func:`frugallm.serve.relay.call_asgi`), so routes, validation and errors are the plain server's.
A request whose ``model`` names an adapter is the call's multiplexed model id (``serve.multiplexed``), so Ray sends
it to a replica that has that adapter loaded. ``check_health`` fails when the engine thread stops (Ray replaces the
replica). Every ``REPORT_PERIOD_S`` a replica reports its ``/metrics`` and health to the board, where the ingress reads
them and records the adapters loaded or unloaded over HTTP, which every replica applies before its next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from ray import serve

from frugallm.engine.async_llm import AsyncLLM
from frugallm.engine.llm import LLM
from frugallm.engine.llm_engine import EngineConfig, LLMEngine
from frugallm.errors import FrugalError, InvalidRequestError
from frugallm.serve.app import create_app
from frugallm.serve.ray_options import RayServeOptions
from frugallm.serve.relay import REPLICA_HEADER, RouteKey, call_asgi

log = logging.getLogger("frugallm.serve")

REPORT_PERIOD_S = 2.0  # how often a replica reports its metrics and health to the board
STALE_AFTER_S = 3 * REPORT_PERIOD_S + 5.0  # a replica silent this long is gone (Ray is replacing it)


def engine_builder(model: str, engine_config: EngineConfig | None = None, **llm_kwargs: Any
                   ) -> Callable[[], LLMEngine]:
    """A picklable function that loads ``LLM(model, **llm_kwargs)`` and wraps it in an :class:`LLMEngine` (each
    replica calls it once, in its engine thread)."""
    return functools.partial(_make_engine, model, engine_config or EngineConfig(), llm_kwargs)


def _make_engine(model: str, engine_config: EngineConfig, llm_kwargs: dict[str, Any]) -> LLMEngine:
    return LLMEngine(LLM(model, **llm_kwargs), engine_config)


def board_name(app_name: str) -> str:
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
        self._board_name = board_name(context.app_name)
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
