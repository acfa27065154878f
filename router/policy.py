"""Routing policies: which instance of a pool gets a request.

A policy ranks candidates from the stats each instance reports (``InstanceStats`` fields, a
few hundred ms old) plus what this router sent them since (``inflight``). It never sees
requests' text; prefix-aware routing adds the prefix index as another input.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    instance_id: str
    stats: dict  # InstanceStats.as_routing_stats(); empty until the first report
    inflight: int  # requests this router has routed there that have not completed


class RoutingPolicy(ABC):
    """Contract: ``rank`` returns the candidates best first (a permutation of a subset); it
    must be cheap (called per request, on the event loop) and must not block."""

    @abstractmethod
    def rank(self, role: str, candidates: list[Candidate]) -> list[Candidate]: ...


class LeastLoaded(RoutingPolicy):
    """prefill: fewest queued prompt tokens (+ this router's in-flight prefills, each counted
    as an average prompt); decode: most free KV blocks, then smallest running batch."""

    AVG_PROMPT_TOKENS = 256

    def rank(self, role: str, candidates: list[Candidate]) -> list[Candidate]:
        if role == "decode":
            def key(c: Candidate):
                s = c.stats
                free = s.get("free_blocks", 0) - s.get("reserved_blocks", 0)
                return (c.inflight + s.get("running", 0), -free)
        else:
            def key(c: Candidate):
                s = c.stats
                return (s.get("queued_prefill_tokens", 0) + c.inflight * self.AVG_PROMPT_TOKENS,
                        s.get("running", 0))
        return sorted(candidates, key=key)


class RoundRobin(RoutingPolicy):
    def __init__(self) -> None:
        self._n = itertools.count()

    def rank(self, role: str, candidates: list[Candidate]) -> list[Candidate]:
        if not candidates:
            return []
        ordered = sorted(candidates, key=lambda c: c.instance_id)
        k = next(self._n) % len(ordered)
        return ordered[k:] + ordered[:k]


def make_policy(name: str) -> RoutingPolicy:
    return {"least_loaded": LeastLoaded, "round_robin": RoundRobin}[name]()
