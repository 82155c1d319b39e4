"""Scale-out on Ray Serve: N engine replicas behind Ray Serve's HTTP proxy, the same OpenAI API.

Two deployments, as Ray Serve LLM arranges them (an ingress that reads the request, a handle that picks the replica):

* ``FrugalEngine`` (N replicas, ``ray_replica.py``): each loads the model and runs the plain server's app
  (:func:`frugallm.serve.app.create_app` over :class:`AsyncLLM`); the ingress hands it a request's scope and body and
  it streams the ASGI messages back (:func:`frugallm.serve.relay.call_asgi`), so routes, validation and errors are
  the plain server's. The request's ``model``, when it names an adapter, is the call's multiplexed model id
  (``serve.multiplexed``): Ray sends it to a replica that has that adapter loaded. Other requests go where their
  prefix was seen before (Ray's ``PrefixCacheAffinityRouter``; least loaded of two when queue lengths differ by
  more than ``imbalanced_threshold``; ``ray_router.py``). ``check_health`` fails when the engine thread stops (Ray
  replaces the replica); every few seconds a replica reports its ``/metrics`` and health to a board actor.
* ``FrugalIngress`` (one replica, no CPU, ``ray_ingress.py``): the Host / API key / body-size guard of the plain
  server, then the relay. ``/health`` and ``/metrics`` answer for all replicas (``replica`` label). A replica that
  dies under a request gives that request an error: 503 before the answer started, an SSE ``error`` event after
  (never a silent loss). ``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` go to one replica (which checks the
  adapter); once it succeeded the change is recorded on the board and every other replica applies it before its
  next request.
* ``RayServeOptions`` (replicas, resources, router) and the routers' import paths: ``ray_options.py``.

This module puts them together (``build_app``) and runs ``frugallm serve --ray`` (``serve_forever``). Python users
build the application themselves::

    from ray import serve
    from frugallm.serve.ray_app import RayServeOptions, build_app, engine_builder

    app = build_app(engine_builder("default", dtype="float32"), RayServeOptions("default", replicas=2))
    serve.run(app, name="frugallm", route_prefix="/")
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from frugallm.engine.llm_engine import LLMEngine
from frugallm.errors import FrugalError
from frugallm.serve.ray_ingress import FrugalIngress
from frugallm.serve.ray_options import RayServeOptions, router_class
from frugallm.serve.ray_replica import FrugalEngine, engine_builder

__all__ = ["ENGINE", "INGRESS", "RayServeOptions", "build_app", "engine_builder", "serve_forever"]

ENGINE = "FrugalEngine"
INGRESS = "FrugalIngress"


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
