"""`KVSender` and `KVReceiver`: one request's KV blocks, layer by layer, over channels.

Protocol for one transfer, per (sender rank s, receiver rank r) pair that `head_slices` pairs:

    sender rank s                                      receiver rank r
    begin(plan, channels)                              receive(plan, kv, channels, timeout):
    send_layers(plan, kv, [l]) after layer l is          posts one recv per layer up front,
      computed: gather into a staging buffer,            waits for them in layer order, checks
      post send(tag = layer)  ---- layer l ---->         each header, scatters into kv
    ...                                                  then sends the ack (the fingerprint)
    wait_done(request_id, timeout): waits for the
      sends, posts and waits for the ack  <--- ack ---
    -> the caller may now free/reuse its blocks        -> the caller may now schedule the request

Lifetimes (LESSONS #3): the sender's blocks stay untouched until `wait_done` returns; today the
gather copies synchronously, but a zero-copy path may read the blocks later. The receiver
writes `kv` only inside `receive`, and only blocks in `dst_block_ids`; if `receive` raises,
those blocks hold garbage and the caller frees them. Every wait has a deadline (LESSONS #1);
any failure breaks the channel (see channel.py), and the ChannelPool replaces it.

The ack recv is posted after the sends, not before: on NCCL a posted recv holds the pair's
stream, and sends queued behind it would never run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from pdserve.kvtransfer.channel import Channel, Pending, TransferError, TransferTimeout
from pdserve.kvtransfer.plan import KVLayout, TransferPlan, head_slices
from pdserve.kvtransfer.wire import LayerWire, ack_tag, layer_tag


@dataclass(frozen=True, slots=True)
class TransferStats:
    """Where a transfer's time went, measured on the side that reports it (LESSONS #9).

    Receiver: `wait_s` from posting the recvs until the first layer arrived (the sender had not
    started: queueing + prefill of the first layer); `transfer_s` the rest of the time blocked
    on messages, until the ack was delivered; `scatter_s` copying into the cache (+ dequant).
    Sender: `scatter_s` is the time gathering (+ quant) into staging buffers inside
    `send_layers`; `transfer_s` the time `wait_done` blocked on the layer sends; `wait_s` the
    time it then blocked on the ack. `bytes` counts message bytes, headers included.
    """

    bytes: int
    wait_s: float
    transfer_s: float
    scatter_s: float


@dataclass(slots=True)
class _Route:
    """One (sender rank, receiver rank) leg of a transfer."""

    peer_rank: int  # the other side's TP rank
    channel: Channel
    heads: slice  # this side's local heads on the leg
    wire: LayerWire


def _routes(
    plan: TransferPlan, rank: int, channels: Mapping[int, Channel], sending: bool
) -> list[_Route]:
    """The legs this rank takes part in; `channels` maps the peer's TP rank to a channel."""
    src, dst = plan.src_layout, plan.dst_layout
    routes = []
    peers = range(dst.tp_size if sending else src.tp_size)
    for peer in peers:
        pair = head_slices(src, rank, dst, peer) if sending else head_slices(src, peer, dst, rank)
        if pair is None:
            continue
        if peer not in channels:
            side = "receiver" if sending else "sender"
            raise ValueError(f"transfer {plan.request_id!r} needs a channel to {side} rank {peer}")
        heads = pair[0] if sending else pair[1]
        wire = LayerWire.for_plan(plan, heads.stop - heads.start)
        routes.append(_Route(peer, channels[peer], heads, wire))
    return routes


def _check_kv(kv: torch.Tensor, layout: KVLayout, rank: int, block_ids: tuple[int, ...]) -> None:
    expect = layout.kv_shape(rank, kv.shape[2] if kv.dim() == 6 else 0)
    if tuple(kv.shape) != expect or kv.dtype != layout.dtype:
        raise ValueError(f"kv is {tuple(kv.shape)} {kv.dtype}, the layout says {expect} "
                         f"{layout.dtype} for TP rank {rank}")
    if max(block_ids) >= kv.shape[2] or min(block_ids) < 0:
        raise ValueError(f"block ids must lie in [0, {kv.shape[2]})")


class _OrderedGuard:
    """Keeps order-only channels (NCCL) to one transfer at a time, per side."""

    def __init__(self) -> None:
        self._busy: set[int] = set()
        self._lock = threading.Lock()

    def claim(self, routes: list[_Route], request_id: str) -> None:
        with self._lock:
            ordered = [id(r.channel) for r in routes if r.channel.ordered_only]
            if any(c in self._busy for c in ordered):
                raise TransferError(f"{request_id!r}: an order-only channel is already busy")
            self._busy.update(ordered)

    def release(self, routes: list[_Route]) -> None:
        with self._lock:
            self._busy.difference_update(id(r.channel) for r in routes)


@dataclass(slots=True)
class _Outgoing:
    plan: TransferPlan
    routes: list[_Route]
    block_ids: torch.Tensor | None = None
    sent: set[int] = field(default_factory=set)
    pending: list[Pending] = field(default_factory=list)
    nbytes: int = 0
    pack_s: float = 0.0


class KVSender:
    """The sending side for one TP rank. Thread-safe across transfers; one transfer's calls
    (`begin`, `send_layers`..., `wait_done`) come from one thread at a time."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._out: dict[str, _Outgoing] = {}
        self._lock = threading.Lock()
        self._guard = _OrderedGuard()

    def begin(self, plan: TransferPlan, channels: Mapping[int, Channel]) -> None:
        """Register a transfer; `channels` maps receiver TP ranks to channels."""
        routes = _routes(plan, self.rank, channels, sending=True)
        with self._lock:
            if plan.request_id in self._out:
                raise ValueError(f"transfer of {plan.request_id!r} already in progress")
            self._guard.claim(routes, plan.request_id)
            self._out[plan.request_id] = _Outgoing(plan, routes)

    def send_layers(self, plan: TransferPlan, kv: torch.Tensor, layers: Iterable[int]) -> None:
        """Gather and post `layers` of the plan (async); each layer exactly once."""
        with self._lock:
            out = self._out.get(plan.request_id)
        if out is None:
            raise ValueError(f"no transfer of {plan.request_id!r}: call begin() first")
        if out.block_ids is None:
            _check_kv(kv, plan.src_layout, self.rank, plan.src_block_ids)
            out.block_ids = torch.tensor(plan.src_block_ids, dtype=torch.long, device=kv.device)
        for layer in layers:
            if layer not in plan.layers or layer in out.sent:
                raise ValueError(f"layer {layer} is outside {plan.layers} or was already sent")
            out.sent.add(layer)
            for route in out.routes:
                t0 = time.perf_counter()
                buf = route.wire.empty(kv.device)
                route.wire.pack(kv[layer], out.block_ids, route.heads, buf, plan.fingerprint,
                                layer)
                out.pack_s += time.perf_counter() - t0
                out.pending.append(route.channel.send(buf, layer_tag(plan, layer)))
                out.nbytes += buf.numel()

    def wait_done(self, request_id: str, timeout_s: float) -> TransferStats:
        """Block until every receiver acknowledged the whole transfer, at most `timeout_s`.

        Afterwards (returned or raised) the transfer is forgotten. Raises TransferTimeout or
        ChannelClosed (the blocks may then be freed: the receiver will not ack), ValueError if
        layers of the plan were never sent, TransferError if the ack is not this transfer's.
        """
        with self._lock:
            out = self._out.pop(request_id, None)
        if out is None:
            raise ValueError(f"no transfer of {request_id!r} in progress")
        try:
            missing = set(out.plan.layers) - out.sent
            if missing and out.routes:
                raise ValueError(f"{request_id!r}: layers {sorted(missing)} were never sent")
            deadline = time.monotonic() + timeout_s
            t0 = time.perf_counter()
            for pending in out.pending:
                pending.wait(deadline - time.monotonic())
            t1 = time.perf_counter()
            acks = []
            for route in out.routes:
                ack = torch.zeros(1, dtype=torch.int64, device=route.channel.device)
                acks.append((ack, route.channel.recv(ack, ack_tag(out.plan))))
            for ack, pending in acks:
                pending.wait(deadline - time.monotonic())
                if int(ack.item()) != out.plan.fingerprint:
                    raise TransferError(f"{request_id!r}: ack does not name this transfer")
            t2 = time.perf_counter()
            return TransferStats(out.nbytes, t2 - t1, t1 - t0, out.pack_s)
        finally:
            self._guard.release(out.routes)

    def abort(self, request_id: str) -> None:
        """Forget a transfer (e.g. the request was cancelled); its receiver will time out."""
        with self._lock:
            out = self._out.pop(request_id, None)
        if out is not None:
            self._guard.release(out.routes)

    @property
    def in_flight(self) -> list[str]:
        with self._lock:
            return list(self._out)


class KVReceiver:
    """The receiving side for one TP rank; `receive` may run in several threads at once."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._guard = _OrderedGuard()

    def receive(
        self,
        plan: TransferPlan,
        kv: torch.Tensor,
        channels: Mapping[int, Channel],
        timeout_s: float,
    ) -> TransferStats:
        """Receive all layers of `plan` into `kv`, then ack; at most `timeout_s` in all.

        `channels` maps sender TP ranks to channels. Raises TransferTimeout, ChannelClosed or
        TransferError (mixed-up messages); the caller then frees the plan's dst blocks.
        """
        deadline = time.monotonic() + timeout_s
        _check_kv(kv, plan.dst_layout, self.rank, plan.dst_block_ids)
        routes = _routes(plan, self.rank, channels, sending=False)
        self._guard.claim(routes, plan.request_id)
        try:
            return self._receive(plan, kv, routes, deadline)
        finally:
            self._guard.release(routes)

    def _receive(
        self, plan: TransferPlan, kv: torch.Tensor, routes: list[_Route], deadline: float
    ) -> TransferStats:
        block_ids = torch.tensor(plan.dst_block_ids, dtype=torch.long, device=kv.device)
        posted = []  # (layer, route, buffer, pending), in the order the sender sends
        for layer in plan.layers:
            for route in routes:
                buf = route.wire.empty(kv.device)
                posted.append((layer, route, buf, route.channel.recv(buf, layer_tag(plan, layer))))
        t_post = time.perf_counter()
        wait_s = blocked_s = scatter_s = 0.0
        nbytes = 0
        for i, (layer, route, buf, pending) in enumerate(posted):
            t0 = time.perf_counter()
            _wait_before(pending, deadline, plan)
            t1 = time.perf_counter()
            if i == 0:
                wait_s = t1 - t_post
            else:
                blocked_s += t1 - t0
            route.wire.unpack(buf, kv[layer], block_ids, route.heads, plan.fingerprint, layer)
            scatter_s += time.perf_counter() - t1
            nbytes += buf.numel()
        t0 = time.perf_counter()
        acks = []
        for route in routes:
            ack = torch.full((1,), plan.fingerprint, dtype=torch.int64, device=kv.device)
            acks.append(route.channel.send(ack, ack_tag(plan)))
        for pending in acks:
            _wait_before(pending, deadline, plan)
        blocked_s += time.perf_counter() - t0
        return TransferStats(nbytes, wait_s, blocked_s, scatter_s)


def _wait_before(pending: Pending, deadline: float, plan: TransferPlan) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        # Our own deadline, with no wait to expire: break the channel ourselves so the peer
        # learns at once and no posted recv can later land in a buffer we no longer watch.
        pending_channel_close(pending)
        raise TransferTimeout(f"transfer of {plan.request_id!r} missed its deadline")
    pending.wait(left)
