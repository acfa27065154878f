"""`RankEndpoint`: the KV-transfer side of one TP rank of an instance (ranks > 0).

An instance of TP=p moves KV with p endpoints, one per rank process: each owns its channels
(a `ChannelPool` keyed by the peer rank's `PeerId`), a `KVSender` and a `KVReceiver`, and
takes part only in the legs `head_slices` gives its rank. Rank 0 of the instance coordinates
(its calls reach the other ranks over the control plane, Ray calls in pdserve; this module
imports no Ray). Rank 0 itself keeps its own channels in `Instance` and follows the same
protocol.

Sending one request's KV, on every sender rank with legs:

    rank 0 (coordinates)                     rank s > 0 (this endpoint)
    register(key, spec) ───────────────────> where the KV goes; `missing(...)`: channels
      open missing channels: the receiver      to open (the receiver rank `listen`s, this
      rank listens, this rank `connect`s       rank `connect`s)
    tell the receiving instance to expect
    step message: [key, src block ids] ────> `start(key, ids)` then `send_layer(...)` from
                                              the layer hook, while the next layer computes
    `wait(key)` after the step ────────────> blocks until the receivers acked
    or `cancel(key, notify)` on failure        (cancel messages for unsent layers if notify)

Receiving (`receive`) runs in its own thread per transfer on each receiver rank with legs;
rank 0 of the receiving instance frees the blocks only once every rank's receive returned.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from pdserve.kvtransfer.channel import Channel, ChannelClosed, TransferError
from pdserve.kvtransfer.plan import KVLayout, TransferPlan, peer_ranks
from pdserve.kvtransfer.pool import ChannelPool, PeerId
from pdserve.kvtransfer.rendezvous import ChannelAddress, ChannelListener, connect
from pdserve.kvtransfer.transfer import KVReceiver, KVSender, TransferStats

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PushSpec:
    """A transfer as the sending instance knows it before the request is scheduled: all of a
    `TransferPlan` but the source block ids, which come with the step that computes it."""

    request_id: str
    dst_instance: str
    dst_epoch: int
    dst_block_ids: tuple[int, ...]
    src_layout: KVLayout
    dst_layout: KVLayout
    compress: str | None = None
    transfer_id: int | None = None

    def plan(self, src_block_ids: Sequence[int]) -> TransferPlan:
        return TransferPlan(
            self.request_id, src_block_ids, self.dst_block_ids, 0, self.src_layout.num_layers,
            self.src_layout, self.dst_layout, self.compress, self.transfer_id,
        )

    def receivers(self, src_rank: int) -> list[PeerId]:
        """The receiver ranks sender rank `src_rank` sends heads to."""
        ranks = peer_ranks(self.src_layout, self.dst_layout, src_rank, sending=True)
        return [PeerId(self.dst_instance, self.dst_epoch, r) for r in ranks]


def senders(plan: TransferPlan, src: PeerId, dst_rank: int) -> list[PeerId]:
    """The sender ranks (of instance `src`) receiver rank `dst_rank` takes heads from."""
    ranks = peer_ranks(plan.src_layout, plan.dst_layout, dst_rank, sending=False)
    return [PeerId(src.instance_id, src.epoch, s) for s in ranks]


def merge_stats(parts: Iterable[TransferStats]) -> TransferStats:
    """One transfer's figures over its ranks: bytes add up, the ranks' times overlap (max)."""
    parts = list(parts)
    if not parts:
        return TransferStats(0, 0.0, 0.0, 0.0)
    return TransferStats(sum(p.bytes for p in parts), max(p.wait_s for p in parts),
                         max(p.transfer_s for p in parts), max(p.scatter_s for p in parts))


@dataclass(slots=True)
class _Push:
    spec: PushSpec
    plan: TransferPlan | None = None  # set by start()
    channels: dict[int, Channel] = field(default_factory=dict)  # leased, by receiver rank
    error: BaseException | None = None  # start/send failed (reported by wait)


class RankEndpoint:
    """Channels, sender and receiver of one TP rank. Thread-safe: control calls arrive in
    their own threads while the rank's forward calls `start`/`send_layer` from its layer hook."""

    def __init__(self, me: PeerId, host: str, timeout_s: float) -> None:
        self.me, self.host, self.timeout = me, host, timeout_s
        self.pool = ChannelPool(self._make_channel)
        self.sender = KVSender(me.rank)
        self.receiver = KVReceiver(me.rank)
        self._lock = threading.Lock()
        self._rendezvous: dict[PeerId, Callable[[], Channel]] = {}
        self._pushes: dict[int, _Push] = {}

    # ---- channels ------------------------------------------------------------------------
    def _make_channel(self, peer: PeerId) -> Channel:
        with self._lock:
            make = self._rendezvous.pop(peer, None)
        if make is None:  # channels are opened by rank 0's coordination, never on a whim
            raise ChannelClosed(f"{self._name(self.me)}: no channel to {self._name(peer)}")
        return make()

    @staticmethod
    def _name(p: PeerId) -> str:
        return f"{p.instance_id}/r{p.rank}"

    def listen(self, src: PeerId) -> ChannelAddress:
        """Receiver side: drop any channel to sender rank `src`, open a rendezvous and accept
        in the background; the sender `connect`s to the returned address."""
        self.pool.invalidate(src)
        listener = ChannelListener(self.host, f"{self._name(src)}->{self._name(self.me)}",
                                   self.me.epoch)
        with self._lock:
            self._rendezvous[src] = lambda: listener.accept(self._name(src), self.timeout)

        def accept() -> None:
            try:
                self.pool.release(src, self.pool.acquire(src))
            except Exception as e:  # noqa: BLE001 - the sender sees its own failure
                log.warning("channel from %s was not established: %s", self._name(src), e)

        threading.Thread(target=accept, daemon=True).start()
        return listener.address

    def connect(self, peer: PeerId, address: ChannelAddress, timeout_s: float) -> None:
        """Sender side: join receiver rank `peer`'s rendezvous at `address` (blocks until
        connected, at most `timeout_s`); the channel then waits in the pool."""
        self.pool.invalidate(peer)
        with self._lock:
            self._rendezvous[peer] = lambda: connect(address, self._name(peer), timeout_s)
        self.pool.release(peer, self.pool.acquire(peer))

    def missing(self, peers: Iterable[PeerId]) -> list[PeerId]:
        """The peers among `peers` this rank has no open channel to."""
        return [p for p in peers if not self.pool.has(p)]

    # ---- sending -------------------------------------------------------------------------
    def register(self, key: int, spec: PushSpec) -> list[PeerId]:
        """Announce push `key`; returns the receiver ranks still lacking a channel."""
        with self._lock:
            if key in self._pushes:
                raise ValueError(f"push {key} ({spec.request_id!r}) is already registered")
            self._pushes[key] = _Push(spec)
        return self.missing(spec.receivers(self.me.rank))

    def start(self, key: int, src_block_ids: Sequence[int]) -> None:
        """Begin push `key` with this rank's source blocks. Never raises: a failure is kept
        for `wait` (this runs inside the forward, which must go on in step with the other
        ranks). Unknown keys are ignored (rank 0 may have given the push up)."""
        with self._lock:
            push = self._pushes.get(key)
        if push is None or push.plan is not None or push.error is not None:
            return
        try:
            plan = push.spec.plan(src_block_ids)
            for peer in push.spec.receivers(self.me.rank):
                push.channels[peer.rank] = self.pool.acquire(peer)
            self.sender.begin(plan, push.channels)
            push.plan = plan
        except Exception as e:  # noqa: BLE001 - reported by wait()
            push.error = e

    def send_layer(self, key: int, kv: torch.Tensor, layer: int) -> None:
        """Post layer `layer` of push `key` (after `start`). Never raises, like `start`."""
        with self._lock:
            push = self._pushes.get(key)
        if push is None or push.plan is None or push.error is not None:
            return
        try:
            self.sender.send_layers(push.plan, kv, [layer])
        except Exception as e:  # noqa: BLE001 - reported by wait()
            push.error = e

    def layer_hook(self, kv: torch.Tensor, orders: Sequence[tuple[int, Sequence[int]]]
                   ) -> Callable[[int], None]:
        """The forward's per-layer hook for one step's push orders `[(key, src block ids)]`."""
        def hook(layer: int) -> None:
            for key, block_ids in orders:
                if layer == 0:
                    self.start(key, block_ids)
                self.send_layer(key, kv, layer)

        return hook

    def wait(self, key: int, timeout_s: float) -> TransferStats:
        """Block until the receivers acked push `key` (at most `timeout_s`); then forget it.
        Raises TransferError if it failed or never started."""
        push = self._pop(key)
        if push is None:
            raise TransferError(f"{self._name(self.me)}: no push {key} registered")
        try:
            rid = push.spec.request_id
            if push.error is not None or push.plan is None:
                if rid in self.sender.in_flight:
                    self._abort(rid, timeout_s)
                self._invalidate(push)
                why = push.error or "it was never started"
                raise TransferError(f"{self._name(self.me)} could not send {rid!r}: {why}")
            # a failure closes the legs' channels (KVSender), and the pool rebuilds them
            return self.sender.wait_done(rid, timeout_s)
        finally:
            self._release(push)

    def cancel(self, key: int, timeout_s: float, notify: bool = True) -> None:
        """Give push `key` up. A started push sends cancel messages for its unsent layers and
        takes the receivers' acks (the channels stay in step); one never started does the same
        if `notify` (the receivers are waiting), else (they are not, or a stall made them time
        out) its channels are dropped. No-op for an unknown key."""
        push = self._pop(key)
        if push is None:
            return
        try:
            rid = push.spec.request_id
            if push.plan is None and push.error is None and notify:
                # Source blocks are never read when cancelling: the receiver's ids stand in.
                plan = push.spec.plan(push.spec.dst_block_ids)
                for peer in push.spec.receivers(self.me.rank):
                    push.channels[peer.rank] = self.pool.acquire(peer)
                self.sender.begin(plan, push.channels)
            if rid in self.sender.in_flight:
                self._abort(rid, timeout_s)
            elif not notify:
                self._invalidate(push)
        finally:
            self._release(push)

    def _abort(self, rid: str, timeout_s: float) -> None:
        try:
            self.sender.abort(rid, timeout_s)
        except TransferError as e:
            log.warning("cancelling the transfer of %s failed: %s", rid, e)

    def _pop(self, key: int) -> _Push | None:
        with self._lock:
            return self._pushes.pop(key, None)

    def _release(self, push: _Push) -> None:
        for r, ch in push.channels.items():
            self.pool.release(PeerId(push.spec.dst_instance, push.spec.dst_epoch, r), ch)

    def _invalidate(self, push: _Push) -> None:
        # A failed or stalled transfer leaves a pair out of step (or closed at the far end):
        # the next one builds fresh channels.
        for peer in push.spec.receivers(self.me.rank):
            self.pool.invalidate(peer)

    # ---- receiving -----------------------------------------------------------------------
    def receive(self, plan: TransferPlan, src: PeerId, kv: torch.Tensor,
                timeout_s: float) -> TransferStats:
        """Receive this rank's heads of `plan` from the sender ranks of instance `src` (its
        `rank` is ignored) into `kv`, then ack; raises like `KVReceiver.receive`."""
        channels: dict[int, Channel] = {}
        peers = senders(plan, src, self.me.rank)
        try:
            for peer in peers:
                channels[peer.rank] = self.pool.acquire(peer)
            return self.receiver.receive(plan, kv, channels, timeout_s)
        finally:
            for peer in peers:
                if peer.rank in channels:
                    self.pool.release(peer, channels[peer.rank])

    def close(self) -> None:
        self.pool.close_all()
