"""Goodput by simulation: the highest request rate whose SLO attainment stays >= 90%.

DistServe's figure of merit. For a fixed pool shape, attainment falls as the rate rises (the
workload's requests are the same at every rate, only the clock is scaled: see
``Workload.unit_trace``), so the goodput is found by bracketing and bisection::

    r = guess;  double (or halve) r until attain(r) >= target > attain(2r)   -> [lo, hi]
    bisect geometrically until hi / lo <= 1 + rel_tol;  goodput = lo

Per-phase searches use one SLO each (prefill: TTFT, decode: TPOT) on a single instance, as
DistServe's placement search does; the joint search simulates the whole deployment against
both SLOs and is the number the planner reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .latency_model import TransferModel
from .simulator import PoolSpec, SimResult, Simulator
from .workload import SimRequest, Workload

TARGET_ATTAINMENT = 0.9


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise ValueError(f"SLOs must be positive seconds (got TTFT {self.ttft_s}, "
                             f"TPOT {self.tpot_s})")


def max_rate(attain: Callable[[float], float], guess: float, target: float = TARGET_ATTAINMENT,
             rel_tol: float = 0.03, max_doublings: int = 40) -> float:
    """The largest rate ``r`` with ``attain(r) >= target`` (0.0 when even ``guess / 2**20``
    fails), assuming attainment does not rise with the rate."""
    if guess <= 0 or not math.isfinite(guess):
        raise ValueError(f"rate guess {guess}: must be a positive number")
    lo = hi = None
    r = guess
    if attain(r) >= target:
        lo = r
        for _ in range(max_doublings):
            r *= 2
            if attain(r) < target:
                hi = r
                break
            lo = r
        else:
            return lo  # never saturates within 2**40 x the guess: report what was checked
    else:
        hi = r
        for _ in range(20):
            r /= 2
            if attain(r) >= target:
                lo = r
                break
            hi = r
        else:
            return 0.0
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if attain(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo


class GoodputSearch:
    """Goodput of pool shapes on one workload trace (``requests`` requests, seeded)."""

    def __init__(self, workload: Workload, slo: SLO, transfer: TransferModel | None = None,
                 requests: int = 400, seed: int = 0, target: float = TARGET_ATTAINMENT,
                 rel_tol: float = 0.03) -> None:
        if requests < 10:
            raise ValueError(f"requests={requests}: simulate at least 10 requests per rate")
        self.workload, self.slo, self.transfer = workload, slo, transfer or TransferModel()
        self.requests, self.seed, self.target, self.rel_tol = requests, seed, target, rel_tol
        self._traces: dict[int, tuple] = {}
        self.simulations = 0  # how many simulator runs so far (for progress reports)

    def trace(self, rate: float, n: int | None = None) -> list[SimRequest]:
        n = n or self.requests
        if n not in self._traces:
            self._traces[n] = self.workload.unit_trace(n, self.seed)
        t, p, o = self._traces[n]
        return [SimRequest(float(a / rate), int(x), int(y)) for a, x, y in zip(t, p, o)]

    def _search(self, run: Callable[[list[SimRequest]], SimResult], capacity: float,
                ttft: float | None, tpot: float | None, n: int | None = None) -> float:
        def attain(rate: float) -> float:
            if rate >= capacity:
                return 0.0  # overloaded: queues grow without bound, however short the trace
            self.simulations += 1
            return run(self.trace(rate, n)).attainment(ttft, tpot)

        if capacity <= 0:
            return 0.0
        guess = capacity / 2 if math.isfinite(capacity) else 1.0
        return max_rate(attain, guess, self.target, self.rel_tol)

    # ---- throughput bounds -----------------------------------------------------------------
    # A finite trace cannot see an overloaded queue grow for long, so a rate at or above the
    # pool's service capacity counts as failing outright. The capacities use mean lengths;
    # attention cost is convex in length, so they err high (never rejecting a feasible rate).
    def prefill_capacity(self, spec: PoolSpec, marginal: bool = False) -> float:
        """Prompts/s with every step full. ``marginal``: without the fixed step cost (a
        colocated instance pays it for its decodes anyway)."""
        lat, budget = spec.latency, spec.max_batched_tokens
        p = max(1, round(self.workload.mean_prompt))
        if p <= budget:  # one full step packs k prompts
            k = max(1, min(budget // p, spec.max_num_seqs))
            steps = [[(p, 0)] * k]
        else:  # one prompt takes several chunked steps
            k = 1
            steps = [[(min(budget, p - s), s)] for s in range(0, p, budget)]
        per = sum(lat.prefill_time(st) for st in steps) - (lat.prefill.a * len(steps)
                                                            if marginal else 0.0)
        return spec.replicas * k / per if per > 0 else math.inf

    def decode_capacity(self, spec: PoolSpec) -> float:
        """Requests/s with the batch at its limit (max_num_seqs or the KV pool)."""
        p, o = self.workload.mean_prompt, self.workload.mean_output
        if o <= 1:
            return math.inf
        b = spec.max_num_seqs
        if spec.latency.kv_capacity_tokens:
            b = max(1, min(b, int(spec.latency.kv_capacity_tokens // (p + o))))
        step = spec.latency.decode_time(b, round(b * (p + o / 2)))
        return spec.replicas * b / step / (o - 1)

    # ---- the searches ----------------------------------------------------------------------
    def prefill_rate(self, spec: PoolSpec) -> float:
        sim = Simulator("prefill", prefill=spec, transfer=self.transfer)
        return self._search(sim.run, self.prefill_capacity(spec), self.slo.ttft_s, None)

    def decode_rate(self, spec: PoolSpec) -> float:
        sim = Simulator("decode", decode=spec, transfer=self.transfer)
        return self._search(sim.run, self.decode_capacity(spec), None, self.slo.tpot_s)

    def colocated_rate(self, spec: PoolSpec) -> float:
        sim = Simulator("colocated", prefill=spec, transfer=self.transfer)
        cap = 1.0 / (1.0 / self.prefill_capacity(spec, marginal=True)
                     + 1.0 / self.decode_capacity(spec))
        return self._search(sim.run, cap, self.slo.ttft_s, self.slo.tpot_s, self.joint_requests)

    def disaggregated_rate(self, prefill: PoolSpec, decode: PoolSpec) -> float:
        sim = Simulator("disaggregated", prefill=prefill, decode=decode, transfer=self.transfer)
        cap = min(self.prefill_capacity(prefill), self.decode_capacity(decode))
        return self._search(sim.run, cap, self.slo.ttft_s, self.slo.tpot_s, self.joint_requests)

    @property
    def joint_requests(self) -> int:
        # Whole deployments spread the trace over several instances: a longer trace, but the
        # *same* one for every plan, so plans are compared on identical requests.
        return 2 * self.requests
