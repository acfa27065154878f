"""One pool instance as a service: an engine plus its KV-transfer endpoints. Imports no Ray.

The Serve deployment (``deployment.py``) is a thin adapter over this class; tests can drive
two instances directly. Roles:

prefill   ``prefill(job, desc)``: open (or reuse) the channel to the decode instance named in
          ``desc``, tell it to ``expect`` the transfer, run the prompt, push each layer's
          blocks from the engine's ``on_layer`` hook while the next layer computes, wait for
          the receiver's ack, release the blocks, return the first token.
decode    ``reserve(job)`` → blocks for the prompt's KV; ``expect`` starts the receive;
          ``generate(request_id, first_token)`` waits for the KV, then streams tokens.
colocated ``generate_full(job)`` streams a whole request.

Block lifetimes (LESSONS #1, #3, #4): the sender frees only after the receiver's ack (or
after a failed/cancelled transfer has run its protocol to the end); the receiver schedules a
request only after every layer arrived; a reservation nobody claims within its deadline is
freed; an abort reaches the blocks wherever they are, but never frees blocks a receive may
still be writing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.kvtransfer import (
    Channel,
    ChannelClosed,
    ChannelListener,
    ChannelPool,
    KVLayout,
    KVReceiver,
    KVSender,
    PeerId,
    TransferError,
    TransferPlan,
    connect,
)

from pdserve.kvtransfer.endpoint import PushSpec, merge_stats, senders

from .async_engine import AsyncEngine
from .config import EngineConfig
from .engine import Engine
from .messages import (
    ChannelOffer,
    InstanceInfo,
    InstanceStats,
    Job,
    PrefillResult,
    ReceiveDescriptor,
    TokenChunk,
)
from .migration import MigrationError, Migrations
from .request import Request
from .scheduler import ScheduledBatch

log = logging.getLogger(__name__)


class Peers(Protocol):
    """How a prefill instance reaches decode instances (targeted control-plane calls)."""

    def open_channel(self, peer: PeerId, src: PeerId) -> ChannelOffer: ...

    def expect(self, desc: ReceiveDescriptor, src: PeerId, layout: KVLayout) -> None: ...


class NoCapacity(RuntimeError):
    """This instance cannot take the request now (no free KV blocks): try another."""


class TransferFailed(RuntimeError):
    """The KV of a request did not arrive; blocks were freed on this side."""


@dataclass(eq=False)
class _Incoming:
    """A decode-side reservation: blocks waiting for a request's KV."""

    job: Job
    block_ids: list[int]
    transfer_id: int
    created: float
    num_cached: int = 0  # leading blocks already held here (shared): not transferred
    arrived: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    receiving: bool = False  # a receive thread may be writing the blocks
    claimed: bool = False  # generate() took the blocks over
    aborted: bool = False


@dataclass(eq=False)
class _Outgoing:
    """A prefill-side transfer: where the request's KV goes."""

    desc: ReceiveDescriptor
    spec: PushSpec
    key: int  # names the push on the other TP ranks (their step messages carry it)
    channels: dict[int, Channel]  # rank 0's, by receiver rank (leased)
    plan: TransferPlan | None = None
    stalled: bool = False  # fault injection: layers are never sent
    error: BaseException | None = None  # a send failed inside the layer hook


def _chunk(o, migrated_to: str | None = None) -> TokenChunk:
    return TokenChunk(o.request_id, o.new_token_ids, o.new_logprobs, o.finished, o.finish_reason,
                      o.num_prompt_tokens, o.num_output_tokens, migrated_to)


class Instance:
    def __init__(
        self,
        config: EngineConfig,
        instance_id: str,
        host: str = "127.0.0.1",
        transfer_timeout_s: float = 30.0,
        compress: str | None = None,
        peers: Peers | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.engine = engine or Engine(config)
        self.role = config.scheduler.role
        m = config.model
        self.layout = KVLayout(
            num_layers=m.num_layers, block_size=config.cache.block_size,
            num_kv_heads_total=m.num_kv_heads, head_dim=m.head_dim,
            tp_size=getattr(getattr(self.engine, "parallel", None), "tp", 1),
            dtype_str=m.dtype,
        )
        self.info = InstanceInfo(instance_id, self.role, time.time_ns(), host, self.layout)
        self.timeout = transfer_timeout_s
        self.compress = compress
        # How this instance reaches decode instances (the deployment supplies targeted Serve
        # calls; tests can wire two instances directly)
        self.peers = peers
        self.aengine = AsyncEngine(self.engine)
        self.sender = KVSender(rank=0)
        self.receiver = KVReceiver(rank=0)
        self.pool = ChannelPool(self._make_channel)
        self._rendezvous: dict[PeerId, Callable[[], Channel]] = {}
        self._rv_lock = threading.Lock()
        self._outgoing: dict[str, _Outgoing] = {}
        self._incoming: dict[str, _Incoming] = {}
        self._transfer_ids = itertools.count(1)
        self.transfer_log: list[dict] = []  # recent transfer stats (bytes, wait/transfer/scatter)
        # peer instance id -> "host:port" of the pair channel's rendezvous (the decode side's
        # listener, wherever it runs): logged with each transfer, so a multi-node deployment
        # can see which link the KV crossed
        self.channel_addrs: dict[str, str] = {}
        self.engine.on_layer = self._on_layer
        # The other TP ranks' transfer endpoints (a TP engine's): rank 0 coordinates them over
        # the control plane, and the step message names the pushes they start (tp_kv.py).
        self.ranks = getattr(self.engine, "kv_ranks", None)
        self._push_keys = itertools.count(1)
        if self.ranks is not None:
            self.ranks.init(instance_id, self.info.epoch, host, transfer_timeout_s)
            self.engine.runner.push_orders = self._push_orders
        # Fault injection for tests: name -> how many more times to fail that way.
        #   stall_transfer: register the next transfer but never send its layers
        self.faults: dict[str, int] = {}
        self.draining = False
        self.migrations = Migrations(self)  # live migration, decode role (migration.py)

    # ---- channels --------------------------------------------------------------------------
    def _make_channel(self, peer: PeerId) -> Channel:
        with self._rv_lock:
            make = self._rendezvous.pop(peer, None)
        if make is not None:  # receiver side: a listener opened by open_channel
            return make()
        if self.peers is None:
            raise ChannelClosed(f"no rendezvous pending for {peer}")
        # sender side: ask the receiver to open a listener, then connect to it
        offer = self.peers.open_channel(peer, self._me())
        self.channel_addrs[peer.instance_id] = f"{offer.address.host}:{offer.address.port}"
        return connect(offer.address, peer.instance_id, offer.timeout_s)

    def _me(self) -> PeerId:
        return PeerId(self.info.instance_id, self.info.epoch, 0)

    # ---- prefill role ------------------------------------------------------------------------
    async def prefill(self, job: Job, desc: ReceiveDescriptor) -> PrefillResult:
        t0 = time.monotonic()
        d = desc.decode
        spec = PushSpec(job.request_id, d.instance_id, d.epoch,
                        tuple(desc.block_ids[desc.num_cached:]), self.layout, d.layout,
                        self.compress, desc.transfer_id)
        key = next(self._push_keys)
        # Channels from each of our TP ranks to the decode ranks it sends heads to (made on
        # first use: the decode rank opens a listener, ours connects), then tell the decode
        # instance to expect this request's KV on them.
        channels = await asyncio.to_thread(self._open_channels, key, spec)
        try:
            await asyncio.to_thread(self.peers.expect, desc, self._me(), self.layout)
        except BaseException:
            self._release_channels(spec, channels)
            if self.ranks is not None:
                await asyncio.to_thread(lambda: self.ranks.cancel(key, spec, False).result())
            raise
        t_channel = time.monotonic()
        self._outgoing[job.request_id] = _Outgoing(desc, spec, key, channels)
        first = None
        try:
            async for o in self.aengine.generate(job.prompt_ids, job.params, job.request_id,
                                                 job.chunks):
                first = o
            t_compute = time.monotonic()
            out = self._outgoing.get(job.request_id)
            if out is not None and out.error is not None:
                raise TransferFailed(f"{job.request_id}: sending the KV failed: {out.error}")
            if out is None or out.plan is None:
                raise TransferFailed(f"{job.request_id}: prefill ended before its KV was sent")
            if out.stalled:  # fault injection: a sender that hangs; the receiver times out
                await asyncio.sleep(self.timeout)
                raise TransferFailed(f"{job.request_id}: transfer stalled (injected fault)")
            stats = await asyncio.to_thread(self._wait_pushes, job.request_id, out)
        except BaseException as e:
            # Stop the request first (waits for a running step, so the layer hook is idle),
            # then finish the transfer protocol so the receiver frees its blocks.
            broken = isinstance(e, (TransferFailed, TransferError))
            await asyncio.to_thread(self.aengine.abort, job.request_id)
            await asyncio.to_thread(self._cancel_outgoing, job.request_id)
            raise
        else:
            broken = False
        finally:
            self._outgoing.pop(job.request_id, None)
            self.aengine.call(lambda e: e.release(job.request_id))
            self._release_channels(spec, channels, broken)
        t_done = time.monotonic()
        self._log_transfer(job.request_id, stats, "send", self.channel_addrs.get(d.instance_id))
        reason = None if first.finish_reason == "prefilled" else first.finish_reason
        return PrefillResult(
            job.request_id, first.new_token_ids[0], first.new_logprobs[0] if first.new_logprobs else None,
            reason, self.info, stats.bytes,
            {"channel_s": t_channel - t0, "prefill_s": t_compute - t_channel,
             "transfer_wait_s": t_done - t_compute},
        )

    def _on_layer(self, layer: int, batch: ScheduledBatch) -> None:
        """Engine thread, during the forward: push layer ``layer`` (rank 0's heads) of every
        request whose prompt completes in this step and has a destination."""
        for req, s in zip(batch.requests, batch.samples()):
            out = self._outgoing.get(req.request_id)
            if out is None or not s:
                continue
            if out.plan is None and out.error is None:
                self._start_push(req, out)
            if not out.stalled and out.error is None and out.plan is not None:
                try:
                    self.sender.send_layers(out.plan, self.engine.runner.kv, [layer])
                except Exception as e:  # noqa: BLE001 - reported by prefill()
                    out.error = e

    def _start_push(self, req: Request, out: _Outgoing) -> None:
        k, nblk = out.desc.num_cached, len(out.desc.block_ids)
        out.plan = out.spec.plan(req.block_ids[k:nblk])
        if self.faults.get("stall_transfer", 0) > 0:
            self.faults["stall_transfer"] -= 1
            out.stalled = True
            return
        try:
            self.sender.begin(out.plan, out.channels)
        except Exception as e:  # noqa: BLE001 - never let a peer break the engine loop
            out.error, out.plan = e, None

    def _push_orders(self, batch: ScheduledBatch) -> list[tuple[int, list[int]]]:
        """TP engine, engine thread, before a step's message goes to the other ranks: the
        pushes they start in this step, ``(key, source block ids)`` (the blocks are the same
        ids on every rank). A stalled push (fault injection) is left out on every rank."""
        orders = []
        for req, s in zip(batch.requests, batch.samples()):
            out = self._outgoing.get(req.request_id)
            if out is None or not s:
                continue
            if out.plan is None and out.error is None:
                self._start_push(req, out)
            if not out.stalled and out.plan is not None:
                orders.append((out.key, list(out.plan.src_block_ids)))
        return orders

    def _open_channels(self, key: int, spec: PushSpec) -> dict[int, Channel]:
        """Rank 0's channels for ``spec`` (leased, by receiver rank); the other ranks register
        the push and open the channels they lack."""
        channels: dict[int, Channel] = {}
        try:
            for peer in spec.receivers(0):
                channels[peer.rank] = self.pool.acquire(peer)
            if self.ranks is not None:
                self.ranks.prepare(key, spec, self.peers.open_channel)
        except BaseException:
            self._release_channels(spec, channels)
            raise
        return channels

    def _release_channels(self, spec: PushSpec, channels: dict[int, Channel],
                          broken: bool = False) -> None:
        for rank, channel in channels.items():
            peer = PeerId(spec.dst_instance, spec.dst_epoch, rank)
            self.pool.release(peer, channel)
            if broken or channel.closed:
                # A failed transfer leaves a gloo pair unusable (a timeout closes it on both
                # sides); the next request to this peer builds a fresh channel. A cancelled
                # transfer (client gone) keeps the channel: the protocol ran to its end.
                self.pool.invalidate(peer)

    def _wait_pushes(self, request_id: str, out: _Outgoing):
        """Until the receivers of every rank's legs acked; the ranks' figures merged."""
        calls = self.ranks.wait(out.key, out.spec) if self.ranks is not None else None
        parts = []
        try:
            parts.append(self.sender.wait_done(request_id, self.timeout))
        finally:
            if calls is not None:
                parts += calls.result().values()
        return merge_stats(parts)

    def _cancel_outgoing(self, request_id: str) -> None:
        out = self._outgoing.get(request_id)
        if out is None:
            return
        # The other TP ranks cancel their legs meanwhile (or forget a push that stalled).
        calls = None if self.ranks is None else self.ranks.cancel(out.key, out.spec,
                                                                   not out.stalled)
        try:
            self._cancel_rank0(request_id, out)
        finally:
            if calls is not None:
                try:
                    calls.result()
                except TransferError as e:
                    log.warning("cancelling the transfer of %s on TP ranks > 0 failed: %s",
                                request_id, e)

    def _cancel_rank0(self, request_id: str, out: _Outgoing) -> None:
        if out.stalled:
            return  # never registered with the sender; the receiver times out on its own
        if out.plan is None:
            # Nothing sent yet: the receiver is waiting all the same. Register the transfer
            # (source blocks are never read when cancelling) and cancel it, which sends
            # cancel messages so the receiver frees its blocks and the channel stays usable.
            out.plan = out.spec.plan(out.spec.dst_block_ids)
            try:
                self.sender.begin(out.plan, out.channels)
            except Exception as e:  # noqa: BLE001 - the receiver times out instead
                log.warning("cancelling the transfer of %s failed: %s", request_id, e)
                return
        if request_id in self.sender.in_flight:
            try:
                self.sender.abort(request_id, self.timeout)
            except TransferError as e:
                log.warning("cancelling the transfer of %s failed: %s", request_id, e)

    # ---- decode role ---------------------------------------------------------------------------
    def drain(self, dests: list[str] | None = None) -> int:
        """Stop taking requests and move every one elsewhere: live-migrated to ``dests``
        (round robin) where possible, else handed back to the router, which continues it on
        another decode instance by recompute. Returns how many requests left."""
        self.draining = True
        reqs = self.aengine.call(lambda e: [(r.request_id, not r.in_prefill) for r in
                                            e.scheduler.running + list(e.scheduler.waiting)])
        moved = 0
        for k, (rid, decoding) in enumerate(reqs):
            if dests and decoding:  # only a decoding request can move live
                try:
                    self.migrations.migrate(rid, dests[k % len(dests)], "drain")
                    moved += 1
                    continue
                except MigrationError:
                    pass
            self.aengine.end(rid, "migrate")
        log.info("%s draining: %d requests migrated, %d handed back", self.info.instance_id,
                 moved, len(reqs) - moved)
        return len(reqs)

    def undrain(self) -> None:
        self.draining = False

    def reserve(self, job: Job) -> ReceiveDescriptor:
        """Blocks for the prompt's KV. Leading blocks this instance already caches (a
        multi-turn follow-up) are shared, not re-sent: the descriptor says how many."""
        if self.draining:
            raise NoCapacity(f"{self.info.instance_id} is draining")
        bs = self.layout.block_size
        n = -(-len(job.prompt_ids) // bs)

        def take(e: Engine) -> tuple[list[int], int]:
            if len(job.prompt_ids) + 1 > e.max_model_len:
                raise ValueError(f"prompt has {len(job.prompt_ids)} tokens; the limit is "
                                 f"{e.max_model_len - 1}")
            probe = Request(job.request_id, list(job.prompt_ids), job.params)
            cached = e.blocks.match_prefix(probe) // bs
            # keep room for the running batch to grow by one block each
            if not e.blocks.can_allocate(n - cached + len(e.scheduler.running)):
                if cached:
                    e.blocks.unmatch(probe)
                raise NoCapacity(f"{self.info.instance_id}: {e.blocks.num_free} free KV blocks, "
                                 f"request needs {n - cached}")
            return probe.block_ids + e.blocks.allocate_ids(n - cached), cached

        ids, cached = self.aengine.call(take)
        inc = _Incoming(job, ids, next(self._transfer_ids), time.monotonic(), cached)
        self._incoming[job.request_id] = inc
        threading.Timer(self.timeout, self._expire, (job.request_id, inc)).start()
        return ReceiveDescriptor(job.request_id, self.info, ids, inc.transfer_id, self.timeout,
                                 cached)

    def open_channel(self, src: PeerId, rank: int = 0) -> ChannelOffer:
        """A prefill rank wants a (new) channel to our TP rank ``rank``: drop any old one to
        it, open a listener and accept in the background; the sender connects to the returned
        address."""
        if rank:
            if self.ranks is None:
                raise ValueError(f"{self.info.instance_id} has no TP rank {rank}")
            return ChannelOffer(self.ranks.listen(rank, src), self.timeout)
        self.pool.invalidate(src)
        listener = ChannelListener(self.info.host, f"{src.instance_id}->{self.info.instance_id}",
                                   self.info.epoch)
        with self._rv_lock:
            self._rendezvous[src] = lambda: listener.accept(src.instance_id, self.timeout)
        self.channel_addrs[src.instance_id] = f"{listener.address.host}:{listener.address.port}"

        def accept() -> None:
            try:
                self.pool.release(src, self.pool.acquire(src))
            except Exception as e:  # noqa: BLE001 - the sender sees its own failure
                log.warning("channel from %s was not established: %s", src.instance_id, e)

        threading.Thread(target=accept, daemon=True).start()
        return ChannelOffer(listener.address, self.timeout)

    def expect(self, request_id: str, src: PeerId, src_layout: KVLayout) -> None:
        """A prefill rank is about to push ``request_id``'s KV over its channel: receive it."""
        inc = self._incoming.get(request_id)
        if inc is None or inc.aborted:
            raise TransferFailed(f"no reservation for {request_id} (expired or aborted)")
        if inc.receiving or inc.arrived.is_set():
            raise TransferFailed(f"{request_id}: a transfer was already started")
        # The sender's block ids never matter to the receiver: pass ours for both sides.
        mine = inc.block_ids[inc.num_cached:]
        plan = TransferPlan(request_id, mine, mine, 0, self.layout.num_layers,
                            src_layout, self.layout, self.compress, inc.transfer_id)
        inc.receiving = True
        threading.Thread(target=self._receive, args=(inc, src, plan), daemon=True).start()

    def _receive(self, inc: _Incoming, src: PeerId, plan: TransferPlan) -> None:
        try:
            # Every TP rank receives its heads from the sender ranks that hold them; the
            # blocks may be freed or scheduled only once all of them returned.
            calls = self.ranks.receive(plan, src) if self.ranks is not None else None
            parts = []
            try:
                peers = senders(plan, src, 0)
                chans: dict[int, Channel] = {}
                try:
                    for peer in peers:
                        chans[peer.rank] = self.pool.acquire(peer)
                    if chans:
                        parts.append(self.receiver.receive(plan, self.engine.runner.kv, chans,
                                                           self.timeout))
                finally:
                    for peer in peers:
                        if peer.rank in chans:
                            self.pool.release(peer, chans[peer.rank])
            finally:
                if calls is not None:
                    parts += calls.result().values()
            self._log_transfer(plan.request_id, merge_stats(parts), "recv",
                               self.channel_addrs.get(src.instance_id))
        except BaseException as e:  # noqa: BLE001 - reported to generate()
            inc.error = e
        finally:
            inc.receiving = False
            inc.arrived.set()
            if inc.aborted or inc.error is not None:
                self._free_incoming(plan.request_id, inc)

    def _expire(self, request_id: str, inc: _Incoming) -> None:
        if not inc.claimed and not inc.receiving and self._incoming.get(request_id) is inc:
            log.warning("reservation for %s expired unclaimed; freeing its blocks", request_id)
            inc.aborted = True
            self._free_incoming(request_id, inc)

    def _free_incoming(self, request_id: str, inc: _Incoming) -> None:
        if self._incoming.get(request_id) is inc and not inc.claimed:
            del self._incoming[request_id]
            self.aengine.call(lambda e: e.blocks.free_ids(inc.block_ids))

    async def generate(self, request_id: str, first_token: int,
                       first_logprobs: dict[int, float] | None = None) -> AsyncIterator[TokenChunk]:
        inc = self._incoming.get(request_id)
        if inc is None or inc.aborted:
            raise TransferFailed(f"no reservation for {request_id} (expired or aborted)")
        inc.claimed = True  # from here on the engine request owns the blocks
        ok = await asyncio.to_thread(inc.arrived.wait, self.timeout)
        if not ok or inc.error is not None:
            inc.claimed = False
            inc.aborted = True
            if not inc.receiving:
                self._free_incoming(request_id, inc)
            raise TransferFailed(f"KV of {request_id} did not arrive: {inc.error or 'timeout'}")
        self._incoming.pop(request_id, None)
        job = inc.job
        add = lambda e: e.add_prefilled(request_id, job.prompt_ids, job.params, first_token,  # noqa: E731
                                        first_logprobs, inc.block_ids, job.chunks)
        async for o in self.aengine.stream(add):
            yield self._out(o)

    async def resume(self, request_id: str) -> AsyncIterator[TokenChunk]:
        """The stream of a request that migrated here (``Migrations.commit``)."""
        await self.migrations.claim(request_id)
        async for o in self.aengine.consume(request_id):
            yield self._out(o)

    def _out(self, o) -> TokenChunk:
        # a live-migrated request's last chunk says where it goes on (None: handed back);
        # "migrating" (not final, no tokens) announces the destination ahead of the switch
        if o.finish_reason == "migrating":
            return TokenChunk(o.request_id, [], [], False, None, o.num_prompt_tokens,
                              o.num_output_tokens, self.migrations.destination.get(o.request_id))
        dest = self.migrations.destination.pop(o.request_id, None) \
            if o.finish_reason == "migrate" else None
        return _chunk(o, dest)

    # ---- colocated role ------------------------------------------------------------------------
    async def generate_full(self, job: Job) -> AsyncIterator[TokenChunk]:
        async for o in self.aengine.generate(job.prompt_ids, job.params, job.request_id,
                                             job.chunks):
            yield _chunk(o)

    # ---- any role ------------------------------------------------------------------------------
    def abort(self, request_id: str) -> None:
        inc = self._incoming.get(request_id)
        if inc is not None and not inc.claimed:
            inc.aborted = True
            if not inc.receiving:
                self._free_incoming(request_id, inc)
        self.aengine.abort(request_id)

    def stats(self) -> InstanceStats:
        def read(e: Engine) -> InstanceStats:
            s = e.scheduler
            queued = sum(r.num_pending for r in list(s.waiting) + s.running if r.in_prefill)
            return InstanceStats(
                self.info.instance_id, self.role, len(s.running), len(s.waiting),
                e.blocks.num_free, e.blocks.num_blocks, queued,
                sum(len(i.block_ids) for i in self._incoming.values())
                + self.migrations.reserved_blocks,
                e.blocks.hits, e.blocks.queries, self.draining, os.getpid(),
            )

        return self.aengine.call(read)

    def _log_transfer(self, request_id: str, stats, side: str, channel: str | None = None
                      ) -> None:
        self.transfer_log.append({"request_id": request_id, "side": side, "bytes": stats.bytes,
                                  "wait_s": stats.wait_s, "transfer_s": stats.transfer_s,
                                  "scatter_s": stats.scatter_s, "t": time.time(),
                                  "host": self.info.host, "channel": channel})
        del self.transfer_log[:-256]

    def shutdown(self) -> None:
        self.aengine.shutdown()
        self.pool.close_all()
