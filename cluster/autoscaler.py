"""The SLO-driven autoscaling policy of one pool: ``(metrics snapshot, state) -> decision``.

Pure: no clocks, no Ray, no I/O. ``PoolAutoscaler.decide(metrics, state)`` returns a
``Decision`` (target replicas + a reason) and the new state, a JSON-able dict, so the same
object can back a Ray Serve custom autoscaling policy (whose ``policy_state`` dict it fits),
a controller actor, or a unit test replaying a recorded metric series.

Signals (smoothed by an exponential moving average with time constant ``smoothing_s``)::

    prefill   predicted TTFT  = queued prompt tokens / (ready replicas * tokens/s per replica)
              utilization     = prompt tokens/s arriving / (replicas * tokens/s per replica)
                                (or the replicas' mean busy fraction when the rate is unknown)
    decode    KV utilization  = KV blocks used / KV blocks in the pool
              TPOT            = replicas' measured TPOT, weighted by their running requests
    colocated both sets

Desired count::

    prefill out: TTFT > ttft_high * SLO  or  util > util_high
                 -> max(n + 1, ceil(n * util / util_target), ceil(queued / (tput * ttft_high * SLO)))
    prefill in:  TTFT < ttft_low * SLO  and  util * n / (n - 1) <= util_target
    decode out:  KV > kv_high  or  TPOT > tpot_high * SLO  -> max(n + 1, ceil(n * KV / kv_target))
    decode in:   KV * n / (n - 1) <= kv_target  and  TPOT < tpot_low * SLO (or no tokens)

Why it does not flap (LESSONS #8): the out and in thresholds are far apart, and scale-in is
judged on the load *after* removing a replica against the lower target (so it cannot land
straight back above the scale-out threshold); a condition must hold for ``out_after_s`` /
``in_after_s`` before acting; after any change the next scale-out waits ``out_cooldown_s`` and
the next scale-in ``in_cooldown_s``; scale-in removes one replica at a time (a decode replica is
drained, not killed, by whoever applies the decision). ``n`` is the count already asked for
(starting replicas included), so a scale-out is not repeated while its replicas start, and a
replica's latency and throughput samples are ignored for ``warmup_s`` after it first appears
(cold-start samples are slow and would over-scale).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

POOLS = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class ReplicaMetrics:
    replica_id: str
    queued_prompt_tokens: int = 0  # prompt tokens waiting or mid-prefill
    prefill_tokens_per_s: float | None = None  # prefill tokens per *busy* second, last window
    busy_fraction: float | None = None  # share of the window spent in engine steps
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    tpot_s: float | None = None  # mean TPOT of tokens emitted in the window (None: none)
    running: int = 0  # requests in the decode batch


@dataclass(frozen=True)
class PoolMetrics:
    pool: str  # prefill | decode | colocated
    now: float  # seconds on any monotonic clock
    replicas: tuple[ReplicaMetrics, ...]  # the ready replicas
    target_replicas: int  # replicas asked for now (ready + starting)
    prompt_tokens_per_s: float | None = None  # prompt tokens arriving at the pool per second

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r}: choose one of {', '.join(POOLS)}")

    @classmethod
    def from_replica_metrics(cls, pool: str, now: float, metrics: dict[str, dict[Any, float]],
                             target_replicas: int, prompt_tokens_per_s: float | None = None
                             ) -> PoolMetrics:
        """From ``{metric: {replica: value}}`` (the shape of Ray Serve's
        ``AutoscalingContext.aggregated_metrics``), metric names = ``ReplicaMetrics`` fields.
        A replica is any key seen under any metric; missing values take the defaults."""
        fields = {f for f in ReplicaMetrics.__dataclass_fields__ if f != "replica_id"}
        ints = {"queued_prompt_tokens", "kv_blocks_used", "kv_blocks_total", "running"}
        per: dict[str, dict[str, Any]] = {}
        for name, values in metrics.items():
            if name in fields:
                for rid, v in values.items():
                    per.setdefault(str(rid), {})[name] = int(v) if name in ints else float(v)
        reps = tuple(ReplicaMetrics(rid, **kw) for rid, kw in sorted(per.items()))
        return cls(pool, now, reps, target_replicas, prompt_tokens_per_s)


@dataclass(frozen=True)
class ScalingPolicy:
    ttft_slo_s: float = 1.0
    tpot_slo_s: float = 0.1
    min_replicas: int = 1
    max_replicas: int = 8
    ttft_high: float = 0.5  # fraction of the TTFT SLO that queueing may use before scaling out
    ttft_low: float = 0.1
    util_high: float = 0.85
    util_target: float = 0.6
    kv_high: float = 0.85
    kv_target: float = 0.6
    tpot_high: float = 0.9  # fraction of the TPOT SLO
    tpot_low: float = 0.6
    smoothing_s: float = 10.0
    out_after_s: float = 5.0
    in_after_s: float = 60.0
    out_cooldown_s: float = 30.0
    in_cooldown_s: float = 120.0
    warmup_s: float = 30.0
    max_step_out: int = 4
    prior_prefill_tokens_per_s: float | None = None  # e.g. from `pdserve profile`

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas ({self.min_replicas}) <= max_replicas "
                             f"({self.max_replicas})")
        if not (self.ttft_low < self.ttft_high and self.util_target < self.util_high
                and self.kv_target < self.kv_high and self.tpot_low < self.tpot_high):
            raise ValueError("each scale-in threshold must sit below its scale-out threshold "
                             "(ttft_low < ttft_high, util_target < util_high, kv_target < "
                             "kv_high, tpot_low < tpot_high)")


@dataclass(frozen=True)
class Decision:
    target: int
    current: int  # the count asked for before this decision
    action: str  # out | in | hold
    reason: str
    signals: dict[str, float] = field(default_factory=dict)  # smoothed values used

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _g(x: float) -> str:
    return f"{x:.3g}" if x >= 1e-3 else "0"


def _ewma(state: dict, key: str, value: float | None, dt: float, tau: float) -> float | None:
    """Smooth ``value`` into ``state[key]`` (time constant ``tau``); None keeps the old value."""
    old = state.get(key)
    if value is None:
        return old
    new = value if old is None else old + (1 - math.exp(-dt / tau)) * (value - old)
    state[key] = new
    return new


class PoolAutoscaler:
    def __init__(self, policy: ScalingPolicy) -> None:
        self.policy = policy

    def decide(self, m: PoolMetrics, state: dict[str, Any] | None = None
               ) -> tuple[Decision, dict[str, Any]]:
        p = self.policy
        st: dict[str, Any] = {"ewma": {}, "seen": {}, "t": None, "changed_at": None,
                              "out_since": None, "in_since": None, **(state or {})}
        st = {**st, "ewma": dict(st["ewma"]), "seen": dict(st["seen"])}
        dt = 0.0 if st["t"] is None else max(0.0, m.now - st["t"])
        st["t"] = m.now
        st["seen"] = {r.replica_id: st["seen"].get(r.replica_id, m.now) for r in m.replicas}
        warm = [r for r in m.replicas if m.now - st["seen"][r.replica_id] >= p.warmup_s]
        n = max(m.target_replicas, len(m.replicas))
        sig: dict[str, float] = {}
        wants: list[tuple[int, str]] = []  # (replicas wanted, why), one per signal group
        if m.pool in ("prefill", "colocated"):
            wants.append(self._prefill(m, warm, n, st, dt, sig))
        if m.pool in ("decode", "colocated"):
            wants.append(self._decode(m, warm, n, st, dt, sig))
        # colocated: either group may ask for more; fewer only when both agree
        if any(w > n for w, _ in wants):
            want, why = max(wants)
        elif all(w < n for w, _ in wants):
            want, why = min(wants)
        else:
            want, why = n, "; ".join(w for _, w in wants)
        return self._act(m.now, n, want, why, st, sig), st

    # ---- signals -----------------------------------------------------------------------------
    def _prefill(self, m: PoolMetrics, warm: list[ReplicaMetrics], n: int, st: dict, dt: float,
                 sig: dict) -> tuple[int, str]:
        p, ew = self.policy, st["ewma"]
        measured = [r.prefill_tokens_per_s for r in warm if r.prefill_tokens_per_s]
        tput = _ewma(ew, "tput", statistics.median(measured) if measured else None, dt,
                     p.smoothing_s) or p.prior_prefill_tokens_per_s
        if not tput:
            return n, "prefill: no throughput measured yet (warming up)"
        queued = sum(r.queued_prompt_tokens for r in m.replicas)
        ttft = _ewma(ew, "ttft", queued / (tput * max(1, len(m.replicas))), dt, p.smoothing_s)
        busy = [r.busy_fraction for r in warm if r.busy_fraction is not None]
        raw_util = (m.prompt_tokens_per_s / (tput * n) if m.prompt_tokens_per_s is not None
                    else statistics.fmean(busy) if busy else None)
        util = _ewma(ew, "util", raw_util, dt, p.smoothing_s)
        sig.update(prefill_tokens_per_s=tput, predicted_ttft_s=ttft)
        if util is not None:
            sig["prefill_util"] = util
        slo = p.ttft_slo_s
        what = f"prefill: predicted TTFT {_g(ttft)} s (SLO {slo:g} s)" + (
            f", utilization {util:.2f}" if util is not None else "")
        hot = ([f"TTFT > {p.ttft_high:g} x SLO"] if ttft > p.ttft_high * slo else []) + (
            [f"utilization > {p.util_high:g}"] if util is not None and util > p.util_high else [])
        if hot:
            need = max(n + 1, math.ceil(queued / (tput * p.ttft_high * slo)))
            if util is not None:
                need = max(need, math.ceil(n * util / p.util_target))
            return need, f"{what}: {' and '.join(hot)}"
        if (n > 1 and ttft < p.ttft_low * slo and util is not None
                and util * n / (n - 1) <= p.util_target):
            return n - 1, (f"{what}: with {n - 1} replica(s) utilization would be "
                           f"{util * n / (n - 1):.2f} <= {p.util_target:g}")
        return n, what

    def _decode(self, m: PoolMetrics, warm: list[ReplicaMetrics], n: int, st: dict, dt: float,
                sig: dict) -> tuple[int, str]:
        p, ew = self.policy, st["ewma"]
        total = sum(r.kv_blocks_total for r in m.replicas)
        kv = _ewma(ew, "kv", sum(r.kv_blocks_used for r in m.replicas) / total if total else None,
                   dt, p.smoothing_s)
        rated = [(r.tpot_s, max(1, r.running)) for r in warm if r.tpot_s is not None]
        tpot = _ewma(ew, "tpot", sum(t * w for t, w in rated) / sum(w for _, w in rated)
                     if rated else None, dt, p.smoothing_s)
        if kv is None:
            return n, "decode: no KV usage reported yet"
        sig["kv_util"] = kv
        slo = p.tpot_slo_s
        what = f"decode: KV use {kv:.2f}"
        if tpot is not None:
            sig["tpot_s"] = tpot
            what += f", TPOT {_g(tpot)} s (SLO {slo:g} s)"
        hot = ([f"KV use > {p.kv_high:g}"] if kv > p.kv_high else []) + (
            [f"TPOT > {p.tpot_high:g} x SLO"] if tpot is not None and tpot > p.tpot_high * slo
            else [])
        if hot:
            return max(n + 1, math.ceil(n * kv / p.kv_target)), f"{what}: {' and '.join(hot)}"
        if (n > 1 and kv * n / (n - 1) <= p.kv_target
                and (tpot is None or tpot < p.tpot_low * slo)):
            return n - 1, (f"{what}: with {n - 1} replica(s) KV use would be "
                           f"{kv * n / (n - 1):.2f} <= {p.kv_target:g}")
        return n, what

    # ---- hysteresis in time ------------------------------------------------------------------
    def _act(self, now: float, n: int, want: int, why: str, st: dict, sig: dict) -> Decision:
        p = self.policy
        if n < p.min_replicas or n > p.max_replicas:
            target = min(max(n, p.min_replicas), p.max_replicas)
            return self._change(now, n, target, f"outside [{p.min_replicas}, {p.max_replicas}]"
                                f" replicas; {why}", st, sig)
        want = min(max(want, p.min_replicas), p.max_replicas)
        since = st["changed_at"]
        if want > n:
            st["in_since"] = None
            st["out_since"] = st["out_since"] if st["out_since"] is not None else now
            held, cool = now - st["out_since"], since is None or now - since >= p.out_cooldown_s
            if held >= p.out_after_s and cool:
                return self._change(now, n, min(want, n + p.max_step_out), why, st, sig)
            wait = "cooldown" if held >= p.out_after_s else f"held {held:.0f}/{p.out_after_s:g} s"
            return Decision(n, n, "hold", f"scale-out pending ({wait}): {why}", sig)
        if want < n:
            st["out_since"] = None
            st["in_since"] = st["in_since"] if st["in_since"] is not None else now
            held, cool = now - st["in_since"], since is None or now - since >= p.in_cooldown_s
            if held >= p.in_after_s and cool:
                return self._change(now, n, n - 1, why, st, sig)
            wait = "cooldown" if held >= p.in_after_s else f"held {held:.0f}/{p.in_after_s:g} s"
            return Decision(n, n, "hold", f"scale-in pending ({wait}): {why}", sig)
        st["out_since"] = st["in_since"] = None
        return Decision(n, n, "hold", f"steady: {why}", sig)

    @staticmethod
    def _change(now: float, n: int, target: int, why: str, st: dict, sig: dict) -> Decision:
        st["changed_at"], st["out_since"], st["in_since"] = now, None, None
        action = "out" if target > n else "in" if target < n else "hold"
        return Decision(target, n, action, f"scale {action} {n} -> {target}: {why}", sig)
