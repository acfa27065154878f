"""`ChannelPool`: the channels of one process (one TP rank), one per peer rank and epoch.

LESSONS #2 and #5: channels are per pair, made lazily on first use, closed when idle (a gloo
pair holds sockets and threads, an NCCL pair ~100 MB of GPU memory), and rebuilt when the peer
restarts. A restarted peer comes back with a higher epoch: the first use of the new epoch
closes every channel to the old one (in-flight ops on them fail with ChannelClosed), and a
later request for the old epoch is refused as stale.

Leases: a channel in use by a transfer is leased (`lease()` / `acquire()`+`release()`); only
unleased channels are closed for idleness. A broken channel (`closed` after a failure) is
dropped and rebuilt on the next acquire. The pool never holds its lock while a factory runs
(rendezvous may block up to the factory's own timeout); concurrent acquires of one peer wait
for a single creation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pdserve.kvtransfer.channel import Channel, ChannelClosed


@dataclass(frozen=True, slots=True)
class PeerId:
    """One rank of one incarnation of a peer instance."""

    instance_id: str
    epoch: int  # bumped by the peer on every restart (published in its registry entry)
    rank: int = 0  # the peer's TP rank


@dataclass(slots=True)
class _Entry:
    channel: Channel
    leases: int
    last_used: float  # pool clock, when the last lease ended (or began)


class ChannelPool:
    """Lazily created, idle-closed, epoch-aware channels keyed by `PeerId`.

    `factory(peer)` makes a channel (e.g. `connect` to the address the peer published, or
    `ChannelListener.accept`); it must return or raise within its own timeout.
    """

    def __init__(
        self,
        factory: Callable[[PeerId], Channel],
        idle_timeout_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = factory
        self._idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[PeerId, _Entry] = {}
        self._creating: dict[PeerId, threading.Event] = {}
        self._epochs: dict[str, int] = {}  # newest epoch seen per instance id
        self._closed = False

    def acquire(self, peer: PeerId) -> Channel:
        """The channel to `peer`, created if needed; leased until `release(peer, channel)`.

        Raises ChannelClosed for a stale epoch or a closed pool, and whatever the factory
        raises (TransferTimeout when the peer does not show up).
        """
        self.close_idle()
        while True:
            to_close: list[Channel] = []
            with self._lock:
                self._check_open(peer)
                to_close = self._retire_older_epochs(peer)
                entry = self._entries.get(peer)
                if entry is not None and entry.channel.closed:
                    del self._entries[peer]  # broken by a failure: rebuild
                    entry = None
                if entry is not None:
                    entry.leases += 1
                    entry.last_used = self._clock()
                    channel = entry.channel
                else:
                    creating = self._creating.get(peer)
                    mine = creating is None
                    if mine:
                        creating = self._creating[peer] = threading.Event()
            for old in to_close:
                old.close()
            if entry is not None:
                return channel
            if not mine:
                creating.wait()  # another thread is creating it; then look again
                continue
            return self._create(peer, creating)

    def _create(self, peer: PeerId, creating: threading.Event) -> Channel:
        try:
            channel = self._factory(peer)
        finally:
            with self._lock:
                del self._creating[peer]
            creating.set()
        with self._lock:
            stale = self._closed or self._epochs.get(peer.instance_id, peer.epoch) > peer.epoch
            if not stale:
                self._entries[peer] = _Entry(channel, leases=1, last_used=self._clock())
        if stale:  # the pool closed or the peer restarted while we were connecting
            channel.close()
            raise ChannelClosed(f"{peer} went stale while its channel was being created")
        return channel

    def release(self, peer: PeerId, channel: Channel) -> None:
        """End a lease. A no-op if the channel was replaced or closed meanwhile."""
        with self._lock:
            entry = self._entries.get(peer)
            if entry is not None and entry.channel is channel and entry.leases > 0:
                entry.leases -= 1
                entry.last_used = self._clock()

    @contextmanager
    def lease(self, peer: PeerId) -> Iterator[Channel]:
        channel = self.acquire(peer)
        try:
            yield channel
        finally:
            self.release(peer, channel)

    def close_idle(self) -> int:
        """Close unleased channels idle for `idle_timeout_s`, and broken ones; returns how many."""
        now = self._clock()
        with self._lock:
            idle = [
                p
                for p, e in self._entries.items()
                if e.channel.closed or (e.leases == 0 and now - e.last_used >= self._idle_timeout_s)
            ]
            channels = [self._entries.pop(p).channel for p in idle]
        for channel in channels:
            channel.close()
        return len(channels)

    def invalidate(self, peer: PeerId) -> None:
        """Close and forget the channel to `peer` (e.g. the router saw it die)."""
        with self._lock:
            entry = self._entries.pop(peer, None)
        if entry is not None:
            entry.channel.close()

    def close_all(self) -> None:
        """Close every channel; later acquires raise ChannelClosed."""
        with self._lock:
            self._closed = True
            channels = [e.channel for e in self._entries.values()]
            self._entries.clear()
        for channel in channels:
            channel.close()

    def has(self, peer: PeerId) -> bool:
        """True if an open (not broken) channel to `peer` is in the pool."""
        with self._lock:
            entry = self._entries.get(peer)
            return entry is not None and not entry.channel.closed

    def peers(self) -> list[PeerId]:
        with self._lock:
            return list(self._entries)

    def _check_open(self, peer: PeerId) -> None:
        if self._closed:
            raise ChannelClosed("the channel pool is closed")
        newest = self._epochs.get(peer.instance_id)
        if newest is not None and peer.epoch < newest:
            raise ChannelClosed(f"{peer} is stale: {peer.instance_id} restarted (epoch {newest})")

    def _retire_older_epochs(self, peer: PeerId) -> list[Channel]:
        """Record `peer`'s epoch; pop (to close outside the lock) channels to older epochs."""
        if self._epochs.get(peer.instance_id, -1) >= peer.epoch:
            return []
        self._epochs[peer.instance_id] = peer.epoch
        old = [
            p for p in self._entries if p.instance_id == peer.instance_id and p.epoch < peer.epoch
        ]
        return [self._entries.pop(p).channel for p in old]
