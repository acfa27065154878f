"""Prometheus metrics of the router (``GET /metrics``): what clients experienced, and what
the pools look like.

Latency histograms are measured where the client's stream is produced (``Frontend.stream``):
TTFT from the request's admission to its first token, TPOT as the mean gap between later
tokens, end-to-end until the last token. Counters mirror the orchestrator's (retries,
recoveries, prefix-index hits and errors). A private registry per router replica.

Pool gauges (queue, queued prompt tokens, replicas) and per-instance gauges (batch size, KV
blocks used) come from the scaling controller's snapshot (``cluster/scaling.py``), taken every
``autoscaling.interval_s`` whether autoscaling is on or not; SLO attainment is over the
requests that finished in the last ``WINDOW.window_s`` seconds (``SloWindow``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

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
POOL_QUEUE = Gauge("pdserve_pool_queue_requests", "Requests waiting for a pool: in the "
                   "router's admission queue plus in its instances' waiting queues", ["pool"],
                   registry=REGISTRY)
POOL_QUEUED_TOKENS = Gauge("pdserve_pool_queued_prompt_tokens", "Prompt tokens waiting or "
                           "mid-prefill in a pool's instances", ["pool"], registry=REGISTRY)
POOL_REPLICAS = Gauge("pdserve_pool_replicas", "Replicas of a pool by Serve state "
                      "(RUNNING, STARTING, STOPPING, ...; DRAINING: running, taking no requests)",
                      ["pool", "state"], registry=REGISTRY)
POOL_TARGET = Gauge("pdserve_pool_target_replicas", "Replicas a pool is asked to run",
                    ["pool"], registry=REGISTRY)
BATCH = Gauge("pdserve_instance_batch_size", "Requests in an instance's running batch",
              ["pool", "instance"], registry=REGISTRY)
KV_USED = Gauge("pdserve_instance_kv_blocks_used", "KV-cache blocks in use on an instance",
                ["pool", "instance"], registry=REGISTRY)
KV_TOTAL = Gauge("pdserve_instance_kv_blocks_total", "KV-cache blocks of an instance",
                 ["pool", "instance"], registry=REGISTRY)
PREFIX_HIT = Gauge("pdserve_prefix_cache_hit_ratio", "Prompt tokens served from instances' "
                   "prefix caches / prompt tokens looked up, since start", ["pool"],
                   registry=REGISTRY)
TRANSFER_BYTES = Gauge("pdserve_kv_transfer_received_bytes", "KV bytes received by decode "
                       "instances since the router started", registry=REGISTRY)
TRANSFER_SECONDS = Gauge("pdserve_kv_transfer_seconds", "Time decode instances spent on the "
                         "KV transfers they received, by phase (wait: for the sender; "
                         "transfer: on the wire; scatter: into the paged cache)", ["phase"],
                         registry=REGISTRY)
SLO_ATTAINMENT = Gauge("pdserve_slo_attainment", "Share of requests finished in the sliding "
                       "window that met the SLO (ttft, tpot, or both)", ["slo"],
                       registry=REGISTRY)
SLO_TARGET = Gauge("pdserve_slo_target_seconds", "The SLO targets in force", ["slo"],
                   registry=REGISTRY)
DECISIONS = Counter("pdserve_autoscaler_decisions_total", "Scaling decisions by pool, action "
                    "(out, in, hold) and source (autoscaler, operator); a change is also "
                    "logged with its reason", ["pool", "action", "source"], registry=REGISTRY)
DECISION_TARGET = Gauge("pdserve_autoscaler_target_replicas", "Replicas the latest scaling "
                        "decision asked for", ["pool"], registry=REGISTRY)

MIGRATION = Gauge("pdserve_migration_events", "Live-migration counters since start "
                  "(migrations, migrations_<trigger>, failed, drains)", ["event"], registry=REGISTRY)


class SloWindow:
    """Finished requests of the last ``window_s`` seconds and the SLOs they are judged by
    (changeable at run time; attainment is recomputed against the targets in force)."""

    def __init__(self, window_s: float = 60.0, ttft_s: float = 1.0, tpot_s: float = 0.1,
                 clock=time.monotonic) -> None:
        self.window_s = window_s
        self.ttft_s, self.tpot_s = ttft_s, tpot_s
        self.clock = clock
        self._done: deque[tuple[float, float | None, float | None]] = deque()  # (t, ttft, tpot)
        self._lock = threading.Lock()  # timers may finish on the gRPC server's threads

    def record(self, ttft: float | None, tpot: float | None) -> None:
        with self._lock:
            self._done.append((self.clock(), ttft, tpot))
            self._trim()

    def _trim(self) -> None:
        cut = self.clock() - self.window_s
        while self._done and self._done[0][0] < cut:
            self._done.popleft()

    def summary(self) -> dict:
        """Rate, attainment and p50/p99 of TTFT/TPOT over the window (None: no request)."""
        with self._lock:
            self._trim()
            done = list(self._done)
        ttfts = sorted(x for _, x, _ in done if x is not None)
        tpots = sorted(x for _, _, x in done if x is not None)
        ok_ttft = [x is not None and x <= self.ttft_s for _, x, _ in done]
        ok_tpot = [y is None or y <= self.tpot_s for _, _, y in done]

        def share(oks: list[bool]) -> float | None:
            return sum(oks) / len(oks) if oks else None

        return {"window_s": self.window_s, "requests": len(done),
                "rate": len(done) / self.window_s,
                "slo": {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s},
                "attainment": {"ttft": share(ok_ttft), "tpot": share(ok_tpot),
                               "both": share([a and b for a, b in zip(ok_ttft, ok_tpot)])},
                "ttft": {"p50": _pct(ttfts, 50), "p99": _pct(ttfts, 99)},
                "tpot": {"p50": _pct(tpots, 50), "p99": _pct(tpots, 99)},
                "tpot_mean": sum(tpots) / len(tpots) if tpots else None}


def _pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted ``xs``."""
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


WINDOW = SloWindow()


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
        tpot = None
        if self.last is not None:
            E2E.observe(self.last - self.t0)
            if self.tokens > 1 and self.first is not None:
                tpot = (self.last - self.first) / (self.tokens - 1)
                TPOT.observe(tpot)
        if outcome == "ok":
            WINDOW.record(None if self.first is None else self.first - self.t0, tpot)


def observe_pools(snapshot: dict[str, dict], admission: dict[str, dict] | None = None,
                  transfer_bytes: int | None = None,
                  transfer_seconds: dict[str, float] | None = None) -> None:
    """Set the pool and instance gauges from a scaling-controller snapshot
    (``{pool: {"target": n, "replicas": [ReplicaView as dict]}}``) and the admission gates'
    stats. Instances that are gone disappear from the gauges."""
    for g in (BATCH, KV_USED, KV_TOTAL, POOL_REPLICAS):
        g.clear()
    for pool, p in snapshot.items():
        reps = p["replicas"]
        waiting = (admission or {}).get(pool, {}).get("waiting", 0)
        POOL_QUEUE.labels(pool).set(waiting + sum(r["waiting"] for r in reps))
        POOL_QUEUED_TOKENS.labels(pool).set(sum(r["queued_prompt_tokens"] for r in reps))
        POOL_TARGET.labels(pool).set(p["target"])
        states: dict[str, int] = {}
        for r in reps:
            states[r["state"]] = states.get(r["state"], 0) + 1
            if r["kv_blocks_total"]:
                BATCH.labels(pool, r["replica_id"]).set(r["running"])
                KV_USED.labels(pool, r["replica_id"]).set(r["kv_blocks_used"])
                KV_TOTAL.labels(pool, r["replica_id"]).set(r["kv_blocks_total"])
        for state, n in states.items():
            POOL_REPLICAS.labels(pool, state).set(n)
        q = sum(r["prefix_query_tokens"] for r in reps)
        PREFIX_HIT.labels(pool).set(sum(r["prefix_hit_tokens"] for r in reps) / q if q else 0.0)
    if transfer_bytes is not None:
        TRANSFER_BYTES.set(transfer_bytes)
    for phase, v in (transfer_seconds or {}).items():
        TRANSFER_SECONDS.labels(phase).set(v)


def observe_migration(snapshot: dict | None) -> None:
    """Export the migration controller's counters (``MigrationController.snapshot()``)."""
    for k, v in (snapshot or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            MIGRATION.labels(k).set(v)
    for reason, n in (snapshot or {}).get("by_reason", {}).items():
        MIGRATION.labels(f"migrations_{reason}").set(n)


def observe_decision(rec: dict) -> None:
    """Export one scaling decision (the controller's ``on_decision``)."""
    DECISIONS.labels(rec["pool"], rec["action"], rec["source"]).inc()
    DECISION_TARGET.labels(rec["pool"]).set(rec["target"])


def render(orchestrator_stats: dict) -> bytes:
    for k, v in orchestrator_stats.items():
        if isinstance(v, (int, float)):
            ORCH.labels(k).set(v)
    s = WINDOW.summary()
    for k, v in s["attainment"].items():
        SLO_ATTAINMENT.labels(k).set(float("nan") if v is None else v)
    SLO_TARGET.labels("ttft").set(WINDOW.ttft_s)
    SLO_TARGET.labels("tpot").set(WINDOW.tpot_s)
    return generate_latest(REGISTRY)
