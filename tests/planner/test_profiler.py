"""``pdserve profile`` on a tiny random model: a small grid, real engine steps, a fit of the
documented shape, JSON that loads back; then ``plan`` on that profile."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import numpy as np
import pytest
from pdserve.cluster.cli import main
from pdserve.cluster.config import AppConfig
from pdserve.cluster.latency_model import PREFILL_FORM, Profile, chunk_pairs
from pdserve.cluster.profiler import QUICK, measure_decode
from pdserve.workers.config import ModelConfig


@pytest.fixture(scope="module")
def profile_json(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "tiny.json"
    assert main(["profile", "--model", str(tiny_llama), "--quick", "--out", str(out)]) == 0
    return out


def test_profile_has_the_documented_shape(profile_json, tiny_llama):
    d = json.loads(profile_json.read_text())
    assert d["tp"] == 1 and d["dtype"] == "float32" and d["cpus_per_rank"] == 1.0
    assert d["prefill"]["form"] == PREFILL_FORM
    mcfg = ModelConfig.from_path(tiny_llama)
    assert d["model_shape"]["num_layers"] == mcfg.num_layers
    # K and V, every layer and KV head, fp32
    assert d["model_shape"]["kv_bytes_per_token"] == 2 * mcfg.num_layers * mcfg.num_kv_heads \
        * mcfg.head_dim * 4
    pre = d["prefill"]["points"]
    packed = [p for p in pre if len(p["lens"]) > 1]
    assert len(pre) >= 3 and packed  # single prompts and packed batches
    for p in pre:
        assert p["tokens"] == sum(p["lens"])
        assert p["pairs"] == sum(chunk_pairs(n) for n in p["lens"])
        assert p["seconds"] > 0
    dec = d["decode"]["points"]
    assert {p["batch"] for p in dec} == set(QUICK.decode_batches)
    assert all(p["context_tokens"] > p["batch"] * p["context"] for p in dec)
    for phase in ("prefill", "decode"):
        coef = d[phase]["coef"]
        assert min(coef["a"], coef["b"], coef["c"]) >= 0
        assert coef["mean_rel_error"] < 1.0
    assert d["transfer"]["bandwidth_bytes_per_s"] > 1e6


def test_fitted_model_grows_with_work(profile_json):
    lat = Profile.load(profile_json).latency
    # 512 tokens attend to 1000x the pairs of 16 (medians of 3: robust to a busy neighbour)
    assert lat.prefill_time([(512, 0)]) > lat.prefill_time([(16, 0)])
    assert lat.decode_time(16, 16 * 512) >= lat.decode_time(1, 64)  # b, c >= 0
    # the fit follows the measured points (median error: robust to one noisy point)
    d = json.loads(profile_json.read_text())
    err = [abs(lat.decode_time(p["batch"], p["context_tokens"]) / p["seconds"] - 1)
           for p in d["decode"]["points"]]
    assert statistics.median(err) < 1.0


def test_profile_round_trips(profile_json):
    prof = Profile.load(profile_json)
    assert prof.to_dict() == json.loads(profile_json.read_text())


def test_decode_measurement_does_not_compute_prompts(tiny_llama):
    mcfg = ModelConfig.from_path(tiny_llama)
    grid = replace(QUICK, decode_batches=(2,), decode_contexts=(4096,), decode_token_cap=8192,
                   steps=1)
    pts = measure_decode(mcfg, grid, 1, 1.0, np.random.default_rng(0), say=lambda _m: None)
    # 2 x 4096 prompt tokens would take far longer to prefill than a decode step
    assert len(pts) == 1 and pts[0]["seconds"] < 0.5


def test_plan_on_a_measured_profile(profile_json, tmp_path):
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--workload", "chatbot", "--ttft-slo", "0.5", "--tpot-slo", "0.05",
                 "--cpus", "2", "--profile", str(profile_json), "--requests", "60",
                 "--verify", "1", "--out", str(out)]) == 0
    cfg = AppConfig.from_yaml(out)
    assert sum(p.replicas * p.tp * p.cpus for p in cfg.pools.values()) <= 2
