"""SLO attainment and goodput interpolation."""

from __future__ import annotations

import benchpath  # noqa: F401 - makes benchmarks/ modules importable
import pytest
from slo import SLO, Goodput, Latency, Outcome, attainment, goodput, percentile, reference

SLO_ = SLO(ttft_s=0.5, tpot_s=0.1)


def test_relative_slos():
    s = SLO.relative(Latency(0.05, 0.02), k1=5, k2=4)
    assert s.ttft_s == pytest.approx(0.25) and s.tpot_s == pytest.approx(0.08)
    t = SLO.relative(Latency(0.05, 0.02), k1=5, k2=4, scale=0.5)
    assert t.ttft_s == pytest.approx(0.125) and t.tpot_s == pytest.approx(0.04)


def test_a_request_must_meet_both_slos():
    assert Outcome(0.5, 0.1, 10).meets(SLO_)  # both exactly at the limit
    assert not Outcome(0.51, 0.05, 10).meets(SLO_)  # TTFT missed
    assert not Outcome(0.1, 0.11, 10).meets(SLO_)  # TPOT missed
    assert not Outcome(0.1, 0.05, 10, error="timeout").meets(SLO_)
    assert not Outcome(None, None, 0, error="HTTP 500").meets(SLO_)
    assert Outcome(0.2, None, 1).meets(SLO_)  # one token: no TPOT to miss


def test_attainment_is_the_share_meeting_both():
    outs = [Outcome(0.1, 0.05, 8), Outcome(0.9, 0.05, 8), Outcome(0.1, 0.5, 8),
            Outcome(0.1, 0.05, 8, "timeout")]
    assert attainment(outs, SLO_) == 0.25
    assert attainment([], SLO_) == 0.0


def test_deadline_is_when_a_request_can_no_longer_meet_its_slos():
    assert SLO_.deadline(1) == pytest.approx(0.5)
    assert SLO_.deadline(11) == pytest.approx(0.5 + 10 * 0.1)
    # A request finishing after the deadline fails one of the two SLOs, whatever its TTFT.
    for ttft in (0.1, 0.3, 0.5):
        e2e = SLO_.deadline(11) + 1e-6
        assert not Outcome(ttft, (e2e - ttft) / 10, 11).meets(SLO_)


def test_goodput_interpolates_at_the_crossing():
    g = goodput([(1.0, 1.0), (2.0, 0.95), (3.0, 0.85), (4.0, 0.4)])
    assert g == Goodput(pytest.approx(2.5), None)


def test_goodput_takes_the_highest_rate_meeting_the_target():
    # Non-monotonic: 3.0 meets the target again, so the crossing is between 3 and 4.
    g = goodput([(1.0, 0.95), (2.0, 0.85), (3.0, 0.92), (4.0, 0.5)])
    assert g.rate == pytest.approx(3.0 + 0.02 / 0.42)


def test_goodput_is_a_lower_bound_when_every_rate_meets_the_target():
    g = goodput([(1.0, 1.0), (2.0, 0.9)])
    assert g == Goodput(2.0, "lower")


def test_goodput_below_the_lowest_rate_interpolates_from_an_idle_system():
    g = goodput([(2.0, 0.5), (4.0, 0.1)])
    # (0, 1.0) -> (2.0, 0.5): 0.9 is reached at 2.0 * 0.1 / 0.5
    assert g.rate == pytest.approx(0.4) and g.bound == "upper"
    assert goodput([]) == Goodput(0.0, None)


def test_goodput_ignores_order():
    pts = [(3.0, 0.5), (1.0, 1.0), (2.0, 0.9)]
    assert goodput(pts) == goodput(sorted(pts))


def test_reference_is_the_fastest_unloaded_latency_per_metric():
    ref, src = reference({"a": Latency(0.05, 0.03), "b": Latency(0.08, 0.02)})
    assert ref == Latency(0.05, 0.02)
    assert src == {"ttft": "a", "tpot": "b"}
    with pytest.raises(ValueError):
        reference({})


def test_percentile():
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.9) == 3.0
    assert percentile([1, 2, 3, 4], 0.5) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4, 5], 0.9) == pytest.approx(4.6)
    assert percentile([5, 1, 3], 1.0) == 5
