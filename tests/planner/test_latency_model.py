"""The latency model's fit (exact recovery, non-negativity), TP extrapolation, profile JSON,
and the workload specs the simulator samples from."""

from __future__ import annotations

import numpy as np
import pytest
from pdserve.cluster.latency_model import (
    LatencyModel,
    LinearFit,
    Profile,
    TransferModel,
    chunk_pairs,
    extrapolate_tp,
)
from pdserve.cluster.workload import WORKLOADS, LengthDist, Workload, load_workload


def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    x1 = rng.integers(1, 4096, 30)
    x2 = rng.integers(1, 10**6, 30)
    t = 0.004 + 2e-5 * x1 + 3e-9 * x2
    f = LinearFit.fit(x1, x2, t)
    assert (f.a, f.b, f.c) == pytest.approx((0.004, 2e-5, 3e-9), rel=1e-6)
    assert f.max_rel_error < 1e-9


def test_fit_never_returns_negative_costs():
    # times that *fall* with x2: plain least squares gives c = -2e-4 exactly
    x1 = np.array([1, 2, 3, 4, 5, 6, 7, 8])
    x2 = np.array([5, 1, 7, 2, 8, 3, 6, 4])
    t = 0.01 + 0.001 * x1 - 0.0002 * x2
    free, *_ = np.linalg.lstsq(np.stack([np.ones(8), x1, x2], 1), t, rcond=None)
    assert free[2] == pytest.approx(-0.0002)
    f = LinearFit.fit(x1, x2, t)
    assert min(f.a, f.b, f.c) >= 0
    assert f.c == 0
    assert f.b > 0


def test_fit_refuses_too_few_points():
    with pytest.raises(ValueError, match="at least 3"):
        LinearFit.fit([1, 2], [1, 2], [0.1, 0.2])


def test_chunk_pairs_counts_causal_attention():
    # 3 new tokens after 2 cached: they attend to 3, 4 and 5 keys
    assert chunk_pairs(3, 2) == 3 + 4 + 5
    assert chunk_pairs(4) == 1 + 2 + 3 + 4


def test_extrapolated_tp_is_faster_but_less_efficient_per_device():
    base = LatencyModel(LinearFit(0.01, 1e-4, 1e-8), LinearFit(0.02, 1e-4, 1e-7), tp=1,
                        num_layers=4, kv_capacity_tokens=1000)
    tp2 = extrapolate_tp(base, 2, efficiency=0.8, comm_s_per_layer=1e-4)
    assert not tp2.measured and tp2.devices == 2
    assert tp2.prefill.b == pytest.approx(1e-4 / 1.6)
    assert tp2.decode.a == pytest.approx(0.02 / 1.6 + 4e-4)
    assert tp2.kv_capacity_tokens == 2000
    t1, t2 = base.prefill_time([(512, 0)]), tp2.prefill_time([(512, 0)])
    assert t2 < t1 < 2 * t2  # faster, but not twice: 2 devices give < 2x
    assert extrapolate_tp(base, 1) == base


def test_profile_json_round_trip(tmp_path):
    lat = LatencyModel(LinearFit(0.01, 1e-4, 1e-8, 0.02, 0.05), LinearFit(0.02, 1e-4, 1e-7),
                       tp=2, cpus_per_rank=2.0, kv_bytes_per_token=4096, num_layers=30,
                       kv_capacity_tokens=65536)
    prof = Profile("m", "bfloat16", lat, TransferModel(3e9, 2e-4), 9, 3, 8192,
                   [{"tokens": 1, "pairs": 1, "seconds": 0.1}], [], [], {"cpus": 2})
    back = Profile.load(prof.save(tmp_path / "p.json"))
    assert back == prof


def test_profile_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="pdserve profile"):
        Profile.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1}')
    with pytest.raises(ValueError, match="re-run `pdserve profile`"):
        Profile.load(bad)


def test_named_workloads_and_common_random_numbers():
    assert set(WORKLOADS) == {"chatbot", "code", "summarization"}
    w = WORKLOADS["summarization"]
    slow, fast = w.requests(1.0, 300, seed=7), w.requests(4.0, 300, seed=7)
    assert [r.prompt_len for r in slow] == [r.prompt_len for r in fast]
    assert fast[-1].arrival == pytest.approx(slow[-1].arrival / 4)
    assert all(950 <= r.prompt_len <= 1024 for r in slow)
    chat = WORKLOADS["chatbot"]
    assert chat.mean_output > chat.mean_prompt  # chat answers run longer than the questions
    assert w.mean_prompt > 5 * w.mean_output  # summaries are short
    # lognormal by mean: the sample mean is near the asked one where clipping is rare
    assert WORKLOADS["code"].mean_prompt == pytest.approx(130, rel=0.05)
    other = w.requests(1.0, 300, seed=8)
    assert [r.prompt_len for r in other] != [r.prompt_len for r in slow]


def test_poisson_arrivals_have_the_asked_rate():
    w = Workload("p", LengthDist("fixed", 10), LengthDist("fixed", 10))
    t = np.array([r.arrival for r in w.requests(5.0, 20000, seed=1)])
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1


def test_workload_file(tmp_path):
    f = tmp_path / "w.yaml"
    f.write_text("name: mine\nprompt: {kind: uniform, low: 5, high: 9}\n"
                 "output: {kind: fixed, mean: 3}\narrival_cv: 2.0\n")
    w = load_workload(str(f))
    reqs = w.requests(1.0, 500)
    assert w.name == "mine" and {r.output_len for r in reqs} == {3}
    assert {r.prompt_len for r in reqs} == set(range(5, 10))
    with pytest.raises(ValueError, match="chatbot"):
        load_workload("no-such-workload")
