"""`TorchDistChannel`: a `Channel` over a two-party `torch.distributed` process group.

Each pair gets its own group, built directly from a store, never through
`dist.init_process_group` (every instance already has its own TP group, and pair groups come
and go with peers). Rendezvous, with the *receiver* of KV bytes hosting it:

    receiver (pair rank 0)                          sender (pair rank 1)
    listener = ChannelListener(host, key, epoch)
      binds a socket to (host, 0), hosts a
      TCPStore on it
    listener.address  ---- control plane (Ray) ---> address
    listener.accept(peer, timeout_s)                connect(address, peer, timeout_s)
      \___ both block in the group constructor until the other side arrives or timeout ___/

Binding: a plain `TCPStore(is_master=True)` listens on every interface. We bind a socket to
`(host, 0)` ourselves (which also picks a free port: no hard-coded ports) and hand its fd to
the store's libuv server via `master_listen_fd`; the store then owns the fd. gloo's own
listener is bound the same way through `ProcessGroupGloo.create_device(hostname=host)`.
NCCL's bootstrap sockets follow NCCL_SOCKET_IFNAME, which is the deployment's business.

Backend: gloo when `device.type == "cpu"`, NCCL when `device.type == "cuda"` (the CUDA lines
are few and guarded; they are not exercised by the CPU test suite).
"""

from __future__ import annotations

import datetime
import socket
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pdserve.kvtransfer.channel import Channel, ChannelClosed, Pending, TransferTimeout

# A tag no transfer ever uses (see `wire.py`: layer messages use 0..2045 and acks 2047 in the
# low 11 bits). `close()` posts a recv on it and lets it expire at once, see `_poison_gloo`.
CLOSE_SENTINEL_TAG = 2046


@dataclass(frozen=True, slots=True)
class ChannelAddress:
    """Where a sender finds a receiver's rendezvous; sent over the control plane."""

    host: str  # the address the receiver's store (and gloo listener) is bound to
    port: int  # the store's port, chosen free by the OS
    pair_key: str  # names the pair, e.g. "prefill-0/r1->decode-2/r0"
    epoch: int  # the receiver's epoch; a restarted receiver publishes a new address

    @property
    def store_prefix(self) -> str:
        # Unique per pair and epoch, so stale keys of an earlier group can never be read.
        return f"pdserve/kv/{self.pair_key}/{self.epoch}"


def _timedelta(seconds: float) -> datetime.timedelta:
    # torch treats a zero timeout as "use the default" (30 min for gloo): never pass one.
    return datetime.timedelta(seconds=max(seconds, 0.001))


def _local_host_towards(host: str) -> str:
    """The local address the OS would use to reach `host` (no packet is sent)."""
    if host.startswith("127.") or host == "localhost":
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return probe.getsockname()[0]


def _make_group(
    store: dist.Store, rank: int, host: str, device: torch.device, timeout_s: float
) -> dist.ProcessGroup:
    """Build the two-party backend; blocks until the peer joins, at most `timeout_s`."""
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _timedelta(timeout_s)
        pg = dist.ProcessGroupNCCL(store, rank, 2, opts)
        pg.eager_connect_single_device(device)  # connect now, not lazily on the first send
        return pg
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    opts._timeout = _timedelta(timeout_s)
    return dist.ProcessGroupGloo(store, rank, 2, opts)


class _TorchPending(Pending):
    __slots__ = ("_channel", "_work", "_tensor", "_done")

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
        t0 = time.monotonic()
        try:
            ok = self._work.wait(_timedelta(timeout_s))
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
        self._check(tensor, tag)
        with self._lock:
            if self._closed:
                raise ChannelClosed(f"channel to {self._peer} is closed")
            work = self._pg.send([tensor], self.peer_rank_in_pair, tag)
        return _TorchPending(self, work, tensor)

    def recv(self, tensor: torch.Tensor, tag: int) -> Pending:
        self._check(tensor, tag)
        with self._lock:
            if self._closed:
                raise ChannelClosed(f"channel to {self._peer} is closed")
            work = self._pg.recv([tensor], self.peer_rank_in_pair, tag)
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


class ChannelListener:
    """The receiver's half of the rendezvous: a store bound to `host` on a free port.

    Owns the store until `accept()` hands it to the channel; `close()` releases it if no
    channel was made. Not thread-safe; one listener makes at most one channel.
    """

    def __init__(
        self,
        host: str,
        pair_key: str,
        epoch: int,
        device: torch.device | str = "cpu",
        store_timeout_s: float = 30.0,
    ) -> None:
        self._device = torch.device(device)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, 0))
            sock.listen(64)
            port = sock.getsockname()[1]
            self._store: dist.TCPStore | None = dist.TCPStore(
                host,
                port,
                None,
                True,
                _timedelta(store_timeout_s),
                wait_for_workers=False,
                master_listen_fd=sock.fileno(),
                use_libuv=True,
            )
        except BaseException:
            sock.close()
            raise
        sock.detach()  # the store's server owns the fd now; Python must not close it too
        self.address = ChannelAddress(host=host, port=port, pair_key=pair_key, epoch=epoch)

    def accept(self, peer: str, timeout_s: float) -> TorchDistChannel:
        """Wait (at most `timeout_s`) for the sender to `connect`; returns the channel."""
        if self._store is None:
            raise ChannelClosed("listener already used or closed")
        store, self._store = self._store, None
        store.set_timeout(_timedelta(timeout_s))
        prefixed = dist.PrefixStore(self.address.store_prefix, store)
        try:
            group = _make_group(prefixed, 0, self.address.host, self._device, timeout_s)
        except RuntimeError as exc:
            raise TransferTimeout(f"{peer} did not connect to {self.address}: {exc}") from exc
        return TorchDistChannel(group, 0, peer, self._device, store)

    def close(self) -> None:
        self._store = None


def connect(
    address: ChannelAddress,
    peer: str,
    timeout_s: float,
    device: torch.device | str = "cpu",
    local_host: str | None = None,
) -> TorchDistChannel:
    """The sender's half: join the receiver's rendezvous at `address` within `timeout_s`.

    `local_host` is the address this side's gloo listener binds to; by default the local
    interface that routes to `address.host` (127.0.0.1 for a loopback address).
    """
    device = torch.device(device)
    host = local_host or _local_host_towards(address.host)
    deadline = time.monotonic() + timeout_s
    try:
        store = dist.TCPStore(address.host, address.port, None, False, _timedelta(timeout_s))
        # The store's client retries with backoff; what is left of the deadline bounds the rest.
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError("store connection used up the deadline")
        store.set_timeout(_timedelta(left))
        prefixed = dist.PrefixStore(address.store_prefix, store)
        group = _make_group(prefixed, 1, host, device, left)
    except RuntimeError as exc:
        raise TransferTimeout(f"could not connect to {peer} at {address}: {exc}") from exc
    return TorchDistChannel(group, 1, peer, device, store)
