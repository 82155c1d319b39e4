"""How the Ray Serve application serves (``RayServeOptions``) and which request router routes to the engine replicas.

The routers are named by import path (Ray imports them in the ingress replica); see ``ray_router.py``.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

from frugallm.engine.async_llm import DEFAULT_MAX_QUEUE
from frugallm.errors import FrugalError
from frugallm.serve.app import DEFAULT_MAX_BODY_BYTES

log = logging.getLogger("frugallm.serve")

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


def router_class(name: str) -> str:
    """The import path of router ``name``, or of Ray's default router where this Ray lacks what it needs."""
    module, _, cls = ROUTERS[name].partition(":")
    try:
        if hasattr(importlib.import_module(module), cls):
            return ROUTERS[name]
    except ImportError as e:
        log.warning("Ray router %r is not available with this Ray (%s); using Ray's default router", name, e)
    return ROUTERS["pow2"]
