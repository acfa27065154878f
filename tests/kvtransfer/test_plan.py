"""Unit tests of layouts, plans and head re-sharding for heterogeneous TP."""

from __future__ import annotations

import itertools

import pytest
from pdserve.kvtransfer import KVLayout, TransferPlan, head_slices


def layout(heads: int, tp: int, **kw) -> KVLayout:
    args = {"num_layers": 4, "block_size": 16, "num_kv_heads_total": heads, "head_dim": 8}
    return KVLayout(**{**args, "tp_size": tp, "dtype_str": "float32", **kw})


def test_head_ranges_split_and_replicate():
    assert [list(layout(4, 2).head_range(r)) for r in range(2)] == [[0, 1], [2, 3]]
    assert [list(layout(3, 2).head_range(r)) for r in range(2)] == [[0], [1, 2]]  # uneven
    assert [list(layout(3, 3).head_range(r)) for r in range(3)] == [[0], [1], [2]]
    assert [list(layout(2, 4).head_range(r)) for r in range(4)] == [[0], [0], [1], [1]]
    assert layout(2, 4).owners(1) == [2, 3]
    assert layout(4, 2).kv_shape(1, num_blocks=9) == (4, 2, 9, 16, 2, 8)
    with pytest.raises(ValueError):
        layout(4, 2).head_range(2)


CASES = [(3, p, d) for p, d in itertools.product((1, 2, 3), repeat=2)] + [
    (h, p, d) for h in (4, 2) for p, d in itertools.product((1, 2, 4), repeat=2)
]


@pytest.mark.parametrize("heads,p,d", CASES)
def test_every_receiver_head_arrives_exactly_once(heads: int, p: int, d: int):
    src, dst = layout(heads, p), layout(heads, d)
    for r in range(d):
        received: list[int] = []
        for s in range(p):
            pair = head_slices(src, s, dst, r)
            if pair is None:
                continue
            src_slice, dst_slice = pair
            src_heads = list(src.head_range(s))[src_slice]
            dst_heads = list(dst.head_range(r))[dst_slice]
            assert src_heads and src_heads == dst_heads  # the sender owns what it sends
            received += dst_heads
        assert sorted(received) == list(dst.head_range(r))  # all of them, once each


def test_replicated_heads_spread_over_replicas():
    # H=2, prefill TP=4 (each head on 2 ranks), decode TP=4: receivers of one head use both.
    src, dst = layout(2, 4), layout(2, 4)
    senders = [next(s for s in range(4) if head_slices(src, s, dst, r)) for r in range(4)]
    assert senders == [0, 1, 2, 3]


def plan(**kw) -> TransferPlan:
    args = {"request_id": "r", "src_block_ids": [3, 1], "dst_block_ids": [0, 5]}
    layers = {"layer_start": 0, "layer_end": 4}
    layouts = {"src_layout": layout(4, 2), "dst_layout": layout(4, 1)}
    return TransferPlan(**{**args, **layers, **layouts, **kw})


def test_plan_is_frozen_and_hashable():
    p = plan(src_block_ids=[3, 1])
    assert p.src_block_ids == (3, 1) and p.layers == range(4) and p.num_blocks == 2
    assert hash(p) == hash(plan())
    assert 0 <= p.fingerprint < 2**63 and 0 <= p.tag_id < 2**20
    assert plan(transfer_id=7).tag_id == 7
    assert plan(request_id="a").fingerprint != plan(request_id="b").fingerprint


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"dst_block_ids": [0]}, "equal length"),
        ({"src_block_ids": [], "dst_block_ids": []}, "non-empty"),
        ({"dst_block_ids": [2, 2]}, "repeat"),
        ({"layer_start": 2, "layer_end": 2}, "outside"),
        ({"layer_end": 5}, "outside"),
        ({"dst_layout": layout(4, 1, head_dim=16)}, "head_dim"),
        ({"dst_layout": layout(4, 1, dtype_str="bfloat16")}, "dtype_str"),
        ({"compress": "fp8"}, "compress"),
    ],
)
def test_plan_rejects_inconsistent_input(kw, msg):
    with pytest.raises(ValueError, match=msg):
        plan(**kw)


def test_layout_rejects_bad_values():
    with pytest.raises(ValueError, match="tp_size"):
        layout(4, 0)
    with pytest.raises(ValueError, match="dtype_str"):
        layout(4, 1, dtype_str="int8")
