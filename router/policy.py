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
class RoutingHint:
    """What the router knows about a request when choosing: its prompt length and, from the
    global prefix index, how many leading prompt tokens each instance already holds."""

    prompt_tokens: int
    cached_tokens: dict[str, int]  # instance id -> leading prompt tokens cached there


@dataclass(frozen=True)
class Candidate:
    instance_id: str
    stats: dict  # InstanceStats.as_routing_stats(); empty until the first report
    inflight: int  # requests this router has routed there that have not completed


class RoutingPolicy(ABC):
    """Contract: ``rank`` returns the candidates best first (a permutation of a subset); it
    must be cheap (called per request, on the event loop) and must not block."""

    @abstractmethod
    def rank(self, role: str, candidates: list[Candidate], hint: RoutingHint | None = None
             ) -> list[Candidate]: ...


class LeastLoaded(RoutingPolicy):
    """prefill: fewest queued prompt tokens (+ this router's in-flight prefills, each counted
    as an average prompt); decode: most free KV blocks, then smallest running batch."""

    AVG_PROMPT_TOKENS = 256

    def rank(self, role: str, candidates: list[Candidate], hint: RoutingHint | None = None
             ) -> list[Candidate]:
        if role == "decode":
            def key(c: Candidate):
                s = c.stats
                free = s.get("free_blocks", 0) - s.get("reserved_blocks", 0)
                return (bool(s.get("draining")), c.inflight + s.get("running", 0), -free)
        else:
            def key(c: Candidate):
                s = c.stats
                return (s.get("queued_prefill_tokens", 0) + c.inflight * self.AVG_PROMPT_TOKENS,
                        s.get("running", 0))
        return sorted(candidates, key=key)


class RoundRobin(RoutingPolicy):
    def __init__(self) -> None:
        self._n = itertools.count()

    def rank(self, role: str, candidates: list[Candidate], hint: RoutingHint | None = None
             ) -> list[Candidate]:
        if not candidates:
            return []
        ordered = sorted(candidates, key=lambda c: c.instance_id)
        k = next(self._n) % len(ordered)
        return ordered[k:] + ordered[:k]


class PrefixAware(RoutingPolicy):
    """Cache-aware, load-aware (the default).

    prefill: minimise the estimated prompt tokens ahead of and including this request,

        cost = queued_prefill_tokens + inflight * AVG_PROMPT_TOKENS
               + prompt_tokens - prefix_weight * cached_tokens

      i.e. its TTFT estimate in token units: a cache hit is worth exactly the tokens it saves
      (prefix_weight = 1), and a busy instance loses even if it holds the prefix.
    decode: minimise ``running + inflight - cached_tokens / AVG_PROMPT_TOKENS``: an instance
      holding a conversation's history (multi-turn) wins unless it is busier by more than that
      history is worth, measured in average prompts. Instances short of free blocks rank last.
    """

    AVG_PROMPT_TOKENS = 256

    def __init__(self, prefix_weight: float = 1.0) -> None:
        self.w = prefix_weight

    def rank(self, role: str, candidates: list[Candidate], hint: RoutingHint | None = None
             ) -> list[Candidate]:
        cached = hint.cached_tokens if hint else {}
        prompt = hint.prompt_tokens if hint else 0

        if role == "decode":
            def key(c: Candidate):
                s = c.stats
                free = s.get("free_blocks", 0) - s.get("reserved_blocks", 0)
                short = free * 16 < prompt or bool(s.get("draining"))  # coarse guard
                load = c.inflight + s.get("running", 0)
                return (short, load - cached.get(c.instance_id, 0) / self.AVG_PROMPT_TOKENS)
        else:
            def key(c: Candidate):
                s = c.stats
                return (s.get("queued_prefill_tokens", 0) + c.inflight * self.AVG_PROMPT_TOKENS
                        + prompt - self.w * cached.get(c.instance_id, 0))
        return sorted(candidates, key=key)


def make_policy(name: str, **kw) -> RoutingPolicy:
    if name == "prefix_aware":
        return PrefixAware(**kw)
    return {"least_loaded": LeastLoaded, "round_robin": RoundRobin}[name]()
