"""Planner validation in the goodput harness: a config written by ``pdserve plan`` is read back
with its prediction, swept around it under its own SLOs, and predicted vs measured goodput is
reported (within 20% or not)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import benchpath  # noqa: F401 - makes benchmarks/ modules importable
import goodput as gp
from pdserve.cluster.goodput import SLO
from pdserve.cluster.plan_command import plan_header


@pytest.fixture
def plan_file(tmp_path):
    """A plan file as ``pdserve plan`` writes it (header lines included)."""
    p = tmp_path / "plan.yaml"
    p.write_text(
        "# written by `pdserve plan` for workload 'chatbot'\n"
        "# plan: colocated: colocated 2 x tp1@1cpu\n"
        '# pdserve-plan: {"workload": "chatbot", "predicted_goodput_rps": 0.4, "cpus": 2.0, '
        '"ttft_slo_s": 2.0, "tpot_slo_s": 0.4}\n'
        "model: SmolLM2-135M-Instruct\ndtype: bfloat16\nmode: colocated\n"
        "slo: {ttft_s: 2.0, tpot_s: 0.4}\ncolocated: {replicas: 2, tp: 1, cpus: 1.0}\n")
    return p


class _Best:
    """What ``plan_header`` reads of a ``Plan``."""

    mode, rate, per_device, devices, measured = "disaggregated", 0.31234, 0.15617, 2.0, True

    def describe(self) -> str:
        return "prefill 1 x tp1@1cpu; decode 1 x tp1@1cpu"


def test_what_pdserve_plan_writes_is_read_back(tmp_path):
    p = tmp_path / "plan.yaml"
    header = plan_header(_Best(), "code", SLO(0.5, 0.2))  # type: ignore[arg-type]
    p.write_text("".join(f"# {h}\n" for h in header) + "mode: disaggregated\n")
    pc = gp.PlannedConfig.load(p)
    assert (pc.workload, pc.predicted_rps, pc.cpus) == ("code", 0.3123, 2.0)
    assert (pc.slo.ttft_s, pc.slo.tpot_s) == (0.5, 0.2)
    assert pc.describe == "disaggregated: prefill 1 x tp1@1cpu; decode 1 x tp1@1cpu"
    assert pc.config == {"mode": "disaggregated"}


def test_planned_config_is_read_back(plan_file):
    pc = gp.PlannedConfig.load(plan_file)
    assert pc.workload == "chatbot" and pc.predicted_rps == 0.4 and pc.cpus == 2.0
    assert (pc.slo.ttft_s, pc.slo.tpot_s) == (2.0, 0.4)
    assert pc.config["colocated"] == {"replicas": 2, "tp": 1, "cpus": 1.0}
    assert pc.describe == "colocated: colocated 2 x tp1@1cpu"


def test_plan_without_prediction_is_refused(tmp_path):
    p = tmp_path / "hand.yaml"
    p.write_text("mode: colocated\n")
    with pytest.raises(SystemExit, match="pdserve-plan"):
        gp.PlannedConfig.load(p)


def test_sweep_is_around_the_prediction_under_the_plans_slos(plan_file):
    args = gp.parse_args(["--quick", "--plan", str(plan_file)])
    assert args.system_list == ["planned"]
    p = gp.make_plan(args)
    assert [w.name for w in p.workloads] == ["chatbot"]
    assert p.rates["chatbot"] == (0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.2)
    assert p.min_requests >= 20  # a 90% threshold needs more than a handful per rate


def _result(att_by_rate: dict[float, float], status: str = "ok") -> dict:
    """A measured 'planned' system: at each rate, 10 requests of which att x 10 meet
    TTFT 2 s / TPOT 0.4 s."""
    runs = []
    for rate, att in att_by_rate.items():
        k = round(att * 10)
        rows = [[0.5, 0.1, 50, None]] * k + [[3.0, 0.1, 50, None]] * (10 - k)
        runs.append({"rate": rate, "n": 10, "requests": rows})
    return {"systems": {"planned": {"status": status, "cpus": 2.0,
                                    "measured": {"chatbot": {"runs": runs}}}}}


def test_validation_reports_both_figures(plan_file):
    planned = gp.PlannedConfig.load(plan_file)
    # measured goodput: 90% crossed halfway between 0.4 (100%) and 0.5 (80%) -> 0.45 req/s
    v = gp.validate_plan(_result({0.2: 1.0, 0.3: 1.0, 0.4: 1.0, 0.5: 0.8}), planned)
    assert v["predicted_goodput_rps"] == 0.4
    assert v["measured_goodput_rps"] == pytest.approx(0.45)
    assert v["measured_over_predicted"] == pytest.approx(1.125)
    assert v["within_20pct"] is True
    # measured far below the prediction
    v = gp.validate_plan(_result({0.2: 0.5, 0.3: 0.2}), planned)
    assert v["measured_goodput_rps"] < 0.2 and v["within_20pct"] is False


def test_validation_says_when_the_plan_could_not_run(plan_file):
    planned = gp.PlannedConfig.load(plan_file)
    r = {"systems": {"planned": {"status": "failed", "reason": "boom"}}}
    v = gp.validate_plan(r, planned)
    assert v["measured_goodput_rps"] is None and v["error"] == "boom"
