"""`TorchDistChannel`: a `Channel` over a two-party `torch.distributed` process group.

Each pair gets its own group, built directly from a store (see `rendezvous.py`), never through
`dist.init_process_group`: every instance already has its own TP group, and pair groups come
and go with peers. The `dist.isend/irecv` helpers expect groups registered with that default
machinery, so ops go through the backend's own `send([t], dst, tag)` / `recv([t], src, tag)`,
whose work handles take a deadline in `wait(timeout)`.

Backend: gloo when `device.type == "cpu"`, NCCL when `device.type == "cuda"` (the CUDA lines
are few and guarded; they are not exercised by the CPU test suite). NCCL ignores tags, hence
`ordered_only`.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from pdserve.kvtransfer.channel import Channel, ChannelClosed, Pending, TransferTimeout

# A tag no transfer ever uses (see `wire.py`: layer messages use 0..2045 and acks 2047 in the
# low 11 bits). `close()` posts a recv on it and lets it expire at once, see `_poison_gloo`.
CLOSE_SENTINEL_TAG = 2046


def as_timedelta(seconds: float) -> datetime.timedelta:
    # torch treats a zero timeout as "use the default" (30 min for gloo): never pass one.
    return datetime.timedelta(seconds=max(seconds, 0.001))


class _TorchPending(Pending):
    __slots__ = ("_channel", "_done", "_tensor", "_work")

    def __init__(self, channel: TorchDistChannel, work: dist.Work, tensor: torch.Tensor) -> None:
        self._channel = channel
        self._work: dist.Work | None = work
        self._tensor: torch.Tensor | None = tensor  # kept alive until the op completes
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def wait(self, timeout_s: float) -> None:
        if self._done:
            return  # a gloo work must not be waited twice: its completion is consumed once
        ch = self._channel
        if ch.closed:
            raise ChannelClosed(f"channel to {ch.peer} is closed")
        # A deadline already past still gets a 1 ms wait: an op that has completed is
        # accepted, one that has not expires and so breaks the channel on both sides.
        timeout_s = max(timeout_s, 0.001)
        t0 = time.monotonic()
        try:
            ok = self._work.wait(as_timedelta(timeout_s))
        except RuntimeError as exc:  # torch's DistError family derives from RuntimeError
            elapsed = time.monotonic() - t0
            closed_before = ch.closed
            ch.close()
            # An expired wait of *ours* is a timeout; any other failure (peer gone, another op
            # on this channel expired, local close) is a closed channel.
            if not closed_before and elapsed >= 0.9 * timeout_s:
                raise TransferTimeout(
                    f"no completion from {ch.peer} within {timeout_s:.3g}s"
                ) from exc
            raise ChannelClosed(f"channel to {ch.peer} broke: {exc}") from exc
        if not ok:
            ch.close()
            raise ChannelClosed(f"op with {ch.peer} was aborted")
        self._done = True
        self._work = None
        self._tensor = None


class TorchDistChannel(Channel):
    """A `Channel` over a two-party gloo or NCCL group. Build it with `ChannelListener.accept`
    (receiver side) or `connect` (sender side), not directly."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        rank: int,
        peer: str,
        device: torch.device,
        store: dist.Store,
    ) -> None:
        self._pg = group
        self._rank = rank
        self._peer = peer
        self._device = device
        self._store = store  # the NCCL backend may read it after creation; held until close
        self._lock = threading.Lock()  # orders posts against close()
        self._closed = False

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def local_rank_in_pair(self) -> int:
        return self._rank

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def ordered_only(self) -> bool:
        return self._device.type == "cuda"  # NCCL p2p ignores tags

    @property
    def closed(self) -> bool:
        return self._closed

    def _check(self, tensor: torch.Tensor, tag: int) -> None:
        if tensor.device != self._device or not tensor.is_contiguous():
            raise ValueError(
                f"channel tensors must be contiguous on {self._device}, got {tensor.device}"
            )
        if not 0 <= tag < 2**31 or tag == CLOSE_SENTINEL_TAG:
            raise ValueError(f"tag {tag} is reserved or out of range")

    def send(self, tensor: torch.Tensor, tag: int) -> Pending:
        return self._post(self._pg.send, tensor, tag)

    def recv(self, tensor: torch.Tensor, tag: int) -> Pending:
        return self._post(self._pg.recv, tensor, tag)

    def _post(self, op: Callable[..., dist.Work], tensor: torch.Tensor, tag: int) -> Pending:
        self._check(tensor, tag)
        try:
            with self._lock:
                if self._closed:
                    raise ChannelClosed(f"channel to {self._peer} is closed")
                work = op([tensor], self.peer_rank_in_pair, tag)
        except RuntimeError as exc:  # gloo refuses to post on a pair the peer closed
            self.close()
            raise ChannelClosed(f"channel to {self._peer} broke: {exc}") from exc
        return _TorchPending(self, work, tensor)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._device.type == "cuda":
            self._pg.abort()
        else:
            _poison_gloo(self._pg, self.peer_rank_in_pair)
        self._store = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"TorchDistChannel(peer={self._peer!r}, rank={self._rank}, {state})"


def _poison_gloo(pg: dist.ProcessGroup, peer_rank: int) -> None:
    """Close a gloo pair so that every pending op, here and at the peer, fails now.

    gloo's `abort()`/`shutdown()` do not wake a thread blocked in `work.wait()`. What does is an
    application-level timeout: gloo then signals an exception to every pair of the context and
    closes their sockets, and the peer sees "connection closed". So we post a recv that can
    never match (CLOSE_SENTINEL_TAG) and let it expire after 1 ms.
    """
    try:
        work = pg.recv([torch.empty(1, dtype=torch.uint8)], peer_rank, CLOSE_SENTINEL_TAG)
        work.wait(datetime.timedelta(milliseconds=1))
    except RuntimeError:
        pass  # expected: that is the point
