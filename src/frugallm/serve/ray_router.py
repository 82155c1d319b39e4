"""The Ray Serve request router of the engine replicas: adapters first, then prefix affinity, then load.

Ray's ``PrefixCacheAffinityRouter`` (prefix tree of the prompts each replica served; least loaded of two when queue
lengths differ by more than ``imbalanced_threshold``) already routes plain requests. For a request with a
multiplexed model id (a LoRA adapter) it loses the adapter: it asks Ray's multiplex routing for candidates a
second time in one routing round, and the second answer is "the replicas with the fewest adapters" (Ray 2.60), so
a request for an adapter goes to a replica *without* it. Here, an adapter request takes Ray's power-of-two
choices among the replicas holding its adapter (one multiplex query per round), and prefix affinity only picks
among those.

The router runs in the ingress replica (where the engine deployment's handle routes); Ray imports it by path.
"""

from __future__ import annotations

from typing import Any

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter

try:  # the public name; its module imports ray[llm]'s dependencies (pyarrow, ...)
    from ray.serve.llm.request_router import PrefixCacheAffinityRouter
except ImportError:  # the module that defines it, importable with ray[serve] alone
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter


def _has_prompt(pending_request: Any) -> bool:
    """Whether the request carries prompt text (a ``RouteKey`` with a non-empty ``prompt``)."""
    return pending_request is not None and any(getattr(a, "prompt", None) for a in pending_request.args or ())


class AdapterPrefixRouter(PrefixCacheAffinityRouter):
    """``PrefixCacheAffinityRouter`` that keeps multiplexed (adapter) requests on the replicas holding the adapter;
    requests without a prompt (``/v1/models``, ...) take the less loaded of two replicas."""

    async def choose_replicas(self, candidate_replicas: list[Any], pending_request: Any = None) -> list[list[Any]]:
        if not _has_prompt(pending_request):
            return await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        if not pending_request.metadata.multiplexed_model_id:
            return await super().choose_replicas(candidate_replicas, pending_request)
        ranked = await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        if ranked and len(ranked[0]) > 1:
            allowed = {r.replica_id for r in ranked[0]}
            best = (await self._prefix_match_best_replicas(pending_request, ranked[0]))[0]
            best = [r for r in best if r.replica_id in allowed]  # its fallback may name any replica
            if best:
                return [best]
        return ranked

    def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
        if _has_prompt(pending_request):  # the prefix tree records prompts only
            super().on_request_routed(pending_request, replica_id, result)
