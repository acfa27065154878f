"""Prometheus metrics of the router (``GET /metrics``): what clients experienced.

Latency histograms are measured where the client's stream is produced (``Frontend.stream``):
TTFT from the request's admission to its first token, TPOT as the mean gap between later
tokens, end-to-end until the last token. Counters mirror the orchestrator's (retries,
recoveries, prefix-index hits and errors). A private registry per router replica.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)

TTFT = Histogram("pdserve_ttft_seconds", "Time to first token", buckets=_BUCKETS,
                 registry=REGISTRY)
TPOT = Histogram("pdserve_tpot_seconds", "Mean time per output token after the first",
                 buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0),
                 registry=REGISTRY)
E2E = Histogram("pdserve_e2e_seconds", "Request latency, first byte in to last token out",
                buckets=_BUCKETS + (60.0, 120.0), registry=REGISTRY)
REQUESTS = Counter("pdserve_requests_total", "Finished requests by outcome", ["outcome"],
                   registry=REGISTRY)
TOKENS = Counter("pdserve_output_tokens_total", "Generated tokens streamed to clients",
                 registry=REGISTRY)
ORCH = Gauge("pdserve_orchestrator_events", "Orchestrator counters since start "
             "(retries, recoveries, index_errors, index_hit_tokens, prompt_tokens, ...)",
             ["event"], registry=REGISTRY)


class RequestTimer:
    """Tracks one request's stream; ``finish`` records it exactly once."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.done = False

    def tokens_out(self, n_total: int) -> None:
        now = time.monotonic()
        if self.first is None and n_total > 0:
            self.first = now
            TTFT.observe(now - self.t0)
        if n_total > self.tokens:
            TOKENS.inc(n_total - self.tokens)
            self.tokens = n_total
            self.last = now

    def finish(self, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        REQUESTS.labels(outcome).inc()
        if self.last is not None:
            E2E.observe(self.last - self.t0)
            if self.tokens > 1 and self.first is not None:
                TPOT.observe((self.last - self.first) / (self.tokens - 1))


def render(orchestrator_stats: dict) -> bytes:
    for k, v in orchestrator_stats.items():
        ORCH.labels(k).set(v)
    return generate_latest(REGISTRY)
