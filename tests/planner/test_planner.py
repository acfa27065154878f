"""The goodput search and the planner on synthetic latency models whose best plan is known,
and ``pdserve plan`` writing a config that ``AppConfig`` (so ``pdserve up``) accepts."""

from __future__ import annotations

import math

import pytest
from pdserve.cluster.cli import main
from pdserve.cluster.config import AppConfig
from pdserve.cluster.goodput import SLO, GoodputSearch, max_rate
from pdserve.cluster.latency_model import LatencyModel, LinearFit, Profile, TransferModel
from pdserve.cluster.planner import Planner, candidate_shapes
from pdserve.cluster.simulator import PoolSpec
from pdserve.cluster.workload import LengthDist, Workload

# 100-token prompts cost 0.1 s of prefill; a decode step costs 10 ms + 0.5 ms per request.
# Per request, prefill is the expensive phase: disaggregated, 3 prefill + 1 decode instance
# is the best use of 4 CPUs. Colocated loses: every 0.1 s prefill step stalls the decodes
# sharing it, which a 30 ms TPOT SLO cannot absorb except at low rates.
PREFILL_HEAVY = LatencyModel(LinearFit(0.0, 0.001, 0.0), LinearFit(0.01, 0.0005, 0.0),
                             kv_bytes_per_token=1000, num_layers=2)
FIXED = Workload("fixed", LengthDist("fixed", 100), LengthDist("fixed", 20))


def test_max_rate_brackets_and_bisects():
    calls = []

    def attain(r):
        calls.append(r)
        return 1.0 if r <= 7.3 else 0.5

    for guess in (0.01, 7.3, 1000.0):
        r = max_rate(attain, guess, rel_tol=0.01)
        assert 7.3 / 1.01 <= r <= 7.3
    assert max_rate(lambda r: 0.0, 1.0) == 0.0
    assert len(calls) < 60


def test_goodput_never_exceeds_the_pool_capacity():
    search = GoodputSearch(FIXED, SLO(100.0, 100.0), requests=200)  # SLOs that never bind
    spec = PoolSpec(PREFILL_HEAVY, max_batched_tokens=100)
    r = search.prefill_rate(spec)
    assert r < 10.0  # one 0.1 s prompt at a time: 10 prompts/s is the service rate
    assert r > 9.0


def test_planner_picks_the_known_best_split():
    planner = Planner(FIXED, SLO(1.0, 0.03), 4, [PREFILL_HEAVY], requests=300)
    plans = planner.run()
    best = plans[0]
    assert best.mode == "disaggregated"
    assert (best.pools["prefill"].replicas, best.pools["decode"].replicas) == (3, 1)
    assert all(p.rate <= best.rate for p in plans)
    colocated = [p for p in plans if p.mode == "colocated"]
    assert colocated and max(p.rate for p in colocated) < 0.8 * best.rate
    # three prefill instances of ~10 prompts/s each bound the goodput
    assert 20 < best.rate < 30


def test_planner_chooses_tp_when_the_ttft_slo_needs_it():
    """A 100-token prompt takes 0.1 s at tp=1 but 0.05 s at tp=2 (2 CPUs): with a 0.08 s TTFT
    SLO only tp=2 prefill can meet it, while decode gains nothing from tp=2."""
    tp1 = PREFILL_HEAVY
    tp2 = LatencyModel(LinearFit(0.0, 0.0005, 0.0), tp1.decode, tp=2, kv_bytes_per_token=1000,
                       num_layers=2)
    planner = Planner(FIXED, SLO(0.08, 0.03), 6, [tp1, tp2], requests=200,
                      modes=("disaggregated",))
    plans = planner.run()
    best = plans[0]
    assert best.pools["prefill"].shape.tp == 2
    assert best.pools["decode"].shape.tp == 1
    assert all(p.pools["prefill"].shape.tp == 2 for p in plans)
    assert best.devices <= 6


def test_target_rate_picks_the_fewest_devices():
    planner = Planner(FIXED, SLO(1.0, 0.03), 4, [PREFILL_HEAVY], requests=300,
                      modes=("disaggregated",), target_rate=15.0)
    best = planner.run()[0]
    # one prefill instance serves < 10 req/s, so 15 req/s needs two: 2 + 1 devices
    assert best.devices == 3 and best.rate >= 15.0


def test_impossible_slo_is_a_clear_error():
    planner = Planner(FIXED, SLO(0.05, 0.03), 4, [PREFILL_HEAVY], requests=50)
    with pytest.raises(ValueError, match="relax the SLOs"):
        planner.run()


def test_candidate_shapes_extrapolate_only_missing_degrees():
    shapes = candidate_shapes([PREFILL_HEAVY], [1, 2, 4], budget=2)
    assert [(s.tp, s.measured) for s in shapes] == [(1, True), (2, False)]
    with pytest.raises(ValueError, match="raise --cpus"):
        candidate_shapes([PREFILL_HEAVY], [1], budget=0.5)


def test_plan_command_writes_a_config_pdserve_up_accepts(tmp_path, capsys):
    prof = Profile("SmolLM2-135M-Instruct", "bfloat16", PREFILL_HEAVY, TransferModel(1e9, 1e-3),
                   num_heads=9, num_kv_heads=3)
    path = prof.save(tmp_path / "p.json")
    out = tmp_path / "plan.yaml"
    rc = main(["plan", "--workload", "code", "--ttft-slo", "2.0", "--tpot-slo", "0.05",
               "--cpus", "4", "--profile", str(path), "--tp", "1", "--requests", "100",
               "--verify", "2", "--out", str(out)])
    assert rc == 0
    cfg = AppConfig.from_yaml(out)
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.strip().startswith("1 "))
    assert cfg.mode in row
    assert cfg.slo.ttft_s == 2.0 and cfg.slo.tpot_s == 0.05
    used = sum(p.replicas * p.tp * p.cpus for p in cfg.pools.values())
    assert used <= 4
    assert cfg.dtype == "bfloat16" and cfg.model == "SmolLM2-135M-Instruct"
    assert out.read_text().startswith("# written by `pdserve plan`")
    goodput = float(row.split()[2])
    assert math.isfinite(goodput) and goodput > 0


def test_plan_command_without_profiles_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    rc = main(["plan", "--workload", "chatbot", "--ttft-slo", "1", "--tpot-slo", "0.1",
               "--cpus", "4", "--model", "SmolLM2-135M-Instruct"])
    assert rc == 2
    assert "pdserve profile" in capsys.readouterr().err
