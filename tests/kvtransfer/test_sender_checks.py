"""Unit tests of KVSender / KVReceiver argument checks, with channels that move nothing."""

from __future__ import annotations

import pytest
import torch
from pdserve.kvtransfer import (
    Channel,
    KVLayout,
    KVReceiver,
    KVSender,
    Pending,
    TransferError,
    TransferPlan,
)


class Done(Pending):
    done = True

    def wait(self, timeout_s: float) -> None:
        return None


class NullChannel(Channel):
    """Posts succeed and complete at once; nothing is moved."""

    def __init__(self, ordered_only: bool = False) -> None:
        self._ordered = ordered_only
        self._closed = False

    peer = property(lambda self: "null")
    local_rank_in_pair = property(lambda self: 1)
    device = property(lambda self: torch.device("cpu"))
    closed = property(lambda self: self._closed)
    ordered_only = property(lambda self: self._ordered)

    def send(self, tensor: torch.Tensor, tag: int) -> Pending:
        return Done()

    recv = send

    def close(self) -> None:
        self._closed = True


def make_plan(request_id: str = "r", src_tp: int = 1, dst_tp: int = 2) -> TransferPlan:
    src = KVLayout(2, 4, 2, 8, src_tp, "float32")
    dst = KVLayout(2, 4, 2, 8, dst_tp, "float32")
    return TransferPlan(request_id, [0, 3], [1, 2], 0, 2, src, dst)


def test_begin_needs_a_channel_per_receiver_rank():
    with pytest.raises(ValueError, match="receiver rank 1"):
        KVSender(0).begin(make_plan(), {0: NullChannel()})


def test_send_layers_checks_order_of_calls_layers_and_kv():
    sender = KVSender(0)
    plan = make_plan()
    kv = torch.zeros(plan.src_layout.kv_shape(0, num_blocks=4))
    with pytest.raises(ValueError, match="begin"):
        sender.send_layers(plan, kv, [0])
    sender.begin(plan, {0: NullChannel(), 1: NullChannel()})
    with pytest.raises(ValueError, match="already in progress"):
        sender.begin(plan, {0: NullChannel(), 1: NullChannel()})
    with pytest.raises(ValueError, match="layout says"):
        sender.send_layers(plan, torch.zeros(2, 2, 4, 4, 1, 8), [0])
    sender.send_layers(plan, kv, [0])
    with pytest.raises(ValueError, match="already sent"):
        sender.send_layers(plan, kv, [0])
    with pytest.raises(ValueError, match="outside"):
        sender.send_layers(plan, kv, [5])
    assert sender.in_flight == ["r"]
    with pytest.raises(ValueError, match="never sent"):
        sender.wait_done("r", timeout_s=1.0)
    assert sender.in_flight == []
    with pytest.raises(ValueError, match="no transfer"):
        sender.wait_done("r", timeout_s=1.0)


def test_receiver_checks_block_ids_against_its_cache():
    plan = make_plan(src_tp=1, dst_tp=1)
    kv = torch.zeros(plan.dst_layout.kv_shape(0, num_blocks=2))  # block 2 does not exist
    with pytest.raises(ValueError, match="block ids"):
        KVReceiver(0).receive(plan, kv, {0: NullChannel()}, timeout_s=1.0)


def test_order_only_channels_carry_one_transfer_at_a_time():
    sender = KVSender(0)
    nccl_like = NullChannel(ordered_only=True)
    sender.begin(make_plan("a", dst_tp=1), {0: nccl_like})
    with pytest.raises(TransferError, match="order-only"):
        sender.begin(make_plan("b", dst_tp=1), {0: nccl_like})
    sender.begin(make_plan("c", dst_tp=1), {0: NullChannel()})  # tagged channels: no limit
    with pytest.raises(TransferError, match="ack"):
        sender.abort("a", timeout_s=1.0)  # a null channel delivers no real ack
    assert nccl_like.closed  # a transfer that failed breaks its channels
    sender.begin(make_plan("b", dst_tp=1), {0: nccl_like})  # and releases them
