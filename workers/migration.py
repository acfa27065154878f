"""Live migration of a decoding request between two decode instances (Llumnix-style).

    source A (migrate)                                   destination B
    reserve(rid, tokens + margin)  ───────────────────>  blocks for the whole context
    stage k (A keeps decoding the request meanwhile):
      blocks [sent, full) ── expect ──> B posts the receive; A pushes every layer of
                              those blocks over the KV channel, waits for B's ack
      repeat while more than ``final_blocks`` full blocks were filled since the last stage
    final: A detaches (pauses) the request, pushes the rest (the partial last block and
      whatever filled meanwhile: O(1 block)), then ─ commit(state) ─> B adds the request
      to its batch and buffers its outputs; A frees its blocks and ends the router's stream
      with finish_reason "migrate", migrated_to=B; the router opens B's ``resume`` stream.

Only full blocks are sent before the pause: their KV never changes again (a decode writes
only the request's last, partial block), so the engine keeps stepping while they travel.
Tokens cannot repeat or go missing: the stream from A carries every token sampled before the
pause (outputs are delivered under the engine lock, before the end-of-stream), and B starts
from the exact state (tokens, sampler RNG), sampling the next token.

Abort paths (the request is never lost, blocks never leak): any failure before the commit —
B out of blocks, a transfer timeout, a dead peer, the request preempted or finished on A —
cancels B's reservation and, if A had paused it, resumes it on A. B frees a reservation that
is not committed in time, and a committed request whose stream nobody opens in time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from pdserve.kvtransfer import KVLayout, PeerId, TransferPlan

from .messages import InstanceInfo, MigrationState, MigrationTicket
from .request import Request, RequestOutput, Status

if TYPE_CHECKING:
    from .instance import Instance

log = logging.getLogger(__name__)


class MigrationError(RuntimeError):
    """A migration did not happen; the request goes on where it was."""


class MigrationPeers(Protocol):
    """How a source reaches the destination (targeted control-plane calls)."""

    def info(self, instance_id: str) -> InstanceInfo: ...

    def migrate_reserve(self, instance_id: str, request_id: str, num_tokens: int
                        ) -> MigrationTicket: ...

    def migrate_expect(self, instance_id: str, request_id: str, tag: str, src: PeerId,
                       layout: KVLayout, first: int, count: int) -> int: ...

    def migrate_extend(self, instance_id: str, request_id: str, num_blocks: int
                       ) -> MigrationTicket: ...

    def migrate_commit(self, instance_id: str, state: MigrationState) -> None: ...

    def migrate_cancel(self, instance_id: str, request_id: str) -> None: ...


@dataclass(eq=False)
class _Arrival:
    """Destination side: blocks reserved for a migrating request."""

    ticket: MigrationTicket
    receiving: int = 0  # receive threads writing the blocks
    error: BaseException | None = None
    aborted: bool = False
    committed: bool = False  # the blocks now belong to the engine's request
    done: threading.Condition = field(default_factory=threading.Condition)


@dataclass(frozen=True)
class _Snapshot:
    num_computed: int
    block_ids: tuple[int, ...]
    preemptions: int


class Migrations:
    def __init__(self, inst: Instance, max_stages: int = 4, final_blocks: int = 1) -> None:
        self.inst = inst
        self.max_stages = max_stages
        self.final_blocks = final_blocks  # pause once at most this many full blocks are new
        self.announce = False  # tell the stream's consumer the destination before the switch
        self._arrivals: dict[str, _Arrival] = {}
        self._unclaimed: dict[str, threading.Timer] = {}  # committed, resume not opened yet
        self._active: set[str] = set()  # source side: migrations in progress
        self.destination: dict[str, str] = {}  # source side: where migrated requests went
        self.log: list[dict] = []  # recent migrations, either side
        self.counts = {"out": 0, "in": 0, "failed": 0}
        self._lock = threading.Lock()

    # ---- source ---------------------------------------------------------------------------
    def migrate(self, request_id: str, dest_id: str, reason: str = "admin") -> dict:
        """Move ``request_id`` (decoding here) to ``dest_id``; blocks until it is done or
        failed. Returns the migration's record; raises MigrationError on failure (the request
        then goes on here)."""
        inst, peers = self.inst, self.inst.peers
        if inst.layout.tp_size != 1:
            raise MigrationError("live migration needs tp=1 decode instances")
        if peers is None or dest_id == inst.info.instance_id:
            raise MigrationError(f"cannot migrate {request_id} to {dest_id}")
        with self._lock:
            if request_id in self._active:
                raise MigrationError(f"{request_id} is already migrating")
            self._active.add(request_id)
        t0 = time.monotonic()
        rec = {"request_id": request_id, "src": inst.info.instance_id, "dst": dest_id,
               "reason": reason, "side": "out", "stages": 0, "bytes": 0, "ok": False}
        snap = inst.aengine.call(self._snapshot, request_id)
        paused: Request | None = None
        ticket = channel = None
        dest = peer = None
        try:
            if snap is None:
                raise MigrationError(f"{request_id} is not decoding on {inst.info.instance_id}")
            dest = peers.info(dest_id)
            bs = inst.layout.block_size
            margin = bs * (self.max_stages + 2)
            ticket = peers.migrate_reserve(dest_id, request_id,
                                           snap.num_computed + 1 + margin)
            peer = PeerId(dest.instance_id, dest.epoch, 0)
            channel = inst.pool.acquire(peer)
            sent = 0
            for _ in range(self.max_stages):
                cur = self._check(inst.aengine.call(self._snapshot, request_id), snap)
                full = cur.num_computed // bs
                if full - sent <= self.final_blocks:
                    break
                ticket = self._fit(ticket, full + 1 + self.max_stages, dest_id)
                rec["bytes"] += self._send(request_id, rec["stages"], cur.block_ids, sent, full,
                                           ticket, channel, dest)
                rec["stages"] += 1
                sent = full
            # Final stage: announce the destination on the request's stream (the router
            # connects to it now, in parallel with the hand-over), pause, send what is left,
            # hand over.
            self.destination[request_id] = dest_id
            if self.announce:
                inst.aengine.notify(RequestOutput(request_id, [], [], 0, 0, False, "migrating"))
            paused = inst.aengine.call(lambda e: e.detach(request_id))
            t_pause = time.monotonic()
            if paused is None:
                raise MigrationError(f"{request_id} finished or left before the switch")
            cur = self._check(_Snapshot(paused.num_computed, tuple(paused.block_ids),
                                        paused.num_preemptions), snap)
            need = -(-cur.num_computed // bs)
            ticket = self._fit(ticket, need, dest_id)
            if need > sent:
                rec["bytes"] += self._send(request_id, rec["stages"], cur.block_ids, sent, need,
                                           ticket, channel, dest)
                rec["stages"] += 1
            rec["pause_send_s"] = time.monotonic() - t_pause
            gen = paused.generator
            state = MigrationState(
                request_id, paused.prompt_ids, list(paused.output_ids),
                list(paused.output_logprobs), paused.params, need,
                gen.get_state().numpy().tobytes() if isinstance(gen, torch.Generator) else None)
            peers.migrate_commit(dest_id, state)
            rec["pause_s"] = time.monotonic() - t_pause
            while len(self.destination) > 1024:  # bounded: drop the oldest
                self.destination.pop(next(iter(self.destination)))
            inst.aengine.close_detached(paused, "migrate")
            paused = None
            rec["ok"] = True
            self.counts["out"] += 1
            log.info("migrated %s %s -> %s (%s): %d stages, %.1f KiB, pause %.1f ms",
                     request_id, inst.info.instance_id, dest_id, reason, rec["stages"],
                     rec["bytes"] / 1024, rec["pause_s"] * 1e3)
            return rec
        except BaseException as e:
            self.counts["failed"] += 1
            rec["error"] = f"{type(e).__name__}: {e}"
            self.destination.pop(request_id, None)  # a later "migrate" end is a hand-back
            if paused is not None:  # resume here; if its stream is gone meanwhile, drop it
                inst.aengine.reattach(paused)
            if ticket is not None:
                try:
                    peers.migrate_cancel(dest_id, request_id)
                except Exception as c:  # noqa: BLE001 - it frees on its own deadline then
                    log.info("cancel of %s on %s: %s", request_id, dest_id, c)
            log.warning("migration of %s to %s failed (%s); it goes on here", request_id,
                        dest_id, rec["error"])
            if isinstance(e, MigrationError):
                raise
            raise MigrationError(rec["error"]) from e
        finally:
            if channel is not None:
                inst.pool.release(peer, channel)
                if channel.closed:
                    inst.pool.invalidate(peer)
            rec["total_s"] = time.monotonic() - t0
            self._record(rec)
            with self._lock:
                self._active.discard(request_id)

    def _fit(self, ticket: MigrationTicket, num_blocks: int, dest_id: str) -> MigrationTicket:
        """The reservation, grown to ``num_blocks`` if the request outgrew it meanwhile."""
        if num_blocks <= len(ticket.block_ids):
            return ticket
        return self.inst.peers.migrate_extend(dest_id, ticket.request_id, num_blocks)

    @staticmethod
    def _snapshot(engine, request_id: str) -> _Snapshot | None:
        req = engine.requests.get(request_id)
        if req is None or req.status is not Status.RUNNING or req.in_prefill:
            return None
        return _Snapshot(req.num_computed, tuple(req.block_ids), req.num_preemptions)

    @staticmethod
    def _check(cur: _Snapshot | None, first: _Snapshot) -> _Snapshot:
        """Blocks already sent must still be the request's: a preemption (recompute) or an
        end of the request invalidates the migration."""
        if cur is None:
            raise MigrationError("the request finished or left during the migration")
        if cur.preemptions != first.preemptions:
            raise MigrationError("the request was preempted during the migration")
        return cur

    def _send(self, request_id: str, stage: int, src_ids, lo: int, hi: int,
              ticket: MigrationTicket, channel, dest: InstanceInfo) -> int:
        """Push blocks [lo, hi) of the request, every layer, and wait for the ack."""
        inst = self.inst
        tag = f"{request_id}@migrate{stage}"
        tid = inst.peers.migrate_expect(dest.instance_id, request_id, tag, inst._me(),
                                        inst.layout, lo, hi - lo)
        layers = inst.layout.num_layers
        plan = TransferPlan(tag, src_ids[lo:hi], ticket.block_ids[lo:hi], 0, layers,
                            inst.layout, dest.layout, None, tid)
        inst.sender.begin(plan, {0: channel})
        try:
            inst.sender.send_layers(plan, inst.engine.runner.kv, range(layers))
        except BaseException:
            inst.sender.abort(tag, inst.timeout)
            raise
        stats = inst.sender.wait_done(tag, inst.timeout)
        return stats.bytes

    # ---- destination ------------------------------------------------------------------------
    def reserve(self, request_id: str, num_tokens: int) -> MigrationTicket:
        inst = self.inst
        if inst.draining:
            raise MigrationError(f"{inst.info.instance_id} is draining")
        n = -(-num_tokens // inst.layout.block_size)

        def take(e) -> list[int]:
            if request_id in e.requests or request_id in self._arrivals:
                raise MigrationError(f"{request_id} is already here")
            # keep room for the running batch to grow by one block each
            if not e.blocks.can_allocate(n + len(e.scheduler.running)):
                raise MigrationError(f"{inst.info.instance_id}: {e.blocks.num_free} free KV "
                                     f"blocks, the request needs {n}")
            return e.blocks.allocate_ids(n)

        ids = inst.aengine.call(take)
        arr = _Arrival(MigrationTicket(request_id, inst.info, ids, inst.timeout))
        self._arrivals[request_id] = arr
        threading.Timer(inst.timeout, self._expire, (request_id, arr)).start()
        return arr.ticket

    def extend(self, request_id: str, num_blocks: int) -> MigrationTicket:
        """Grow a reservation to ``num_blocks`` (the request kept decoding at the source)."""
        arr = self._arrivals.get(request_id)
        if arr is None or arr.aborted:
            raise MigrationError(f"no live reservation for {request_id}")
        more = num_blocks - len(arr.ticket.block_ids)
        if more > 0:
            def take(e) -> list[int]:
                if not e.blocks.can_allocate(more + len(e.scheduler.running)):
                    raise MigrationError(f"{self.inst.info.instance_id}: {e.blocks.num_free} "
                                         f"free KV blocks, the request needs {more} more")
                return e.blocks.allocate_ids(more)

            extra = self.inst.aengine.call(take)
            arr.ticket = dataclasses.replace(arr.ticket,
                                             block_ids=arr.ticket.block_ids + extra)
        return arr.ticket

    def expect(self, request_id: str, tag: str, src: PeerId, src_layout: KVLayout,
               first: int, count: int) -> int:
        """Post the receive of blocks [first, first+count) of a reservation; returns the
        transfer id the sender must use."""
        inst = self.inst
        arr = self._arrivals.get(request_id)
        if arr is None or arr.aborted or arr.error is not None:
            raise MigrationError(f"no live reservation for {request_id}")
        mine = arr.ticket.block_ids[first:first + count]
        if len(mine) != count or count <= 0:
            raise MigrationError(f"blocks [{first}, {first + count}) outside the reservation")
        tid = next(inst._transfer_ids)
        plan = TransferPlan(tag, mine, mine, 0, inst.layout.num_layers, src_layout,
                            inst.layout, None, tid)
        with arr.done:
            arr.receiving += 1
        threading.Thread(target=self._receive, args=(arr, src, plan), daemon=True).start()
        return tid

    def _receive(self, arr: _Arrival, src: PeerId, plan: TransferPlan) -> None:
        inst = self.inst
        try:
            ch = inst.pool.acquire(src)
            try:
                stats = inst.receiver.receive(plan, inst.engine.runner.kv, {0: ch}, inst.timeout)
            finally:
                inst.pool.release(src, ch)
            inst._log_transfer(plan.request_id, stats, "migrate-recv")
        except BaseException as e:  # noqa: BLE001 - reported at commit
            arr.error = e
        finally:
            with arr.done:
                arr.receiving -= 1
                arr.done.notify_all()
            if arr.aborted or arr.error is not None:
                self._free(arr)

    def commit(self, state: MigrationState, loop: asyncio.AbstractEventLoop) -> None:
        """Every block arrived: add the request to the batch; its outputs are buffered until
        the router opens ``resume``."""
        inst = self.inst
        rid = state.request_id
        arr = self._arrivals.get(rid)
        if arr is None or arr.aborted:
            raise MigrationError(f"no live reservation for {rid}")
        with arr.done:
            arr.done.wait_for(lambda: arr.receiving == 0, inst.timeout)
        if arr.error is not None or arr.receiving:
            raise MigrationError(f"the KV of {rid} did not arrive: {arr.error or 'timeout'}")
        ids = arr.ticket.block_ids
        gen = None
        if state.rng_state is not None:
            gen = torch.Generator()
            gen.set_state(torch.frombuffer(bytearray(state.rng_state), dtype=torch.uint8))

        def add(e):
            req = e.add_migrated(rid, state.prompt_ids, state.output_ids, state.output_logprobs,
                                 state.params, ids[:state.num_blocks], gen)
            if len(ids) > state.num_blocks:
                e.blocks.free_ids(ids[state.num_blocks:])
            return req

        arr.committed = True
        try:
            inst.aengine.adopt(add, loop)
        except BaseException:
            arr.committed = False
            raise
        # registered as unclaimed before it stops being an arrival: a ``claim`` waiting for
        # the commit must find it in one place or the other
        timer = threading.Timer(inst.timeout, self._unclaimed_expired, (rid,))
        self._unclaimed[rid] = timer
        del self._arrivals[rid]
        timer.start()
        self.counts["in"] += 1
        self._record({"request_id": rid, "dst": inst.info.instance_id, "side": "in",
                      "ok": True, "num_tokens": len(state.prompt_ids) + len(state.output_ids)})

    async def claim(self, request_id: str) -> None:
        """The router opened the migrated request's stream (maybe before the commit: it
        connects when the source announces the hand-over; then this waits for it)."""
        deadline = time.monotonic() + self.inst.timeout
        while request_id in self._arrivals and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        timer = self._unclaimed.pop(request_id, None)
        if timer is None:
            raise MigrationError(f"no migrated request {request_id} waits here")
        timer.cancel()

    def cancel(self, request_id: str) -> None:
        """The source gave up: free the reservation, or drop a committed, unclaimed request."""
        arr = self._arrivals.get(request_id)
        if arr is not None:
            arr.aborted = True
            if not arr.receiving:
                self._free(arr)
        if self._unclaimed.pop(request_id, None) is not None:
            self.inst.aengine.discard(request_id)

    def _expire(self, request_id: str, arr: _Arrival) -> None:
        if self._arrivals.get(request_id) is arr:
            log.warning("migration reservation for %s expired; freeing its blocks", request_id)
            self.cancel(request_id)

    def _unclaimed_expired(self, request_id: str) -> None:
        if self._unclaimed.pop(request_id, None) is not None:
            log.warning("migrated request %s was never resumed; dropping it", request_id)
            self.inst.aengine.discard(request_id)

    def _free(self, arr: _Arrival) -> None:
        rid = arr.ticket.request_id
        if self._arrivals.get(rid) is arr and not arr.committed:
            del self._arrivals[rid]
            self.inst.aengine.call(lambda e: e.blocks.free_ids(arr.ticket.block_ids))

    def _record(self, rec: dict) -> None:
        rec["t"] = time.time()
        self.log.append(rec)
        del self.log[:-256]

    @property
    def reserved_blocks(self) -> int:
        return sum(len(a.ticket.block_ids) for a in list(self._arrivals.values()))

