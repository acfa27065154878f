"""Rendezvous for pair channels: the receiver listens, the sender connects.

The *receiver* of KV bytes hosts the rendezvous (pair rank 0); the sender (rank 1) joins:

    receiver (pair rank 0)                          sender (pair rank 1)
    listener = ChannelListener(host, key, epoch)
      binds a socket to (host, 0), hosts a
      TCPStore on it
    listener.address  ---- control plane (Ray) ---> address
    listener.accept(peer, timeout_s)                connect(address, peer, timeout_s)
      `-- both block in the group constructor until the other side arrives or timeout --'

Binding: a plain `TCPStore(is_master=True)` listens on every interface. We bind a socket to
`(host, 0)` ourselves (which also picks a free port: no hard-coded ports) and hand its fd to
the store's libuv server via `master_listen_fd`; the store then owns the fd. gloo's own
listener is bound the same way through `ProcessGroupGloo.create_device(hostname=host)`.
NCCL's bootstrap sockets follow NCCL_SOCKET_IFNAME, which is the deployment's business.
Every step has a deadline: creation never blocks forever.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from pdserve.kvtransfer.channel import ChannelClosed, TransferTimeout
from pdserve.kvtransfer.torch_channel import TorchDistChannel, as_timedelta


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
        opts._timeout = as_timedelta(timeout_s)
        pg = dist.ProcessGroupNCCL(store, rank, 2, opts)
        pg.eager_connect_single_device(device)  # connect now, not lazily on the first send
        return pg
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    opts._timeout = as_timedelta(timeout_s)
    return dist.ProcessGroupGloo(store, rank, 2, opts)


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
                as_timedelta(store_timeout_s),
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
        store.set_timeout(as_timedelta(timeout_s))
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
        store = dist.TCPStore(address.host, address.port, None, False, as_timedelta(timeout_s))
        # The store's client retries with backoff; what is left of the deadline bounds the rest.
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError("store connection used up the deadline")
        store.set_timeout(as_timedelta(left))
        prefixed = dist.PrefixStore(address.store_prefix, store)
        group = _make_group(prefixed, 1, host, device, left)
    except RuntimeError as exc:
        raise TransferTimeout(f"could not connect to {peer} at {address}: {exc}") from exc
    return TorchDistChannel(group, 1, peer, device, store)
