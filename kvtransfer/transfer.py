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

Cancelling (`KVSender.abort`, e.g. the client went away mid-prefill) sends the layers not yet
sent as same-size *cancel* messages; the receiver drains them, acks "cancelled" (the negated
fingerprint) and raises TransferCancelled. The protocol thus always runs to its end, and the
channel stays usable for the other transfers on it.

Lifetimes (LESSONS #3): the sender's blocks stay untouched until `wait_done` (or `abort`)
returns: large layers are sent straight from the cache (wire.py, split format), so the blocks
are read until the sends complete. The receiver writes `kv` only inside `receive`, and only
blocks in `dst_block_ids` (split parts are received into them in place); if `receive`
raises, its channels were closed first (no pending op writes any more), those blocks hold
garbage and the caller frees them. Every wait has a deadline (LESSONS #1);
any failure breaks the channel (see channel.py), and the ChannelPool replaces it.

The sender posts its ack recvs in `begin` on tagged (gloo) channels, so that the receiver's ack
send completes at once (a gloo send waits for the matching recv); on order-only (NCCL) channels
it posts them after the sends, because there a posted recv holds the pair's stream and sends
queued behind it would never run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from pdserve.kvtransfer.channel import Channel, Pending, TransferError
from pdserve.kvtransfer.plan import TransferPlan
from pdserve.kvtransfer.routes import OrderedGuard, Route, check_kv, close_routes, plan_routes
from pdserve.kvtransfer.staging import StagingPool
from pdserve.kvtransfer.wire import HEADER_BYTES, BlockIndex, LayerWire, ack_tag, layer_tag


class TransferCancelled(TransferError):
    """A sender rank cancelled the transfer; the receiver frees the blocks it reserved."""


def _nack(plan: TransferPlan) -> int:
    # The ack value meaning "cancelled"; fingerprints are >= 0, so this never equals one.
    return -1 - plan.fingerprint


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
class _Outgoing:
    plan: TransferPlan
    routes: list[Route]
    block_ids: BlockIndex | None = None
    sent: set[int] = field(default_factory=set)
    pending: list[Pending] = field(default_factory=list)
    bufs: list[torch.Tensor] = field(default_factory=list)  # staging, back to the pool when sent
    acks: dict[int, tuple[torch.Tensor, Pending]] = field(default_factory=dict)  # by route
    nbytes: int = 0
    pack_s: float = 0.0

    def post_acks(self, ordered_too: bool) -> None:
        """Post the ack recvs not posted yet (those of order-only channels if `ordered_too`).

        Tagged channels get theirs at `begin`: a gloo send completes only once the matching
        recv is posted, so an early recv lets the receiver finish the moment it has acked,
        whenever the sender gets round to `wait_done`. Order-only (NCCL) channels get theirs
        after the sends, as a recv posted first would hold the pair's stream (module doc).
        """
        for i, route in enumerate(self.routes):
            if i in self.acks or (route.channel.ordered_only and not ordered_too):
                continue
            ack = torch.zeros(1, dtype=torch.int64, device=route.channel.device)
            self.acks[i] = (ack, route.channel.recv(ack, ack_tag(self.plan)))


class KVSender:
    """The sending side for one TP rank. Thread-safe across transfers; one transfer's calls
    (`begin`, `send_layers`..., `wait_done` or `abort`) come from one thread at a time. Keep
    one per rank: its staging buffers are reused across transfers (staging.py)."""

    def __init__(self, rank: int, staging: StagingPool | None = None) -> None:
        self.rank = rank
        self.staging = staging or StagingPool()
        self._out: dict[str, _Outgoing] = {}
        self._lock = threading.Lock()
        self._guard = OrderedGuard()

    def begin(self, plan: TransferPlan, channels: Mapping[int, Channel]) -> None:
        """Register a transfer; `channels` maps receiver TP ranks to channels."""
        routes = plan_routes(plan, self.rank, channels, sending=True)
        with self._lock:
            if plan.request_id in self._out:
                raise ValueError(f"transfer of {plan.request_id!r} already in progress")
            self._guard.claim(routes, plan.request_id)
            out = self._out[plan.request_id] = _Outgoing(plan, routes)
        try:
            out.post_acks(ordered_too=False)
        except BaseException:
            self._pop(plan.request_id)
            self._guard.release(routes)
            raise

    def send_layers(self, plan: TransferPlan, kv: torch.Tensor, layers: Iterable[int]) -> None:
        """Gather and post `layers` of the plan (async); each layer exactly once."""
        with self._lock:
            out = self._out.get(plan.request_id)
        if out is None:
            raise ValueError(f"no transfer of {plan.request_id!r}: call begin() first")
        if out.block_ids is None:
            check_kv(kv, plan.src_layout, self.rank, plan.src_block_ids)
            out.block_ids = BlockIndex.of(plan.src_block_ids, kv.device)
        for layer in layers:
            if layer not in plan.layers or layer in out.sent:
                raise ValueError(f"layer {layer} is outside {plan.layers} or was already sent")
            out.sent.add(layer)
            for route in out.routes:
                t0 = time.perf_counter()
                if route.wire.split:
                    parts = self._split_parts(out, route, kv[layer], layer)
                else:
                    buf = self.staging.take(route.wire.nbytes, kv.device)
                    out.bufs.append(buf)
                    route.wire.pack(kv[layer], out.block_ids, route.heads, buf, plan.fingerprint,
                                    layer)
                    parts = [buf]
                out.pack_s += time.perf_counter() - t0
                for part in parts:
                    out.pending.append(route.channel.send(part, layer_tag(plan, layer)))
                    out.nbytes += part.numel()

    def _split_parts(self, out: _Outgoing, route: Route, kv_layer: torch.Tensor,
                     layer: int) -> list[torch.Tensor]:
        """The messages of one layer in the split format (wire.py): the header, then K and V
        of each receiver run, straight from the cache where the source blocks are consecutive
        and the leg carries all local heads, else gathered into staging buffers. Cache views
        are read until `wait_done`, which is why the caller keeps the blocks until then."""
        wire, heads = route.wire, route.heads
        header = self.staging.take(HEADER_BYTES, kv_layer.device)
        out.bufs.append(header)
        LayerWire.write_header(header, out.plan.fingerprint, layer)
        parts = [header]
        whole = heads.start == 0 and heads.stop == kv_layer.shape[3] and kv_layer.is_contiguous()
        at = 0
        for n in wire.split:
            first = out.block_ids.span(at, n) if whole else None
            for part in (0, 1):
                if first is not None:
                    parts.append(kv_layer[part, first : first + n].reshape(-1).view(torch.uint8))
                    continue
                buf = self.staging.take(wire.chunk_bytes(n), kv_layer.device)
                out.bufs.append(buf)
                dst = buf.view(wire.dtype).view(wire.chunk_shape(n))
                torch.index_select(kv_layer[part][:, :, heads, :], 0,
                                   out.block_ids.ids[at : at + n], out=dst)
                parts.append(buf)
            at += n
        return parts

    def wait_done(self, request_id: str, timeout_s: float) -> TransferStats:
        """Block until every receiver acknowledged the whole transfer, at most `timeout_s`.

        Afterwards (returned or raised) the transfer is forgotten. Raises TransferTimeout or
        ChannelClosed (the blocks may then be freed: the receiver will not ack), ValueError if
        layers of the plan were never sent, TransferError if the ack is not this transfer's.
        """
        out = self._pop(request_id)
        try:
            missing = set(out.plan.layers) - out.sent
            if missing and out.routes:
                raise ValueError(f"{request_id!r}: layers {sorted(missing)} were never sent")
            deadline = time.monotonic() + timeout_s
            t0 = time.perf_counter()
            for pending in out.pending:
                pending.wait(deadline - time.monotonic())
            self._recycle(out)
            t1 = time.perf_counter()
            if not all(self._wait_acks(out, deadline)):
                raise TransferCancelled(f"{request_id!r} was cancelled by another sender rank")
            t2 = time.perf_counter()
            return TransferStats(out.nbytes, t2 - t1, t1 - t0, out.pack_s)
        except TransferCancelled:
            raise  # the protocol ran to its end: the channels are in step
        except BaseException:
            close_routes(out.routes)
            raise
        finally:
            self._guard.release(out.routes)

    def abort(self, request_id: str, timeout_s: float) -> None:
        """Cancel a transfer: the receiver's `receive` raises TransferCancelled.

        Sends the layers not yet sent as cancel messages and consumes the receivers' acks (at
        most `timeout_s`), so the channels stay in step for other transfers. On failure the
        channels are closed. No-op for an unknown request id.
        """
        with self._lock:
            if request_id not in self._out:
                return
        out = self._pop(request_id)
        try:
            deadline = time.monotonic() + timeout_s
            unsent = [layer for layer in out.plan.layers if layer not in out.sent]
            for layer in unsent:
                for route in out.routes:
                    for i, size in enumerate(route.wire.part_sizes()):
                        buf = self.staging.take(size, route.channel.device)
                        out.bufs.append(buf)
                        if i == 0:
                            LayerWire.write_cancel(buf, out.plan.fingerprint)
                        out.pending.append(route.channel.send(buf, layer_tag(out.plan, layer)))
            for pending in out.pending:
                pending.wait(deadline - time.monotonic())
            self._recycle(out)
            self._wait_acks(out, deadline)
        except BaseException:
            close_routes(out.routes)
            raise
        finally:
            self._guard.release(out.routes)

    def _recycle(self, out: _Outgoing) -> None:
        # every send completed: nothing reads the staging buffers any more
        for buf in out.bufs:
            self.staging.give(buf)
        out.bufs.clear()

    @property
    def in_flight(self) -> list[str]:
        with self._lock:
            return list(self._out)

    def _pop(self, request_id: str) -> _Outgoing:
        with self._lock:
            out = self._out.pop(request_id, None)
        if out is None:
            raise ValueError(f"no transfer of {request_id!r} in progress")
        return out

    @staticmethod
    def _wait_acks(out: _Outgoing, deadline: float) -> list[bool]:
        """Receive one ack per route: True for "complete", False for "cancelled"."""
        out.post_acks(ordered_too=True)
        results = []
        for ack, pending in out.acks.values():
            pending.wait(deadline - time.monotonic())
            value = int(ack.item())
            if value not in (out.plan.fingerprint, _nack(out.plan)):
                raise TransferError(f"{out.plan.request_id!r}: the ack names another transfer")
            results.append(value == out.plan.fingerprint)
        return results


class KVReceiver:
    """The receiving side for one TP rank; `receive` may run in several threads at once. Keep
    one per rank: its staging buffers are reused across transfers (staging.py)."""

    def __init__(self, rank: int, staging: StagingPool | None = None) -> None:
        self.rank = rank
        self.staging = staging or StagingPool()
        self._guard = OrderedGuard()

    def receive(
        self,
        plan: TransferPlan,
        kv: torch.Tensor,
        channels: Mapping[int, Channel],
        timeout_s: float,
    ) -> TransferStats:
        """Receive all layers of `plan` into `kv`, then ack; at most `timeout_s` in all.

        `channels` maps sender TP ranks to channels. Raises TransferTimeout or ChannelClosed
        (the channels are then closed), TransferCancelled (the sender gave up; the channels
        stay usable) or TransferError (mixed-up messages; channels closed). On any error the
        caller frees the plan's dst blocks.
        """
        deadline = time.monotonic() + timeout_s
        check_kv(kv, plan.dst_layout, self.rank, plan.dst_block_ids)
        routes = plan_routes(plan, self.rank, channels, sending=False)
        self._guard.claim(routes, plan.request_id)
        try:
            return self._receive(plan, kv, routes, deadline)
        except TransferCancelled:
            raise
        except BaseException:
            close_routes(routes)
            raise
        finally:
            self._guard.release(routes)

    def _receive(
        self, plan: TransferPlan, kv: torch.Tensor, routes: list[Route], deadline: float
    ) -> TransferStats:
        block_ids = BlockIndex.of(plan.dst_block_ids, kv.device)
        posted = []  # (layer, route, parts, pendings), in the order the sender sends
        for layer in plan.layers:
            for route in routes:
                parts = self._recv_parts(route, kv[layer], block_ids)
                tag = layer_tag(plan, layer)
                pendings = [route.channel.recv(t, tag) for t, *_ in parts]
                posted.append((layer, route, parts, pendings))
        t_post = time.perf_counter()
        wait_s = blocked_s = scatter_s = 0.0
        nbytes = 0
        cancelled = False
        for i, (layer, route, parts, pendings) in enumerate(posted):
            t0 = time.perf_counter()
            for pending in pendings:
                pending.wait(deadline - time.monotonic())
            t1 = time.perf_counter()
            if i == 0:
                wait_s = t1 - t_post
            else:
                blocked_s += t1 - t0
            # After a cancel message keep draining (the sender sends every layer either way),
            # so that no posted recv is left behind, but write nothing more into the cache.
            if cancelled or not LayerWire.check_header(parts[0][0], plan.fingerprint, layer):
                cancelled = True
            else:
                self._land(route, parts, kv[layer], block_ids)
                scatter_s += time.perf_counter() - t1
                nbytes += sum(t.numel() for t, *_ in parts)
            for t, staged, *_ in parts:
                if staged:
                    self.staging.give(t)  # its recv completed and it was copied out
        # Every route gets an ack, also when cancelled: each sender rank waits for one, and an
        # ack left unsent would leave that channel out of step.
        t0 = time.perf_counter()
        value = _nack(plan) if cancelled else plan.fingerprint
        acks = []
        for route in routes:
            ack = torch.full((1,), value, dtype=torch.int64, device=kv.device)
            acks.append(route.channel.send(ack, ack_tag(plan)))
        for pending in acks:
            pending.wait(deadline - time.monotonic())
        blocked_s += time.perf_counter() - t0
        if cancelled:
            raise TransferCancelled(f"the sender cancelled the transfer of {plan.request_id!r}")
        return TransferStats(nbytes, wait_s, blocked_s, scatter_s)

    def _recv_parts(self, route: Route, kv_layer: torch.Tensor, block_ids: BlockIndex
                    ) -> list[tuple[torch.Tensor, bool, int, int, int]]:
        """The buffers one layer's messages land in: ``(tensor, staged, part, first block,
        blocks)``. Packed: one staging buffer (part -1). Split: the header, then K and V of
        each run, straight into the cache when the leg carries all local heads."""
        wire = route.wire
        if not wire.split:
            return [(self.staging.take(wire.nbytes, kv_layer.device), True, -1, 0, 0)]
        heads = route.heads
        whole = heads.start == 0 and heads.stop == kv_layer.shape[3] and kv_layer.is_contiguous()
        parts = [(self.staging.take(HEADER_BYTES, kv_layer.device), True, -1, 0, 0)]
        runs = block_ids.runs
        if tuple(n for _, _, n in runs) != wire.split:
            raise TransferError("the receiver's block runs disagree with the message layout")
        for _, first, n in runs:
            for part in (0, 1):
                if whole:
                    view = kv_layer[part, first : first + n].reshape(-1).view(torch.uint8)
                    parts.append((view, False, part, first, n))
                else:
                    buf = self.staging.take(wire.chunk_bytes(n), kv_layer.device)
                    parts.append((buf, True, part, first, n))
        return parts

    @staticmethod
    def _land(route: Route, parts: list, kv_layer: torch.Tensor, block_ids: BlockIndex) -> None:
        """Copy one received layer from its staging buffers into the cache (header checked)."""
        wire = route.wire
        if not wire.split:
            wire.unpack(parts[0][0], kv_layer, block_ids, route.heads)
            return
        for t, staged, part, first, n in parts[1:]:
            if staged:
                src = t.view(wire.dtype).view(wire.chunk_shape(n))
                kv_layer[part, first : first + n, :, route.heads, :].copy_(src)
