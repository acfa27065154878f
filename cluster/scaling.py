"""The scaling controller: measures the pools, applies ``PoolAutoscaler`` per pool, and is the
one place replica counts change (autoscaler decisions and an operator's hand alike).

It runs as a task on the router replica's event loop (``router/ingress.py`` starts it), every
``autoscaling.interval_s``:

    pools.all()                      Serve: target count and replicas (id, state, start)
    stats(target=id) per replica     each instance's InstanceStats (queue, batch, KV use)
    signals()                        the router's own view: TPOT over a window, prompt tokens/s
        -> snapshot                  what /metrics and the console show
        -> PoolAutoscaler.decide     per pool, when autoscaling is on
        -> apply                     out: set the count; in: drain a decode replica first

Why here and not in Serve's custom autoscaling policy (which Ray 2.60 has): see
``cluster/serve_pools.py``. A single router replica runs (``build_app``), so there is one
controller per app.

Scale-in of a decode replica: Serve stops the replica *it* picks — on one
node, the newest RUNNING one; across nodes it prefers non-head nodes with few replicas. The
controller drains the replica Serve will pick on one node (the newest), then lowers the
count; if Serve stopped another one after all (multi-node), that replica's requests are
recovered by the router (re-prefill) and the drained one is taken back into service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from .autoscaler import PoolAutoscaler, PoolMetrics, ReplicaMetrics, ScalingPolicy
from .serve_pools import PoolInfo, ScalingUnavailable, ServePools

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 3.0
STOP_WAIT_S = 120.0  # a drained replica serves again if Serve has not stopped one by then


@dataclass(frozen=True)
class ReplicaView:
    """One replica as the console and /metrics show it (JSON-able)."""

    replica_id: str
    pool: str
    state: str  # Serve's (STARTING, RUNNING, STOPPING...) or DRAINING
    age_s: float
    running: int = 0  # the batch: requests decoding / prefilling
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    queued_prompt_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0


@dataclass(frozen=True)
class Limits:
    min_replicas: int
    max_replicas: int


class ScalingController:
    """Per app: ``tick()`` measures every pool and, when ``enabled``, applies one
    ``PoolAutoscaler`` per pool; ``scale()`` is the operator's hand. Decisions that change a
    count are kept in ``decisions`` and passed to ``on_decision`` (metrics); holds only to
    ``on_decision`` and ``last``."""

    def __init__(self, pools: ServePools, handles: dict[str, Any], app_config: dict,
                 signals: Callable[[], dict[str, float | None]] | None = None,
                 drain: Callable[[str], Awaitable[int]] | None = None,
                 on_decision: Callable[[dict], None] | None = None,
                 on_tick: Callable[[ScalingController], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        a = app_config.get("autoscaling") or {}
        self.pools = pools
        self.handles = handles
        self.enabled = bool(a.get("enabled", False))
        self.interval_s = float(a.get("interval_s", 2.0))
        self.drain_timeout_s = float(a.get("drain_timeout_s", 30.0))
        self.tp = {p: int(app_config[p]["tp"]) for p in pools.pools}
        self.signals = signals or dict  # the router's measurements (see router/console.py)
        self._drain = drain
        self.on_decision = on_decision
        self.on_tick = on_tick  # after each round's snapshot (metrics, the console's history)
        self.clock = clock
        slo = app_config.get("slo") or {}
        self.base = ScalingPolicy(ttft_slo_s=float(slo.get("ttft_s", 1.0)),
                                  tpot_slo_s=float(slo.get("tpot_s", 0.1)),
                                  **(a.get("policy") or {}))
        self.limits = {p: Limits(int((a.get(p) or {}).get("min_replicas", 1)),
                                 int((a.get(p) or {}).get("max_replicas", 4)))
                       for p in pools.pools}
        self._scalers: dict[str, PoolAutoscaler] = {}
        self._rebuild()
        self._state: dict[str, dict | None] = {p: None for p in pools.pools}
        self._prev: dict[str, tuple[float, Any]] = {}  # replica -> (t, InstanceStats)
        self._transfer_seen: dict[str, float] = {}  # replica -> newest transfer time counted
        self.transfer_bytes = 0  # KV bytes received by decode instances, since start
        self.transfer_seconds = {"wait": 0.0, "transfer": 0.0, "scatter": 0.0}  # their split
        self.decisions: deque[dict] = deque(maxlen=500)  # changes (auto and manual)
        self.last: dict[str, dict] = {}  # pool -> the latest autoscaler decision (holds too)
        self.snapshot: dict[str, dict] = {}  # pool -> {target, replicas: [ReplicaView]}
        self.snapshot_at: float | None = None
        self._drained: dict[str, str] = {}  # pool -> replica drained for a pending scale-in
        self._drained_at: dict[str, float] = {}  # pool -> when (clock)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    # ---- configuration (the console's controls) ------------------------------------------------
    def _rebuild(self) -> None:
        self._scalers = {p: PoolAutoscaler(replace(self.base, min_replicas=lim.min_replicas,
                                                   max_replicas=lim.max_replicas))
                         for p, lim in self.limits.items()}

    def set_slo(self, ttft_s: float | None = None, tpot_s: float | None = None) -> None:
        self.base = replace(self.base, ttft_slo_s=ttft_s or self.base.ttft_slo_s,
                            tpot_slo_s=tpot_s or self.base.tpot_slo_s)
        self._rebuild()

    def set_limits(self, pool: str, min_replicas: int | None, max_replicas: int | None) -> None:
        self._check_pool(pool)
        old = self.limits[pool]
        new = Limits(old.min_replicas if min_replicas is None else int(min_replicas),
                     old.max_replicas if max_replicas is None else int(max_replicas))
        if not 1 <= new.min_replicas <= new.max_replicas:
            raise ValueError(f"need 1 <= min_replicas ({new.min_replicas}) <= max_replicas "
                             f"({new.max_replicas})")
        self.limits[pool] = new
        self._rebuild()

    def _check_pool(self, pool: str) -> None:
        if pool not in self.pools.pools:
            raise ValueError(f"pool {pool!r}: this app's pools are "
                             f"{', '.join(self.pools.pools)}")

    # ---- the loop --------------------------------------------------------------------------
    def start(self) -> ScalingController:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except ScalingUnavailable as e:  # the app is still deploying
                log.info("scaling controller: %s", e)
            except Exception:
                log.exception("scaling controller round failed")
            await asyncio.sleep(self.interval_s)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def tick(self) -> dict[str, dict]:
        """One round: measure, and decide + apply when autoscaling is on."""
        async with self._lock:
            infos = await self.pools.all()
            now = self.clock()
            stats = await self._poll(infos)
            await self._poll_transfers(infos)
            self.snapshot = {p: self._view(info, stats) for p, info in infos.items()}
            self.snapshot_at = time.time()
            if self.on_tick is not None:
                try:
                    self.on_tick(self)
                except Exception:
                    log.exception("on_tick failed")
            await self._settle_drains(infos)
            if self.enabled:
                sig = self.signals()
                for pool, info in infos.items():
                    await self._decide(pool, info, stats, sig, now)
            return self.snapshot

    async def _poll(self, infos: dict[str, PoolInfo]) -> dict[str, Any]:
        async def one(pool: str, rid: str):
            try:
                return rid, await asyncio.wait_for(
                    self.handles[pool].stats.remote(target=rid), STATS_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - a replica that is going away
                log.debug("stats of %s: %s", rid, e)
                return rid, None

        got = await asyncio.gather(*(one(p, r.replica_id) for p, info in infos.items()
                                     for r in info.running))
        return {rid: s for rid, s in got if s is not None}

    async def _poll_transfers(self, infos: dict[str, PoolInfo]) -> None:
        if "decode" not in infos:
            return
        for r in infos["decode"].running:
            try:
                log_ = await asyncio.wait_for(
                    self.handles["decode"].transfers.remote(target=r.replica_id), STATS_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - a replica that is going away
                log.debug("transfers of %s: %s", r.replica_id, e)
                continue
            seen = self._transfer_seen.get(r.replica_id, 0.0)
            fresh = [e for e in log_ if e.get("t", 0.0) > seen]
            self.transfer_bytes += sum(int(e.get("bytes", 0)) for e in fresh)
            for phase in self.transfer_seconds:
                self.transfer_seconds[phase] += sum(float(e.get(f"{phase}_s") or 0.0)
                                                    for e in fresh)
            if fresh:
                self._transfer_seen[r.replica_id] = max(e["t"] for e in fresh)

    def _view(self, info: PoolInfo, stats: dict[str, Any]) -> dict:
        wall = time.time()
        reps = []
        for r in info.replicas:
            s = stats.get(r.replica_id)
            state = "DRAINING" if s is not None and s.draining else r.state
            v = ReplicaView(r.replica_id, info.name, state, max(0.0, wall - r.start_time_s))
            if s is not None:
                v = replace(v, running=s.running, waiting=s.waiting,
                            kv_blocks_used=s.total_blocks - s.free_blocks,
                            kv_blocks_total=s.total_blocks,
                            queued_prompt_tokens=s.queued_prefill_tokens,
                            prefix_hit_tokens=s.prefix_hit_tokens,
                            prefix_query_tokens=s.prefix_query_tokens)
            reps.append(asdict(v))
        return {"target": info.target, "tp": self.tp.get(info.name, 1),
                "min_replicas": self.limits[info.name].min_replicas,
                "max_replicas": self.limits[info.name].max_replicas, "replicas": reps}

    # ---- deciding ----------------------------------------------------------------------------
    def _replica_metrics(self, pool: str, info: PoolInfo, stats: dict[str, Any], sig: dict,
                         now: float) -> tuple[ReplicaMetrics, ...]:
        out = []
        for r in info.running:
            s = stats.get(r.replica_id)
            if s is None or s.draining:
                continue
            tput = busy = None
            prev = self._prev.get(r.replica_id)
            if prev is not None and now > prev[0]:
                # prompt tokens this replica computed since the last round (looked up in its
                # prefix cache minus those found there); a rate of compute only when it had a
                # backlog at both ends (busy throughout), else unknown
                p = prev[1]
                done = (s.prefix_query_tokens - s.prefix_hit_tokens) - \
                    (p.prefix_query_tokens - p.prefix_hit_tokens)
                was, now_busy = p.queued_prefill_tokens > 0, s.queued_prefill_tokens > 0
                busy = (was + now_busy) / 2
                if was and now_busy and done > 0:
                    tput = done / (now - prev[0])
            self._prev[r.replica_id] = (now, s)
            out.append(ReplicaMetrics(
                r.replica_id, queued_prompt_tokens=s.queued_prefill_tokens,
                prefill_tokens_per_s=tput, busy_fraction=busy if pool != "decode" else None,
                kv_blocks_used=s.total_blocks - s.free_blocks, kv_blocks_total=s.total_blocks,
                tpot_s=sig.get("tpot_s") if pool != "prefill" else None, running=s.running))
        return tuple(out)

    async def _decide(self, pool: str, info: PoolInfo, stats: dict[str, Any], sig: dict,
                      now: float) -> None:
        if pool in self._drained:
            return  # a scale-in is under way
        reps = self._replica_metrics(pool, info, stats, sig, now)
        m = PoolMetrics(pool, now, reps, info.target,
                        sig.get("prompt_tokens_per_s") if pool != "decode" else None)
        d, self._state[pool] = self._scalers[pool].decide(m, self._state[pool])
        rec = {"t": time.time(), "pool": pool, "source": "autoscaler", **d.to_dict()}
        self.last[pool] = rec
        if d.action == "hold":
            log.debug("autoscaler %s: %s", pool, d.reason)
            self._export(rec, record=False)
            return
        log.info("autoscaler %s: %s", pool, d.reason)
        await self._apply(pool, info, d.target, rec)

    async def _apply(self, pool: str, info: PoolInfo, target: int, rec: dict) -> None:
        try:
            # decode only: a colocated instance has no peer to hand its requests to (Serve's
            # graceful shutdown lets them finish for a few seconds instead)
            if target < info.target and pool == "decode":
                victim = self._victim(info)
                if victim is not None:
                    self._drained[pool], self._drained_at[pool] = victim, self.clock()
                    try:
                        n = await asyncio.wait_for(self._drain_replica(pool, victim),
                                                   self.drain_timeout_s)
                        rec["drained"] = {"instance_id": victim, "requests": n}
                    except Exception as e:  # noqa: BLE001 - scale in anyway: the router
                        # recovers whatever still runs there (re-prefill on a live instance)
                        rec["drained"] = {"instance_id": victim,
                                          "error": f"{type(e).__name__}: {e}"[:300]}
                        log.warning("draining %s before scale-in failed (%s); scaling in "
                                    "anyway", victim, rec["drained"]["error"])
            await self.pools.set_target(pool, target)
            rec["applied"] = True
        except Exception as e:  # noqa: BLE001 - reported with the decision, retried next round
            rec["applied"] = False
            rec["error"] = f"{type(e).__name__}: {e}"
            victim = self._drained.pop(pool, None)
            if victim is not None:  # it stays: back into service
                await self._undrain(pool, victim)
            log.warning("scaling %s to %d failed: %s", pool, target, rec["error"])
        self._export(rec, record=True)

    def _export(self, rec: dict, record: bool) -> None:
        if record:
            self.decisions.append(rec)
        if self.on_decision is not None:
            try:
                self.on_decision(rec)
            except Exception:
                log.exception("decision export failed")

    @staticmethod
    def _victim(info: PoolInfo) -> str | None:
        """The replica Serve stops first on one node: the newest running one."""
        running = sorted(info.running, key=lambda r: r.start_time_s)
        return running[-1].replica_id if len(running) > 1 else None

    async def _drain_replica(self, pool: str, replica_id: str) -> int:
        if self._drain is not None and pool == "decode":
            return int(await self._drain(replica_id))
        return int(await self.handles[pool].drain.remote(target=replica_id))

    async def _settle_drains(self, infos: dict[str, PoolInfo]) -> None:
        """Once a scale-in has happened, take a drained replica that Serve kept back into
        service (multi-node: Serve stopped another one)."""
        for pool, rid in list(self._drained.items()):
            info = infos[pool]
            alive = {r.replica_id for r in info.replicas}
            if rid not in alive:
                del self._drained[pool]
            elif len(info.replicas) <= info.target:
                log.info("scale-in of %s stopped another replica; %s serves again", pool, rid)
                del self._drained[pool]
                await self._undrain(pool, rid)
            elif self.clock() - self._drained_at[pool] > STOP_WAIT_S:
                log.warning("Serve has not stopped a %s replica %.0f s after a scale-in; %s "
                            "serves again", pool, STOP_WAIT_S, rid)
                del self._drained[pool]
                await self._undrain(pool, rid)

    async def _undrain(self, pool: str, replica_id: str) -> None:
        try:
            await self.handles[pool].undrain.remote(target=replica_id)
        except Exception as e:  # noqa: BLE001 - gone after all: nothing to undo
            log.info("undrain of %s: %s", replica_id, e)

    # ---- by hand -------------------------------------------------------------------------------
    async def scale(self, pool: str, replicas: int, reason: str = "by hand") -> dict:
        """Set a pool's replica count now (the console's control); the autoscaler, if on,
        counts it as a change (cooldowns apply) and keeps it within min/max."""
        self._check_pool(pool)
        if replicas < 1:
            raise ValueError(f"replicas={replicas}: need at least 1")
        async with self._lock:
            info = await self.pools.info(pool)
            action = "out" if replicas > info.target else "in" if replicas < info.target \
                else "hold"
            rec = {"t": time.time(), "pool": pool, "source": "operator", "target": replicas,
                   "current": info.target, "action": action,
                   "reason": f"{reason}: {info.target} -> {replicas}", "signals": {}}
            st = self._state.get(pool)
            if st is not None:
                st["changed_at"], st["out_since"], st["in_since"] = self.clock(), None, None
            log.info("scaling %s: %s", pool, rec["reason"])
            if action == "in":  # one at a time, each drained first
                for n in range(info.target - 1, replicas - 1, -1):
                    info = await self.pools.info(pool)
                    await self._apply(pool, info, n, dict(rec, target=n))
                    if pool in self._drained:
                        await self._wait_stopped(pool)
                return rec
            await self._apply(pool, info, replicas, rec)
            return rec

    async def _wait_stopped(self, pool: str, timeout_s: float = 30.0) -> None:
        deadline = self.clock() + timeout_s
        while pool in self._drained and self.clock() < deadline:
            info = await self.pools.info(pool)
            await self._settle_drains({pool: info})
            await asyncio.sleep(0.2)

    # ---- state for the console -----------------------------------------------------------
    def state(self) -> dict:
        return {"enabled": self.enabled, "interval_s": self.interval_s,
                "slo": {"ttft_s": self.base.ttft_slo_s, "tpot_s": self.base.tpot_slo_s},
                "limits": {p: asdict(v) for p, v in self.limits.items()},
                "last": self.last, "decisions": list(self.decisions)[-100:]}
