"""The simulator against cases computable by hand: M/D/1 queueing, one request's timeline
through prefill -> transfer -> decode, a colocated chunked-prefill schedule, KV admission."""

from __future__ import annotations

import pytest
from pdserve.cluster.latency_model import LatencyModel, LinearFit, TransferModel, chunk_pairs
from pdserve.cluster.simulator import PoolSpec, simulate
from pdserve.cluster.workload import LengthDist, SimRequest, Workload

PREFILL = LinearFit(0.01, 0.001, 2e-6)  # a + b*tokens + c*pairs
DECODE = LinearFit(0.02, 0.001, 1e-5)  # a + b*batch + c*context


def model(layers: int = 1, kv_bytes: int = 1000, cap: int | None = None,
          prefill: LinearFit = PREFILL, decode: LinearFit = DECODE) -> LatencyModel:
    return LatencyModel(prefill, decode, kv_bytes_per_token=kv_bytes, num_layers=layers,
                        kv_capacity_tokens=cap)


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_single_prefill_server_is_md1(rho):
    """Poisson arrivals, one prefill instance, one prompt per step, deterministic service D:
    mean wait in queue = rho / (2 mu (1 - rho)) = rho D / (2 (1 - rho))."""
    d = 0.1
    lat = model(prefill=LinearFit(d, 0.0, 0.0))
    w = Workload("md1", LengthDist("fixed", 64), LengthDist("fixed", 1))
    reqs = w.requests(rate=rho / d, n=20000, seed=3)
    res = simulate("prefill", reqs, prefill=PoolSpec(lat, max_batched_tokens=64))
    wait = float((res.ttft - d).mean())
    expected = rho * d / (2 * (1 - rho))
    assert wait == pytest.approx(expected, rel=0.08)
    assert res.ttft.min() == pytest.approx(d)  # someone always finds the server idle


def test_one_request_through_prefill_transfer_decode():
    p, o = 100, 5
    lat = model(layers=1)
    xfer = TransferModel(bandwidth_bytes_per_s=1e6, latency_s=0.005)
    res = simulate("disaggregated", [SimRequest(0.0, p, o)], prefill=PoolSpec(lat),
                   decode=PoolSpec(lat), transfer=xfer)
    t_prefill = PREFILL(p, chunk_pairs(p))
    t_xfer = 0.005 + p * 1000 / 1e6
    steps = sum(DECODE(1, p + 1 + k) for k in range(o - 1))  # context grows by one per step
    assert res.ttft[0] == pytest.approx(t_prefill)
    assert res.tpot[0] == pytest.approx((t_xfer + steps) / (o - 1))
    assert res.finish[0] == pytest.approx(t_prefill + t_xfer + steps)


def test_layerwise_transfer_overlaps_all_but_the_last_layer():
    p, layers = 100, 4
    lat = model(layers=layers)
    xfer = TransferModel(bandwidth_bytes_per_s=1e6, latency_s=0.005)
    res = simulate("disaggregated", [SimRequest(0.0, p, 2)], prefill=PoolSpec(lat),
                   decode=PoolSpec(lat), transfer=xfer)
    t_prefill = PREFILL(p, chunk_pairs(p))
    x = p * 1000 / 1e6
    visible = 0.005 + max(x / layers, x - t_prefill * (layers - 1) / layers)
    assert res.tpot[0] == pytest.approx(visible + DECODE(1, p + 1))


def test_prefill_packs_prompts_up_to_the_token_budget():
    lat = model()
    reqs = [SimRequest(0.0, 40, 1) for _ in range(3)]
    res = simulate("prefill", reqs, prefill=PoolSpec(lat, max_batched_tokens=100))
    # step 1: 40 + 40 + a 20-token chunk of the third; step 2: its last 20 after a 20 prefix
    s1 = PREFILL(100, 2 * chunk_pairs(40) + chunk_pairs(20))
    s2 = PREFILL(20, chunk_pairs(20, 20))
    assert list(res.ttft) == pytest.approx([s1, s1, s1 + s2])


def test_colocated_mixes_decodes_with_prompt_chunks():
    lat = model()
    reqs = [SimRequest(0.0, 10, 3), SimRequest(0.0, 10, 3)]
    res = simulate("colocated", reqs, prefill=PoolSpec(lat, max_batched_tokens=16))
    s1 = PREFILL(16, chunk_pairs(10) + chunk_pairs(6))  # A whole, B's first 6 tokens
    s2 = lat.mixed_time(1, 11, 4, chunk_pairs(4, 6))  # A decodes; B's last 4 after 6
    s3 = DECODE(2, 12 + 11)  # both decode: A attends 12 tokens, B 11
    s4 = DECODE(1, 12)  # B alone
    assert list(res.ttft) == pytest.approx([s1, s1 + s2])
    assert list(res.finish) == pytest.approx([s1 + s2 + s3, s1 + s2 + s3 + s4])
    assert res.tpot[0] == pytest.approx((s2 + s3) / 2)


def test_decode_admission_waits_for_kv_room():
    step = LinearFit(0.01, 0.0, 0.0)
    lat = model(decode=step, cap=32)  # room for exactly one request of 20 + 12 tokens
    reqs = [SimRequest(0.0, 20, 12), SimRequest(0.0, 20, 12)]
    res = simulate("decode", reqs, decode=PoolSpec(lat, block_size=16))
    assert list(res.finish) == pytest.approx([0.11, 0.22])
    roomy = simulate("decode", reqs, decode=PoolSpec(model(decode=step, cap=64), block_size=16))
    assert list(roomy.finish) == pytest.approx([0.11, 0.11])


def test_attainment_counts_both_slos():
    lat = model()
    reqs = Workload("w", LengthDist("fixed", 50), LengthDist("fixed", 8)).requests(5.0, 200)
    res = simulate("disaggregated", reqs, prefill=PoolSpec(lat), decode=PoolSpec(lat))
    both = res.attainment(float(res.ttft.max()), float(res.tpot.max()))
    assert both == 1.0
    assert res.attainment(float(res.ttft.min()) - 1e-9, None) == 0.0
    assert 0 < res.attainment(float(sorted(res.ttft)[100]), None) < 1
