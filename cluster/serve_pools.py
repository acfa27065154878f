"""What Ray Serve knows and controls about the pools: their replicas and replica counts.

Replica counts are changed through Serve's *external scaler* API (Ray 2.60:
``ServeController.update_deployment_replicas``, the call behind the dashboard's
``POST /api/v1/applications/{app}/deployments/{name}/scale``). It only works for an app
started with ``serve.run(..., external_scaler_enabled=True)`` (``external_scaler_enabled:
true`` in a Serve config file); pdserve's launchers do that. It is a count-only change:
Serve keeps the deployment's version, so no running replica restarts.

Why not Serve's custom autoscaling policy hook (``AutoscalingConfig.policy``, which Ray 2.60
has): the policy runs inside the Serve controller, which picks *which* replica to stop on
scale-in, so a decode replica could not be drained first; and the policy could not see what
the router measures (TTFT/TPOT, arrivals) nor share its decisions with the console without
another channel. See ``cluster/scaling.py``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


class ScalingUnavailable(RuntimeError):
    """Serve refused to change a replica count (e.g. the app lacks external scaling)."""


@dataclass(frozen=True)
class ReplicaInfo:
    replica_id: str  # the Serve replica's unique id = pdserve's instance id
    state: str  # Serve's replica state: STARTING, RUNNING, STOPPING, ...
    start_time_s: float  # wall clock
    pid: int | None = None


@dataclass(frozen=True)
class PoolInfo:
    name: str  # the deployment (= pool role)
    target: int  # replicas Serve is asked to run
    replicas: tuple[ReplicaInfo, ...]

    @property
    def running(self) -> tuple[ReplicaInfo, ...]:
        return tuple(r for r in self.replicas if r.state == "RUNNING")


class ServePools:
    """The Serve deployments of one pdserve app. Every call goes to the Serve controller
    actor (a Ray call; async, safe on the router's event loop)."""

    def __init__(self, app_name: str, pools: list[str]) -> None:
        self.app_name = app_name
        self.pools = list(pools)

    @staticmethod
    def _controller():
        from ray.serve.context import _get_global_client

        return _get_global_client()._controller

    async def info(self, pool: str) -> PoolInfo:
        try:
            d = await self._controller().get_deployment_details.remote(self.app_name, pool)
        except Exception as e:  # noqa: BLE001 - KeyError while the app is still deploying
            raise ScalingUnavailable(f"pool {pool!r} of app {self.app_name!r} is not "
                                     f"deployed yet ({type(e).__name__})") from None
        reps = tuple(ReplicaInfo(r.replica_id, str(getattr(r.state, "value", r.state)),
                                 float(r.start_time_s), r.pid) for r in d.replicas)
        return PoolInfo(pool, int(d.target_num_replicas), reps)

    async def all(self) -> dict[str, PoolInfo]:
        infos = await asyncio.gather(*(self.info(p) for p in self.pools))
        return dict(zip(self.pools, infos))

    async def set_target(self, pool: str, replicas: int) -> None:
        from ray.serve._private.common import DeploymentID

        if pool not in self.pools:
            raise ValueError(f"pool {pool!r} is not one of {', '.join(self.pools)}")
        try:
            await self._controller().update_deployment_replicas.remote(
                DeploymentID(name=pool, app_name=self.app_name), int(replicas))
        except Exception as e:
            if "external_scaler_enabled" in str(e):
                raise ScalingUnavailable(
                    f"Serve refuses to scale app {self.app_name!r}: start it with "
                    "serve.run(..., external_scaler_enabled=True) or `external_scaler_enabled: "
                    "true` in the Serve config (pdserve up does)") from None
            raise
