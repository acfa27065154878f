"""RankEndpoint in one process (threads, real gloo pair channels): two sender ranks of a TP=2
instance push their heads to the one receiver rank of a TP=1 instance through the
register → start → layer hook → wait protocol; cancelling a push that never started lets the
receiver free its blocks with the channels still in step; a missing channel fails cleanly."""

from __future__ import annotations

import threading

import pytest
import torch
from pdserve.kvtransfer import KVLayout, PeerId, TransferCancelled, TransferError
from pdserve.kvtransfer.endpoint import PushSpec, RankEndpoint, merge_stats

pytestmark = pytest.mark.timeout(60)

HEADS, LAYERS, BS, DIM, NBLK = 2, 3, 4, 8, 10
SRC = KVLayout(LAYERS, BS, HEADS, DIM, tp_size=2, dtype_str="float32")
DST = KVLayout(LAYERS, BS, HEADS, DIM, tp_size=1, dtype_str="float32")
P, D = PeerId("P", 1, 0), PeerId("D", 2, 0)


@pytest.fixture
def ends():
    senders = [RankEndpoint(PeerId("P", 1, s), "127.0.0.1", 5.0) for s in range(2)]
    recv = RankEndpoint(D, "127.0.0.1", 5.0)
    for s, ep in enumerate(senders):
        address = recv.listen(PeerId("P", 1, s))
        ep.connect(PeerId("D", 2, 0), address, 5.0)
    yield senders, recv
    for ep in (*senders, recv):
        ep.close()


def spec(rid: str, dst_ids, tid: int) -> PushSpec:
    return PushSpec(rid, "D", 2, tuple(dst_ids), SRC, DST, None, tid)


def receive_in_thread(recv: RankEndpoint, plan, kv) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        try:
            box["stats"] = recv.receive(plan, P, kv, 5.0)
        except BaseException as e:  # noqa: BLE001 - checked by the test
            box["error"] = e

    th = threading.Thread(target=run)
    th.start()
    return th, box


def test_two_sender_ranks_fill_one_receiver_rank_bit_exact(ends):
    senders, recv = ends
    torch.manual_seed(0)
    full = torch.randn(LAYERS, 2, NBLK, BS, HEADS, DIM)  # the model's KV, all heads
    src_kv = [full[..., s : s + 1, :].contiguous() for s in range(2)]  # rank s holds head s
    dst_kv = torch.zeros(LAYERS, 2, NBLK, BS, HEADS, DIM)
    src_ids, dst_ids = [1, 4, 7], [9, 0, 3]
    sp = spec("r1", dst_ids, 11)
    assert [p.rank for p in sp.receivers(0)] == [0] and [p.rank for p in sp.receivers(1)] == [0]
    th, box = receive_in_thread(recv, sp.plan(dst_ids), dst_kv)
    for key, ep in ((5, senders[0]), (5, senders[1])):
        assert ep.register(key, sp) == []  # channels are there already
    hooks = [ep.layer_hook(src_kv[s], [(5, src_ids)]) for s, ep in enumerate(senders)]
    for layer in range(LAYERS):  # the ranks' forwards, in step
        for hook in hooks:
            hook(layer)
    stats = [ep.wait(5, 5.0) for ep in senders]
    th.join()
    assert "error" not in box, box
    assert torch.equal(dst_kv[:, :, dst_ids], full[:, :, src_ids])
    assert dst_kv[:, :, [b for b in range(NBLK) if b not in dst_ids]].abs().sum() == 0
    assert merge_stats(stats).bytes == box["stats"].bytes > 0


def test_cancelling_an_unstarted_push_keeps_channels_in_step(ends):
    senders, recv = ends
    dst_kv = torch.zeros(LAYERS, 2, NBLK, BS, HEADS, DIM)
    sp = spec("gone", [2, 3], 12)
    th, box = receive_in_thread(recv, sp.plan([2, 3]), dst_kv)
    for ep in senders:
        ep.register(7, sp)
    senders[0].start(7, [5, 6])  # rank 0 started, rank 1 never did (the step never ran)
    # the ranks cancel at the same time (rank 0's instance issues the calls together): the
    # receiver acks only once every leg's messages arrived
    cancels = [threading.Thread(target=ep.cancel, args=(7, 5.0, True)) for ep in senders]
    for t in cancels:
        t.start()
    for t in (*cancels, th):
        t.join()
    assert isinstance(box.get("error"), TransferCancelled), box
    # the same channels carry the next transfer
    test_two_sender_ranks_fill_one_receiver_rank_bit_exact((senders, recv))


def test_register_reports_missing_channels_and_a_push_without_one_fails():
    ep = RankEndpoint(PeerId("P", 1, 1), "127.0.0.1", 1.0)
    try:
        sp = spec("lost", [1], 13)
        assert ep.register(3, sp) == [PeerId("D", 2, 0)]
        ep.start(3, [0])  # must not raise: it runs inside the forward
        with pytest.raises(TransferError, match="no channel"):
            ep.wait(3, 1.0)
        with pytest.raises(TransferError, match="no push"):
            ep.wait(3, 1.0)  # forgotten after the failure
    finally:
        ep.close()


@pytest.mark.parametrize("src_ids,dst_ids", [
    ([1, 4, 7], [9, 0, 3]),  # nothing consecutive: every part staged on both sides
    ([2, 3, 4, 8], [5, 6, 7, 1]),  # runs: sent from the cache where source blocks allow
])
@pytest.mark.parametrize("p,d", [(2, 1), (1, 2), (1, 1)])
def test_split_format_moves_the_same_bytes(monkeypatch, p, d, src_ids, dst_ids):
    """Large layers travel as header + K/V per receiver run, received in place where the leg
    carries all the receiver rank's heads (1 -> 1, 1 -> 2) and staged where it does not."""
    from pdserve.kvtransfer import (
        ChannelListener,
        KVReceiver,
        KVSender,
        TransferPlan,
        connect,
        wire,
    )

    monkeypatch.setattr(wire, "SPLIT_MIN_BYTES", 0)
    src_l = KVLayout(LAYERS, BS, HEADS, DIM, tp_size=p, dtype_str="bfloat16")
    dst_l = KVLayout(LAYERS, BS, HEADS, DIM, tp_size=d, dtype_str="bfloat16")
    plan = TransferPlan("split", src_ids, dst_ids, 0, LAYERS, src_l, dst_l, None, 21)
    torch.manual_seed(1)
    full = torch.randn(LAYERS, 2, NBLK, BS, HEADS, DIM).to(torch.bfloat16)
    src_kv = [full[..., list(src_l.head_range(s)), :].contiguous() for s in range(p)]
    dst_kv = [torch.zeros(dst_l.kv_shape(r, NBLK), dtype=torch.bfloat16) for r in range(d)]
    chans: dict = {}  # (s, r) -> (sender side, receiver side)
    for s in range(p):
        for r in range(d):
            lst = ChannelListener("127.0.0.1", f"s{s}r{r}", 1)
            box = {}
            th = threading.Thread(target=lambda b=box, ln=lst: b.setdefault("c", ln.accept("s", 5.0)))
            th.start()
            snd = connect(lst.address, "r", 5.0)
            th.join()
            chans[s, r] = (snd, box["c"])
    boxes = []
    for r in range(d):
        box: dict = {}
        chs = {s: chans[s, r][1] for s in range(p)}

        def run(r=r, chs=chs, box=box) -> None:
            try:
                box["stats"] = KVReceiver(r).receive(plan, dst_kv[r], chs, 5.0)
            except BaseException as e:  # noqa: BLE001 - checked below
                box["error"] = e

        th = threading.Thread(target=run)
        th.start()
        boxes.append((th, box))
    senders = [KVSender(s) for s in range(p)]
    for s, snd in enumerate(senders):
        snd.begin(plan, {r: chans[s, r][0] for r in range(d)})
        assert all(route.wire.split for route in snd._out["split"].routes)
        for layer in range(LAYERS):
            snd.send_layers(plan, src_kv[s], [layer])
    sent = sum(snd.wait_done("split", 5.0).bytes for snd in senders)
    for th, box in boxes:
        th.join()
        assert "error" not in box, box
    assert sent == sum(box["stats"].bytes for _, box in boxes)
    for r in range(d):
        want = full[:, :, src_ids][..., list(dst_l.head_range(r)), :]
        assert torch.equal(dst_kv[r][:, :, dst_ids], want)
        others = [b for b in range(NBLK) if b not in dst_ids]
        assert dst_kv[r][:, :, others].abs().sum() == 0
    for a, b in chans.values():
        a.close()
        b.close()
