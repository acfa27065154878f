"""KV transfers between separate processes over gloo pair channels (CPU).

Each process is one (instance, TP rank); see kv_workers.py for their bodies. Receivers check
bit-exactness themselves against KV derived from the shared seed.
"""

from __future__ import annotations

import pytest
from kv_workers import Spec, run, run_pool_restart, with_

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(30)]


def assert_all_ok(out: dict, spec: Spec) -> None:
    for r in range(spec.dst_tp):
        got = out[f"recv{r}"]
        assert got["untouched_ok"], "bytes outside the plans' dst blocks were written"
        for i in range(len(spec.requests)):
            assert got[f"req-{i}"][0] == "ok", got
    for s in range(spec.src_tp):
        sent = out[f"send{s}"]
        assert all(isinstance(v, int) and v > 0 for v in sent.values()), sent


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocks_arrive_bit_exact(dtype):
    # 1, 7 and 33 blocks in random order, 3 layers, streamed layer by layer.
    spec = Spec(dtype=dtype, requests=(1, 7, 33))
    out = run(spec)
    assert_all_ok(out, spec)
    # Receiver and sender agree on the bytes moved (headers included).
    assert out["recv0"]["req-2"][1] == out["send0"]["req-2"]


def test_concurrent_transfers_on_one_channel_do_not_mix():
    # Three requests: the sender interleaves their layers, the receiver receives all three at
    # once from threads started in the opposite order; tags keep them apart.
    spec = Spec(requests=(5, 2, 9), num_layers=4, interleave=True)
    assert_all_ok(run(spec), spec)


@pytest.mark.parametrize(
    "src_tp,dst_tp,heads",
    [(2, 1, 4), (1, 2, 4), (2, 1, 3)],  # 3 heads over TP 2: uneven split (1 + 2)
)
def test_heterogeneous_tp_reassembles_heads(src_tp, dst_tp, heads):
    spec = Spec(src_tp=src_tp, dst_tp=dst_tp, heads=heads, requests=(3, 7))
    assert_all_ok(run(spec), spec)


def test_receiver_does_not_wait_for_sender_to_collect_acks():
    # The sender streams every layer, then is busy for 3 s before calling wait_done; the
    # receiver must be done (and free to schedule the request) long before that.
    spec = with_(Spec(requests=(3, 4)), sender_delay_s=3.0)
    out = run(spec)
    assert_all_ok(out, spec)
    assert all(out["recv0"][f"req-{i}"][2] < 2.0 for i in range(2)), out["recv0"]


def test_receiver_that_never_receives_makes_sender_time_out():
    spec = with_(Spec(requests=(5,)), receiver="deaf", wait_timeout_s=2.0)
    out = run(spec)
    outcome, elapsed = out["send0"]["req-0"]
    assert outcome == "timeout" and 1.9 < elapsed < 3.5
    # The sender's timeout closed the pair: the receiver's next op fails at once.
    assert out["recv0"]["peer_closed_s"] is not None and out["recv0"]["peer_closed_s"] < 1.0


def test_sender_that_never_sends_makes_receiver_time_out():
    spec = with_(Spec(requests=(5,)), sender="silent", recv_timeout_s=2.0)
    out = run(spec)
    outcome, elapsed = out["recv0"]["req-0"]
    assert outcome == "timeout" and 1.9 < elapsed < 3.5
    assert out["recv0"]["untouched_ok"]
    assert out["send0"]["peer_closed_s"] is not None and out["send0"]["peer_closed_s"] < 1.0


def test_cancelled_transfer_leaves_channel_usable():
    # The sender sends layer 0 of req-0, then cancels it; req-1 and req-2 follow on the same
    # channel and must still arrive exactly.
    spec = with_(Spec(requests=(4, 7, 2)), sender="cancel_first")
    out = run(spec)
    assert out["recv0"]["req-0"] == ("cancelled",)
    assert out["recv0"]["req-1"][0] == "ok" and out["recv0"]["req-2"][0] == "ok"
    assert out["recv0"]["untouched_ok"]


@pytest.mark.parametrize("dtype,src_tp", [("float32", 1), ("bfloat16", 2)])
def test_int8_compressed_transfer_end_to_end(dtype, src_tp):
    # The receiver checks its cache equals quantize -> dequantize of the source exactly; the
    # error bound of that round trip is checked in test_compress.py.
    spec = Spec(dtype=dtype, src_tp=src_tp, heads=4, compress="int8", requests=(1, 7, 33))
    out = run(spec)
    assert_all_ok(out, spec)
    elements = spec.num_layers * 2 * 33 * spec.block_size * spec.heads * spec.head_dim
    itemsize = spec.layout(1).dtype.itemsize
    assert out["recv0"]["req-2"][1] < elements * itemsize * 0.7  # int8 payload + fp32 scales


def test_pool_rebuilds_channel_when_peer_restarts():
    out = run_pool_restart(Spec(requests=(7,)))
    assert out["decode@1"]["exact"] and out["decode@2"]["exact"]
    assert out["prefill"] == {
        "distinct": True,
        "old_closed": True,
        "new_open": True,
        "peers": [2],
        "stale_refused": True,
    }
