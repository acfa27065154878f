"""A Ray Serve request router for the pools: targeted calls and policy-ranked calls.

Serve's default router picks a replica by queue length. pdserve needs two more things:
  * a call with ``target=<instance id>`` must reach exactly that replica (the decode instance
    holding a request's blocks, the peer of a KV channel); if it is gone the call fails fast
    instead of landing on a replica that knows nothing of the request;
  * other calls are ranked by a ``RoutingPolicy`` over the stats replicas report.
"""

from __future__ import annotations

import logging
import weakref
from collections import defaultdict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .policy import Candidate, make_policy

log = logging.getLogger(__name__)


class TargetGone(RuntimeError):
    """The targeted instance is no longer a replica of the pool."""


# The request routers of each pool's handles in this process, by role (every handle variant,
# e.g. ``options(stream=True)``, has its own): the migration controller lists a pool's live
# replicas from them (Serve keeps each one's ``curr_replicas`` up to date).
_ROUTERS: dict[str, weakref.WeakSet] = defaultdict(weakref.WeakSet)


def live_replicas(role: str) -> list[str]:
    """Instance ids of the pool's running replicas as this process's handles see them
    (empty until a handle sent its first request)."""
    ids: set[str] = set()
    for r in list(_ROUTERS[role]):
        ids.update(i.unique_id for i in r.curr_replicas)
    return sorted(ids)


class InstanceRouter(RequestRouter):
    def initialize_state(self, policy: str = "prefix_aware", role: str = "decode",
                         prefix_weight: float = 1.0, **_) -> None:
        self._policy = make_policy(policy, prefix_weight=prefix_weight) \
            if policy == "prefix_aware" else make_policy(policy)
        self._role = role
        self._inflight: dict[str, int] = defaultdict(int)
        self._by_request: dict[str, str] = {}
        # Through the module by name: Serve may hand us a by-value copy of this class whose
        # globals are not the module's (the controller reads the module's registry).
        from pdserve.router import replica_router

        replica_router._ROUTERS[role].add(self)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get("target") if pending_request is not None else None
        if target:
            hit = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            if hit:
                return [hit]
            # Fail the call now rather than let Serve retry (with backoff) forever: resolve the
            # pending request with the error, then hand back any candidate; Serve's routing
            # loop sees the request is done and stops before sending it anywhere.
            if not pending_request.future.done():
                pending_request.future.set_exception(
                    TargetGone(f"instance {target} is not a live replica of the pool"))
            return [candidate_replicas[:1]]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cands = [Candidate(i, r.routing_stats or {}, self._inflight[i]) for i, r in by_id.items()]
        hint = pending_request.kwargs.get("routing") if pending_request is not None else None
        return [[by_id[c.instance_id]] for c in self._policy.rank(self._role, cands, hint)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        rid = replica_id.unique_id
        self._inflight[rid] += 1
        self._by_request[pending_request.metadata.internal_request_id] = rid

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = self._by_request.pop(internal_request_id, replica_id.unique_id)
        self._inflight[rid] = max(0, self._inflight[rid] - 1)
