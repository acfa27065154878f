"""TorchDistChannel on gloo, both ends in this process (two threads): rendezvous, binding,
tags, deadlines, close. Cross-process behaviour is in test_transfer.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pdserve.kvtransfer import (
    ChannelAddress,
    ChannelClosed,
    ChannelListener,
    TorchDistChannel,
    TransferTimeout,
    connect,
)

pytestmark = pytest.mark.timeout(30)


def listening_sockets() -> set[tuple[str, int]]:
    """(address, port) of the IPv4 TCP sockets in LISTEN state, from /proc/net/tcp."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":
            addr, port = local.split(":")
            ip = ".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0))
            out.add((ip, int(port, 16)))
    return out


@pytest.fixture
def pair() -> Iterator[tuple[TorchDistChannel, TorchDistChannel]]:
    listener = ChannelListener("127.0.0.1", "test-pair", epoch=1)
    got: dict[str, TorchDistChannel] = {}
    t = threading.Thread(target=lambda: got.setdefault("rx", listener.accept("tx", 10.0)))
    t.start()
    tx = connect(listener.address, "rx", timeout_s=10.0)
    t.join(15)
    rx = got["rx"]
    yield rx, tx
    rx.close()
    tx.close()


def test_store_listens_on_the_given_address_only():
    listener = ChannelListener("127.0.0.1", "bind-check", epoch=3)
    addr = listener.address
    assert addr == ChannelAddress("127.0.0.1", addr.port, "bind-check", 3)
    assert addr.store_prefix == "pdserve/kv/bind-check/3"
    sockets = listening_sockets()
    assert ("127.0.0.1", addr.port) in sockets
    assert ("0.0.0.0", addr.port) not in sockets
    listener.close()


def test_roles_and_tagged_messages_match_by_tag(pair):
    rx, tx = pair
    assert (rx.local_rank_in_pair, tx.local_rank_in_pair) == (0, 1)
    assert rx.peer == "tx" and tx.peer_rank_in_pair == 0 and not rx.ordered_only
    a, b = torch.arange(5.0), torch.arange(3, dtype=torch.int64) + 10
    sends = [tx.send(a, tag=7), tx.send(b, tag=9)]
    out_b, out_a = torch.empty(3, dtype=torch.int64), torch.empty(5)
    recv_b = rx.recv(out_b, tag=9)  # posted in the other order: tags decide, not order
    recv_a = rx.recv(out_a, tag=7)
    for p in [recv_b, recv_a, *sends]:
        p.wait(5.0)
        p.wait(5.0)  # idempotent
        assert p.done
    assert torch.equal(out_a, a) and torch.equal(out_b, b)
    with pytest.raises(ValueError):
        tx.send(torch.arange(4.0)[::2], tag=1)  # not contiguous
    with pytest.raises(ValueError):
        tx.send(a, tag=2046)  # reserved


def test_expired_wait_raises_timeout_and_breaks_both_ends(pair):
    rx, tx = pair
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        rx.recv(torch.empty(2), tag=3).wait(0.5)
    assert 0.4 < time.monotonic() - t0 < 2.0
    assert rx.closed
    with pytest.raises(ChannelClosed):
        rx.send(torch.empty(1), tag=1)
    t0 = time.monotonic()
    with pytest.raises(ChannelClosed):  # the peer learns at once, not after its own deadline
        tx.recv(torch.empty(1), tag=4).wait(5.0)
    assert time.monotonic() - t0 < 1.0 and tx.closed


def test_close_wakes_a_waiter_in_another_thread(pair):
    rx, _ = pair
    pending = rx.recv(torch.empty(2), tag=5)
    errors: list[Exception] = []

    def waiter() -> None:
        try:
            pending.wait(20.0)
        except Exception as exc:  # noqa: BLE001 -- the test asserts which one below
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    rx.close()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 2.0
    assert len(errors) == 1 and isinstance(errors[0], ChannelClosed)
    rx.close()  # idempotent


def test_rendezvous_times_out_when_nobody_comes():
    listener = ChannelListener("127.0.0.1", "lonely", epoch=1)
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        listener.accept("nobody", timeout_s=1.0)
    assert time.monotonic() - t0 < 3.0
    with pytest.raises(ChannelClosed):
        listener.accept("nobody", timeout_s=1.0)  # a listener makes one channel at most
    dead = ChannelAddress("127.0.0.1", listener.address.port, "lonely", 1)
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        connect(dead, "gone", timeout_s=1.0)  # nobody accepts on that address any more
    assert time.monotonic() - t0 < 4.0
