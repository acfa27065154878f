"""When to live-migrate decoding requests, and the router-side loop that does it.

``MigrationPolicy.decide(loads, now)`` is pure (unit-tested on made-up pool states). It
returns at most one move per source per tick, each with its reason:

    memory_pressure  a source with less than ``pressure_free`` of its KV blocks free moves a
                     request to the instance with the most free blocks, if that one has at
                     least twice the threshold free (migrate instead of preempt-and-recompute)
    imbalance        load = share of KV blocks in use; when load(most) - load(least) exceeds
                     ``imbalance_high``, or their batches differ by ``batch_gap`` or more, move
                     one request from the most to the least loaded, and keep moving (one per
                     tick) until the gap falls below ``imbalance_low`` (hysteresis: a gap
                     between low and high neither starts nor stops a run)
    drain            an admin call (scale-in): every request of the instance moves

A source waits ``cooldown_s`` between two automatic moves, draining instances are neither
sources nor destinations of automatic moves, and a source needs ``min_running`` decoding
requests for the imbalance trigger (moving a lone request only moves the imbalance).

``MigrationController`` runs the policy every ``interval_s`` in the router replica: it lists
the decode pool's replicas (``replica_router.live_replicas``), reads their stats (targeted
calls), and asks each chosen source to migrate its smallest decoding request
(``PoolWorker.migrate``). Every decision is logged with its reason and kept for the console
and ``/admin/stats``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from .replica_router import TargetGone, live_replicas

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 5.0  # a stats call to a decode instance
DRAIN_TIMEOUT_S = 120.0  # a whole drain (its migrations run one after another)


@dataclass(frozen=True)
class Load:
    """What the policy knows of one decode instance."""

    instance_id: str
    free_blocks: int
    total_blocks: int
    running: int
    draining: bool = False

    @property
    def used(self) -> float:
        return 1.0 - self.free_blocks / self.total_blocks if self.total_blocks else 1.0

    @property
    def free(self) -> float:
        return 1.0 - self.used


@dataclass(frozen=True)
class Move:
    src: str
    dst: str
    reason: str  # memory_pressure | imbalance | drain


class MigrationPolicy:
    def __init__(self, imbalance_high: float = 0.3, imbalance_low: float = 0.1,
                 batch_gap: int = 8, pressure_free: float = 0.1, min_running: int = 2,
                 cooldown_s: float = 2.0, **_) -> None:
        self.high, self.low = imbalance_high, imbalance_low
        self.batch_gap, self.pressure_free = batch_gap, pressure_free
        self.min_running, self.cooldown_s = min_running, cooldown_s
        self._balancing = False  # inside an imbalance run (hysteresis)
        self._last: dict[str, float] = {}  # source -> time of its last automatic move

    def decide(self, loads: list[Load], now: float) -> list[Move]:
        live = [x for x in loads if not x.draining and x.total_blocks > 0]
        if len(live) < 2:
            self._balancing = False
            return []
        moves: list[Move] = []
        busy: set[str] = set()
        for src in sorted(live, key=lambda x: x.free):
            if src.free >= self.pressure_free or src.running < 1 or not self._ready(src, now):
                continue
            dst = max((x for x in live if x.instance_id != src.instance_id), key=lambda x: x.free)
            if dst.free >= 2 * self.pressure_free and dst.instance_id not in busy:
                moves.append(Move(src.instance_id, dst.instance_id, "memory_pressure"))
                busy |= {src.instance_id, dst.instance_id}
        most = max(live, key=lambda x: (x.used, x.running))
        least = min(live, key=lambda x: (x.used, x.running))
        gap = most.used - least.used
        batch = most.running - least.running
        start = gap > self.high or batch >= self.batch_gap
        keep = self._balancing and (gap > self.low or batch >= max(2, self.batch_gap // 2))
        self._balancing = (start or keep) and most.instance_id != least.instance_id
        if (self._balancing and most.running >= self.min_running and self._ready(most, now)
                and not busy & {most.instance_id, least.instance_id}):
            moves.append(Move(most.instance_id, least.instance_id, "imbalance"))
        for m in moves:
            self._last[m.src] = now
        return moves

    def _ready(self, x: Load, now: float) -> bool:
        return now - self._last.get(x.instance_id, -1e18) >= self.cooldown_s


class MigrationController:
    def __init__(self, decode, config: dict, role: str = "decode") -> None:
        self.decode = decode  # the decode pool's deployment handle
        self.cfg = config
        self.role = role
        self.enabled = bool(config.get("enabled", True))
        self.policy = MigrationPolicy(**config)
        self.events: deque[dict] = deque(maxlen=200)  # decisions and their outcomes
        self.counts = {"migrations": 0, "failed": 0, "drains": 0}
        self.by_reason: dict[str, int] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> MigrationController:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        interval = float(self.cfg.get("interval_s", 1.0))
        while True:
            await asyncio.sleep(interval)
            if not self.enabled:
                continue
            try:
                await self.tick()
            except Exception as e:  # noqa: BLE001 - a tick must never end the loop
                log.warning("migration controller tick failed: %s", e)

    async def replicas(self) -> list[str]:
        ids = live_replicas(self.role)
        if not ids:  # the handle routes nothing yet: one call makes it list the replicas
            await self.decode.stats.remote()
            ids = live_replicas(self.role)
        return ids

    async def loads(self) -> list[Load]:
        ids = await self.replicas()
        stats = await asyncio.gather(*(asyncio.wait_for(self._targeted("stats", target=i),
                                                        CALL_TIMEOUT_S) for i in ids),
                                     return_exceptions=True)
        return [Load(s.instance_id, s.free_blocks, s.total_blocks, s.running, s.draining)
                for s in stats if not isinstance(s, BaseException)]

    async def _targeted(self, method: str, *args, target: str):
        """A call to one instance. This controller's handle is its own and may not know every
        replica yet right after it was made: "not a live replica" is retried briefly."""
        for attempt in range(4):
            try:
                return await getattr(self.decode, method).remote(*args, target=target)
            except TargetGone:
                if attempt == 3:
                    raise
                await asyncio.sleep(0.25 * (attempt + 1))

    async def tick(self) -> list[dict]:
        moves = self.policy.decide(await self.loads(), time.monotonic())
        return list(await asyncio.gather(*(self.move(m) for m in moves)))

    async def move(self, m: Move, request_id: str | None = None) -> dict:
        ev = {"t": time.time(), "src": m.src, "dst": m.dst, "reason": m.reason, "ok": False}
        try:
            rec = await self._targeted("migrate", request_id, m.dst, m.reason, target=m.src)
            ev.update(ok=True, request_id=rec["request_id"], pause_ms=rec["pause_s"] * 1e3,
                      stages=rec["stages"])
            self.counts["migrations"] += 1
            self.by_reason[m.reason] = self.by_reason.get(m.reason, 0) + 1
            log.info("migration (%s): %s %s -> %s, pause %.1f ms", m.reason, rec["request_id"],
                     m.src, m.dst, ev["pause_ms"])
        except Exception as e:  # noqa: BLE001 - the request goes on at the source
            ev["error"] = f"{type(e).__name__}: {e}"[:300]
            self.counts["failed"] += 1
            log.info("migration (%s) %s -> %s not done: %s", m.reason, m.src, m.dst, ev["error"])
        self.events.append(ev)
        return ev

    async def drain(self, instance_id: str) -> tuple[int, list[str]]:
        """Scale-in: ``instance_id`` stops taking requests and its requests move to the other
        decode instances (live; by recompute where a live move fails)."""
        ids = await self.replicas()
        if instance_id not in ids:
            raise KeyError(f"no decode instance {instance_id!r}; live: {', '.join(ids) or 'none'}")
        # every other live instance, unless its stats say it drains (a stats call that times
        # out must not leave the drain with nowhere to go: a destination that cannot take a
        # request refuses it, and that request is handed back for recompute instead)
        draining = {x.instance_id for x in await self.loads() if x.draining}
        dests = [i for i in ids if i != instance_id and i not in draining]
        try:
            n = await asyncio.wait_for(self._targeted("drain", dests, target=instance_id),
                                       DRAIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise TimeoutError(f"draining {instance_id} did not finish within "
                               f"{DRAIN_TIMEOUT_S:.0f} s; its requests go on or are recovered "
                               "by the router") from None
        self.counts["drains"] += 1
        self.events.append({"t": time.time(), "src": instance_id, "dst": ",".join(dests),
                            "reason": "drain", "ok": True, "requests": n})
        log.info("drained %s: %d requests moved to %s", instance_id, n, dests or "recompute")
        return n, dests

    def snapshot(self) -> dict:
        return {"enabled": self.enabled, **self.counts, "by_reason": dict(self.by_reason),
                "events": list(self.events)[-50:]}
