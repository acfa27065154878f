"""Unit tests of ChannelPool with in-memory fake channels (the real restart is in
test_transfer.py::test_pool_rebuilds_channel_when_peer_restarts)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from pdserve.kvtransfer import Channel, ChannelClosed, ChannelPool, PeerId, Pending


class FakeChannel(Channel):
    def __init__(self, peer: PeerId) -> None:
        self.peer_id = peer
        self._closed = False

    peer = property(lambda self: str(self.peer_id))
    local_rank_in_pair = property(lambda self: 1)
    device = property(lambda self: torch.device("cpu"))
    closed = property(lambda self: self._closed)

    def send(self, tensor: torch.Tensor, tag: int) -> Pending:
        raise NotImplementedError

    recv = send

    def close(self) -> None:
        self._closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_pool(idle: float = 10.0, delay: float = 0.0):
    made: list[FakeChannel] = []

    def factory(peer: PeerId) -> FakeChannel:
        time.sleep(delay)
        made.append(FakeChannel(peer))
        return made[-1]

    clock = Clock()
    return ChannelPool(factory, idle_timeout_s=idle, clock=clock), made, clock


def test_created_lazily_and_cached_per_peer_rank():
    pool, made, _ = make_pool()
    assert made == []
    a = PeerId("decode-0", 1, rank=0)
    b = PeerId("decode-0", 1, rank=1)
    with pool.lease(a) as ch:
        assert ch is made[0]
    with pool.lease(a) as ch2:
        assert ch2 is ch
    with pool.lease(b) as ch3:
        assert ch3 is not ch
    assert len(made) == 2 and set(pool.peers()) == {a, b}


def test_epoch_change_rebuilds_channel_and_refuses_stale_epoch():
    pool, _, _ = make_pool()
    old = pool.acquire(PeerId("decode-0", 1, rank=0))
    other = pool.acquire(PeerId("decode-1", 1))
    new = pool.acquire(PeerId("decode-0", 2, rank=1))  # any rank of the restarted instance
    assert old.closed  # even though leased: the peer it talked to is gone
    assert new is not old and not new.closed and not other.closed
    with pytest.raises(ChannelClosed, match="stale"):
        pool.acquire(PeerId("decode-0", 1, rank=0))
    assert set(pool.peers()) == {PeerId("decode-1", 1), PeerId("decode-0", 2, rank=1)}
    pool.release(PeerId("decode-0", 1, rank=0), old)  # releasing a retired lease is harmless


def test_idle_channels_close_but_leased_ones_stay():
    pool, made, clock = make_pool(idle=10.0)
    busy, idle = PeerId("a", 1), PeerId("b", 1)
    ch_busy = pool.acquire(busy)
    with pool.lease(idle):
        pass
    clock.now = 9.0
    assert pool.close_idle() == 0
    clock.now = 10.5
    assert pool.close_idle() == 1
    assert made[1].closed and not ch_busy.closed
    assert pool.peers() == [busy]
    with pool.lease(idle) as again:  # next use rebuilds it
        assert again is not made[1]


def test_broken_channel_is_replaced_on_next_use():
    pool, _, _ = make_pool()
    peer = PeerId("a", 3)
    with pool.lease(peer) as ch:
        ch.close()  # what a transfer timeout does
    with pool.lease(peer) as ch2:
        assert ch2 is not ch and not ch2.closed


def test_concurrent_acquires_create_once():
    pool, made, _ = make_pool(delay=0.2)
    peer = PeerId("a", 1)
    got: list[Channel] = []
    threads = [threading.Thread(target=lambda: got.append(pool.acquire(peer))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(made) == 1 and len(got) == 4 and all(c is made[0] for c in got)


def test_close_all():
    pool, made, _ = make_pool()
    pool.acquire(PeerId("a", 1))
    pool.acquire(PeerId("b", 1))
    pool.close_all()
    assert all(c.closed for c in made) and pool.peers() == []
    with pytest.raises(ChannelClosed):
        pool.acquire(PeerId("a", 1))


def test_invalidate():
    pool, made, _ = make_pool()
    peer = PeerId("a", 1)
    pool.acquire(peer)
    pool.invalidate(peer)
    assert made[0].closed and pool.peers() == []
