"""The autoscaling policy on recorded metric series: a small fluid model of a pool (seeded
noise, replicas that take a while to start) produces one snapshot per second, the policy
decides, and its decision changes the replicas the next snapshots see."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable

import pytest
from pdserve.cluster.autoscaler import (
    Decision,
    PoolAutoscaler,
    PoolMetrics,
    ReplicaMetrics,
    ScalingPolicy,
)

PROMPT = 500  # tokens per request
TPUT = 4000.0  # prefill tokens/s of one replica: 8 req/s
STARTUP_S = 5.0


def run_prefill(policy: ScalingPolicy, rate: Callable[[float], float], seconds: int, n0: int,
                seed: int = 0, noise: float = 0.3) -> list[tuple[float, Decision]]:
    """Replay ``seconds`` of load (requests/s at time t, multiplicative log-normal noise per
    second) through the policy; returns (time, decision) per tick."""
    rng = random.Random(seed)
    scaler, state = PoolAutoscaler(policy), None
    ids = iter(range(10**6))
    ready = [f"r{next(ids)}" for _ in range(n0)]
    starting: list[tuple[float, str]] = []
    target, queue, out = n0, 0.0, []
    for now in range(seconds):
        ready += [rid for t, rid in starting if t <= now]
        starting = [(t, rid) for t, rid in starting if t > now]
        lam = rate(now) * PROMPT * math.exp(noise * rng.gauss(0, 1) - noise**2 / 2)
        cap = len(ready) * TPUT
        queue = max(0.0, queue + lam - cap)
        busy = min(1.0, (lam + queue) / cap)
        reps = tuple(ReplicaMetrics(rid, queued_prompt_tokens=int(queue / len(ready)),
                                    prefill_tokens_per_s=TPUT * (1 + 0.1 * rng.gauss(0, 1)),
                                    busy_fraction=busy) for rid in ready)
        m = PoolMetrics("prefill", float(now), reps, target, prompt_tokens_per_s=lam)
        d, state = scaler.decide(m, state)
        state = json.loads(json.dumps(state))  # what a Serve policy_state round trip does
        out.append((float(now), d))
        if d.target > target:
            starting += [(now + STARTUP_S, f"r{next(ids)}") for _ in range(d.target - target)]
        for _ in range(target - d.target):  # drain the newest (a starting one first)
            if starting:
                starting.pop()
            else:
                ready.pop()
        target = d.target
    return out


def changes(history: list[tuple[float, Decision]]) -> list[tuple[float, Decision]]:
    return [(t, d) for t, d in history if d.action != "hold"]


def reversals(history: list[tuple[float, Decision]]) -> int:
    acts = [d.action for _, d in changes(history)]
    return sum(1 for a, b in itertools.pairwise(acts) if a != b)


def ramp(t: float) -> float:
    """2 req/s, up to 20 over 100 s, 200 s at 20, back down to 2 and stay."""
    if t < 100:
        return 2.0
    if t < 200:
        return 2.0 + 18.0 * (t - 100) / 100
    if t < 400:
        return 20.0
    if t < 450:
        return 20.0 - 18.0 * (t - 400) / 50
    return 2.0


def test_scales_out_under_a_ramp_and_back_in_after():
    policy = ScalingPolicy(ttft_slo_s=1.0, max_replicas=8)
    hist = run_prefill(policy, ramp, 1400, n0=1)
    during = [d.target for t, d in hist if 250 <= t < 400]
    # 20 req/s x 500 tokens = 10k tokens/s: at least 3 replicas of 4k to stay below util_high
    assert min(during) >= 3
    assert hist[-1][1].target == 1
    assert reversals(hist) == 1  # all scale-outs, then all scale-ins
    ch = changes(hist)
    assert ch[0][1].action == "out" and "utilization >" in ch[0][1].reason
    assert all(d.reason.startswith(f"scale {d.action}") for _, d in ch)
    for (t0, _), (t1, d1) in itertools.pairwise(ch):  # cooldowns hold between changes
        assert t1 - t0 >= (policy.out_cooldown_s if d1.action == "out" else policy.in_cooldown_s)


@pytest.mark.parametrize(("level", "n0"), [(10.0, 2), (13.0, 2), (4.0, 1)])
def test_noisy_steady_load_never_flaps(level, n0):
    # 13 req/s on 2 replicas is 81% utilization: right under the scale-out threshold
    hist = run_prefill(ScalingPolicy(ttft_slo_s=1.0), lambda t: level, 3000, n0, seed=11)
    assert reversals(hist) == 0
    assert len(changes(hist)) <= 1


def test_the_noisy_series_does_flap_a_policy_without_hysteresis():
    """The steady series above is noisy enough to matter: with no smoothing, no delays, no
    cooldowns and nearly equal thresholds the same series flaps."""
    naive = ScalingPolicy(ttft_slo_s=1.0, util_high=0.7, util_target=0.69, smoothing_s=0.01,
                          out_after_s=0, in_after_s=0, out_cooldown_s=0, in_cooldown_s=0,
                          warmup_s=0)
    hist = run_prefill(naive, lambda t: 10.0, 600, n0=2, seed=11)
    assert reversals(hist) >= 5


def decode_snapshot(now: float, kv: list[float], tpot: list[float | None], target: int,
                    ids: list[str] | None = None) -> PoolMetrics:
    ids = ids or [f"d{i}" for i in range(len(kv))]
    return PoolMetrics("decode", now, tuple(
        ReplicaMetrics(i, kv_blocks_used=int(k * 1000), kv_blocks_total=1000, tpot_s=t,
                       running=8) for i, k, t in zip(ids, kv, tpot)), target)


def test_cold_replica_samples_do_not_trigger_scale_out():
    def replay(policy: ScalingPolicy) -> list[Decision]:
        scaler, state, out = PoolAutoscaler(policy), None, []
        for now in range(200):
            ids, kv, tpot = ["a", "b"], [0.7, 0.7], [0.03, 0.03]
            if now >= 100:  # a third replica just started: slow first steps, empty KV
                ids, kv, tpot = [*ids, "c"], [*kv, 0.0], [*tpot, 1.0 if now < 120 else 0.03]
            d, state = scaler.decide(decode_snapshot(now, kv, tpot, len(ids), ids), state)
            out.append(d)
        return out

    warm = replay(ScalingPolicy(tpot_slo_s=0.1, warmup_s=30))
    assert all(d.action == "hold" for d in warm)
    cold = replay(ScalingPolicy(tpot_slo_s=0.1, warmup_s=0))
    assert any(d.action == "out" for d in cold)


def test_decode_scales_on_kv_pressure_and_drains_one_at_a_time():
    scaler, state, n, hist = PoolAutoscaler(ScalingPolicy(max_replicas=6)), None, 2, []
    for now in range(900):
        demand = 3.0 if 50 <= now < 300 else 0.4  # in replicas' worth of KV
        kv = min(1.0, demand / n)
        d, state = scaler.decide(decode_snapshot(now, [kv] * n, [0.02] * n, n), state)
        hist.append((float(now), d))
        n = d.target
    outs = [d for _, d in changes(hist) if d.action == "out"]
    assert outs and "KV use" in outs[0].reason
    assert max(d.target for _, d in hist) >= math.ceil(3.0 / 0.85)
    ins = [d for _, d in changes(hist) if d.action == "in"]
    assert all(d.current - d.target == 1 for d in ins)
    assert hist[-1][1].target == 1


def test_bounds_are_enforced_at_once():
    scaler = PoolAutoscaler(ScalingPolicy(min_replicas=2, max_replicas=3))
    d, _ = scaler.decide(decode_snapshot(0.0, [0.1] * 5, [0.01] * 5, 5), None)
    assert (d.target, d.action) == (3, "in") and "outside [2, 3]" in d.reason
    d, _ = scaler.decide(decode_snapshot(0.0, [0.1], [0.01], 1), None)
    assert d.target == 2


def test_policy_validates_thresholds():
    with pytest.raises(ValueError, match="below its scale-out"):
        ScalingPolicy(util_target=0.9, util_high=0.8)
    with pytest.raises(ValueError, match="min_replicas"):
        ScalingPolicy(min_replicas=3, max_replicas=2)


def test_snapshot_from_serve_style_metrics():
    m = PoolMetrics.from_replica_metrics(
        "decode", 5.0, {"kv_blocks_used": {"r1": 90.0, "r2": 10.0},
                        "kv_blocks_total": {"r1": 100.0, "r2": 100.0},
                        "tpot_s": {"r1": 0.05}, "unrelated": {"r9": 1.0}}, target_replicas=2)
    assert [r.replica_id for r in m.replicas] == ["r1", "r2"]
    assert m.replicas[0].kv_blocks_used == 90 and m.replicas[1].tpot_s is None
    d, state = PoolAutoscaler(ScalingPolicy()).decide(m)
    assert d.signals["kv_util"] == pytest.approx(0.5)
    assert json.loads(json.dumps(state)) == state
