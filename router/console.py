"""The ops console: ``GET /console`` (a page, its script and the vendored uPlot charting
library, all served from ``router/static``: the browser needs no internet), its live state
as JSON (``GET /console/api/state``) and the controls, which sit under ``/admin`` so the
``Guard`` asks for the admin token:

    POST /admin/slo          {"ttft_s": 0.5, "tpot_s": 0.05}
    POST /admin/scale        {"pool": "decode", "replicas": 2}      (scale-in drains first)
    POST /admin/autoscaling  {"enabled": true, "pool": "decode", "min_replicas": 1,
                              "max_replicas": 3}                      (every key optional)

Draining a replica and switching migration on/off are the migration module's endpoints
(``POST /admin/drain``, ``POST /admin/migration``); the page calls them.

``Ops`` is the router replica's operating state: the scaling controller (which measures the
pools every ``autoscaling.interval_s`` and, when enabled, scales them), the SLO window, and
a history of samples for the charts.
"""

# No ``from __future__ import annotations`` here: FastAPI resolves the request models from
# the endpoints' annotations inside the replica, where the closures arrive by value
# (cloudpickle) without the module globals that string annotations would need.
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse
from pdserve.cluster.scaling import ScalingController
from pdserve.cluster.serve_pools import ScalingUnavailable, ServePools
from pydantic import BaseModel, ConfigDict, Field

from . import metrics
from .errors import BadRequest, ServiceUnavailable

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
_FILES = {"console.js": "text/javascript", "console.css": "text/css",
          "uPlot.iife.min.js": "text/javascript", "uPlot.min.css": "text/css"}
HISTORY = 600  # samples kept for the charts (one per controller round)


class Ops:
    """The controller, the history of samples, and what the console's JSON says."""

    def __init__(self, front: Any, app_config: dict, app_name: str,
                 handles: dict[str, Any]) -> None:
        self.front = front
        self.cfg = app_config
        self.mode = app_config["mode"]
        self.max_num_seqs = {p: app_config[p]["max_num_seqs"] for p in handles}
        metrics.WINDOW.ttft_s = app_config["slo"]["ttft_s"]
        metrics.WINDOW.tpot_s = app_config["slo"]["tpot_s"]
        self.history: deque[dict] = deque(maxlen=HISTORY)
        self._last: tuple[float, dict, int] | None = None  # (t, orchestrator stats, bytes)
        self.controller = ScalingController(
            ServePools(app_name, list(handles)), handles, app_config, signals=self.signals,
            drain=self._drain, on_decision=metrics.observe_decision, on_tick=self._on_tick)

    def start(self) -> "Ops":
        self.controller.start()
        return self

    # ---- what the controller reads and does ---------------------------------------------------
    def signals(self) -> dict[str, float | None]:
        """The router's measurements for the autoscaler: mean TPOT over the SLO window, and
        prompt tokens arriving per second over the last history interval."""
        s = metrics.WINDOW.summary()
        rate = self.history[-1].get("prompt_tokens_per_s") if self.history else None
        return {"tpot_s": s["tpot_mean"], "prompt_tokens_per_s": rate}

    async def _drain(self, instance_id: str) -> int:
        """Drain a decode instance: the migration module's drain when the orchestrator has it
        (live migration), else the instance's own (hand its requests back for recovery)."""
        migrator = getattr(self.front.orch, "migrator", None)
        if migrator is not None:
            return int((await migrator.drain(instance_id))[0])
        return int(await self.controller.handles["decode"].drain.remote(target=instance_id))

    def migration(self) -> dict | None:
        m = getattr(self.front.orch, "migrator", None)
        return m.snapshot() if m is not None else None

    def _on_tick(self, c: ScalingController) -> None:
        adm = self.front.admission
        metrics.observe_pools(c.snapshot, adm.stats(), c.transfer_bytes, c.transfer_seconds)
        metrics.observe_migration(self.migration())
        for pool, p in c.snapshot.items():  # admission follows the replicas that serve
            gate = adm.gates.get(pool)
            live = sum(r["state"] == "RUNNING" for r in p["replicas"])
            if gate is not None and live:
                gate.resize(live * self.max_num_seqs[pool])
        self.history.append(self._sample(c))

    def _sample(self, c: ScalingController) -> dict:
        now = time.time()
        orch = dict(self.front.orch.stats)
        w = metrics.WINDOW.summary()
        rate = ptok = tput = None
        if self._last is not None:
            t0, o0, b0 = self._last
            dt = max(1e-6, now - t0)
            rate = (orch.get("requests", 0) - o0.get("requests", 0)) / dt
            ptok = (orch.get("prompt_tokens", 0) - o0.get("prompt_tokens", 0)) / dt
            tput = (c.transfer_bytes - b0) / dt
        self._last = (now, orch, c.transfer_bytes)
        pools = {}
        for pool, p in c.snapshot.items():
            reps = p["replicas"]
            used = sum(r["kv_blocks_used"] for r in reps)
            total = sum(r["kv_blocks_total"] for r in reps)
            pools[pool] = {"target": p["target"],
                           "running": sum(r["state"] in ("RUNNING", "DRAINING") for r in reps),
                           "batch": sum(r["running"] for r in reps),
                           "queue": sum(r["waiting"] for r in reps),
                           "kv_util": used / total if total else None}
        q = sum(r["prefix_query_tokens"] for p in c.snapshot.values() for r in p["replicas"])
        h = sum(r["prefix_hit_tokens"] for p in c.snapshot.values() for r in p["replicas"])
        return {"t": now, "rate": rate, "prompt_tokens_per_s": ptok,
                "ttft_p50": w["ttft"]["p50"], "ttft_p99": w["ttft"]["p99"],
                "tpot_p50": w["tpot"]["p50"], "tpot_p99": w["tpot"]["p99"],
                "attainment": w["attainment"]["both"], "prefix_hit_rate": h / q if q else None,
                "transfer_bytes_per_s": tput, "recoveries": orch.get("recoveries", 0),
                "migrations": (self.migration() or {}).get("migrations"),
                "retries": orch.get("retries", 0), "pools": pools}

    # ---- the JSON --------------------------------------------------------------------------
    def state(self) -> dict:
        c = self.controller
        orch = {k: v for k, v in dict(self.front.orch.stats).items()}
        return {"now": time.time(), "mode": self.mode, "model": self.front.model_name,
                "admin_enabled": getattr(self.front.auth, "_admin", None) is not None,
                "pools": c.snapshot, "snapshot_at": c.snapshot_at,
                "autoscaling": c.state(), "window": metrics.WINDOW.summary(),
                "orchestrator": orch, "admission": self.front.admission.stats(),
                "migration": self.migration(), "transfer_bytes": c.transfer_bytes,
                "history": list(self.history)}


class SloBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttft_s: float | None = Field(None, gt=0, description="TTFT target, seconds")
    tpot_s: float | None = Field(None, gt=0, description="TPOT target, seconds")


class ScaleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pool: str
    replicas: int = Field(ge=1, le=64)


class AutoscalingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = None
    pool: str | None = None
    min_replicas: int | None = Field(None, ge=1, le=64)
    max_replicas: int | None = Field(None, ge=1, le=64)


def build_console(front_getter: Callable[[], Any]) -> APIRouter:
    """The console's routes; ``front_getter().ops`` is the replica's ``Ops``."""
    r = APIRouter()

    def ops() -> "Ops":
        try:
            o = getattr(front_getter(), "ops", None)
        except RuntimeError:
            o = None
        if o is None:
            raise ServiceUnavailable("the router is still starting; retry in a few seconds")
        return o

    @r.get("/console", include_in_schema=False)
    async def page():
        return HTMLResponse((STATIC / "console.html").read_text())

    @r.get("/console/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in _FILES:
            raise HTTPException(404, f"no console file {name!r}")
        return FileResponse(STATIC / name, media_type=_FILES[name],
                            headers={"Cache-Control": "max-age=3600"})

    @r.get("/console/api/state", include_in_schema=False)
    async def state():
        return ops().state()

    @r.post("/admin/slo", include_in_schema=False)
    async def set_slo(body: SloBody):
        """Set the SLO targets (autoscaler and attainment both use them)."""
        o = ops()
        o.controller.set_slo(body.ttft_s, body.tpot_s)
        metrics.WINDOW.ttft_s = o.controller.base.ttft_slo_s
        metrics.WINDOW.tpot_s = o.controller.base.tpot_slo_s
        log.info("SLO targets set: TTFT %.3g s, TPOT %.3g s", metrics.WINDOW.ttft_s,
                 metrics.WINDOW.tpot_s)
        return o.controller.state()["slo"]

    @r.post("/admin/scale", include_in_schema=False)
    async def scale(body: ScaleBody):
        """Scale a pool by hand (a decode replica is drained before it is removed)."""
        o = ops()
        try:
            return await o.controller.scale(body.pool, body.replicas)
        except ValueError as e:
            raise BadRequest(str(e), "pool") from None
        except ScalingUnavailable as e:
            raise ServiceUnavailable(str(e)) from None

    @r.post("/admin/autoscaling", include_in_schema=False)
    async def autoscaling(body: AutoscalingBody):
        """Switch autoscaling on/off and set a pool's min/max replicas."""
        c = ops().controller
        if body.min_replicas is not None or body.max_replicas is not None:
            if body.pool is None:
                raise BadRequest("say which pool the min/max replicas are for", "pool")
            try:
                c.set_limits(body.pool, body.min_replicas, body.max_replicas)
            except ValueError as e:
                raise BadRequest(str(e), "min_replicas") from None
        if body.enabled is not None:
            c.enabled = body.enabled
            log.info("autoscaling switched %s", "on" if body.enabled else "off")
        return c.state()

    return r
