"""The run plan and the summary: SLOs from the fastest unloaded latency, goodput per CPU,
the headline ratios, and the plots."""

from __future__ import annotations

import json

import benchpath  # noqa: F401 - makes benchmarks/ modules importable
import goodput as gp
import pytest
from slo import SLO, Latency
from workloads import WORKLOADS


def _plan(*argv):
    return gp.make_plan(gp.parse_args(list(argv)))


def test_quick_is_the_chatbot_workload_with_a_short_sweep():
    p = _plan("--quick")
    assert [w.name for w in p.workloads] == ["chatbot"]
    assert p.rates["chatbot"] == WORKLOADS["chatbot"].quick_rates
    assert p.requests_at(0.5) == 8 and p.requests_at(3.0) == 45


def test_full_runs_every_workload_and_flags_override():
    p = _plan("--full")
    assert {w.name for w in p.workloads} == set(WORKLOADS)
    assert p.rates["code"] == WORKLOADS["code"].rates
    p = _plan("--workloads", "code", "--rates", "1,2.5", "--k2", "3", "--slo-scale", "0.5")
    assert p.rates == {"code": (1.0, 2.5)} and p.workloads[0].k2 == 3
    assert p.workloads[0].k1 == WORKLOADS["code"].k1 and p.slo_scale == 0.5


def test_smoke_is_tiny():
    p = _plan("--smoke")
    assert p.rates["chatbot"] == (1.0, 2.0) and p.max_requests <= 6
    assert p.workloads[0].output.hi <= 24


def test_bad_arguments():
    with pytest.raises(SystemExit):
        gp.parse_args(["--systems", "disagg,sglang"])
    with pytest.raises(SystemExit):
        gp.parse_args(["--ttft0", "0.1"])
    with pytest.raises(SystemExit):
        gp.make_plan(gp.parse_args(["--workloads", "poetry"]))
    assert gp.parse_args([]).system_list == ["disagg", "colocated", "vllm"]


def _runs(rates_att: list[tuple[float, int]], ttft: float, tpot: float, miss_ttft: float):
    """Runs of 10 requests where ``k`` of them meet (ttft, tpot) and the rest take
    ``miss_ttft`` to the first token."""
    return [{"rate": r, "n": 10, "requests": [[ttft, tpot, 8, None]] * k +
             [[miss_ttft, tpot, 8, None]] * (10 - k)} for r, k in rates_att]


def _result():
    # Unloaded: disagg TTFT 40 ms / TPOT 30 ms; colocated 50 / 20; vllm skipped.
    def m(ttft, tpot, runs):
        return {"chatbot": {"unloaded": {"ttft_s": ttft, "tpot_s": tpot, "probes": []},
                            "runs": runs}}

    return {"systems": {
        "disagg": {"status": "ok", "cpus": 2, "measured": m(0.04, 0.03, _runs(
            [(1.0, 10), (2.0, 10), (3.0, 8)], 0.1, 0.05, 5.0))},
        "colocated": {"status": "ok", "cpus": 2, "measured": m(0.05, 0.02, _runs(
            [(1.0, 10), (2.0, 5)], 0.1, 0.05, 5.0))},
        "vllm": {"status": "skipped", "cpus": 2, "reason": "not set up"}},
        "workloads": {}}


def test_summary_uses_one_reference_for_all_and_reports_per_cpu():
    plan = _plan("--quick")
    res = _result()
    head = gp.summarize(res, plan, None)
    wl = res["workloads"]["chatbot"]
    # reference: the lowest TTFT (disagg) and the lowest TPOT (colocated)
    assert wl["reference"]["from"] == {"ttft": "disagg", "tpot": "colocated"}
    slo = SLO.relative(Latency(0.04, 0.02), 5, 5)
    assert wl["slo"]["ttft_s"] == pytest.approx(slo.ttft_s)
    assert wl["slo"]["tpot_s"] == pytest.approx(slo.tpot_s)
    # disagg: 100%, 100%, 80% → crossing at 2 + 0.1/0.2 = 2.5 req/s = 1.25 per CPU
    assert wl["systems"]["disagg"]["goodput_rps"] == pytest.approx(2.5)
    assert head["goodput"]["disagg"]["chatbot"] == pytest.approx(1.25)
    # colocated: 100%, 50% → 1 + 0.1/0.5 = 1.2 req/s = 0.6 per CPU
    assert head["goodput"]["colocated"]["chatbot"] == pytest.approx(0.6)
    assert head["disagg_vs_colocated"]["chatbot"] == pytest.approx(2.5 / 1.2, rel=1e-3)
    assert head["disagg_vs_vllm"]["chatbot"] is None
    assert head["skipped"] == {"vllm": "not set up"}
    assert wl["systems"]["disagg"]["points"][2]["ttft_ok"] == pytest.approx(0.8)
    json.dumps(head)  # the last stdout line


def test_pinned_reference_overrides_the_measured_one():
    plan = _plan("--quick")
    res = _result()
    gp.summarize(res, plan, Latency(1.0, 1.0))
    wl = res["workloads"]["chatbot"]
    assert wl["reference"]["from"] == {"ttft": "--ttft0", "tpot": "--tpot0"}
    # SLOs of 5 s / 5 s: every request meets them at every rate
    assert wl["systems"]["colocated"]["bound"] == "lower"


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    import goodput_plots

    plan = _plan("--quick")
    res = _result()
    gp.summarize(res, plan, None)
    paths = goodput_plots.plot_all(res, tmp_path)
    assert sorted(p.name for p in paths) == ["goodput_chatbot_attainment.png",
                                             "goodput_chatbot_cdf.png"]
    assert all(p.stat().st_size > 5000 for p in paths)
    # CDFs at the goodput rate: disagg's highest rate that met the target is 2.0
    pts = res["workloads"]["chatbot"]["systems"]["disagg"]["points"]
    assert goodput_plots.goodput_run(pts, 2.5)["rate"] == 2.0
