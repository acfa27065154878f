"""Building a Serve application from a Serve config the way Serve does, without running it.

``serve deploy`` / a RayService hand Serve an application entry (import_path + args); the
controller imports the builder, calls it with the args, and builds the bound graph into
deployments. ``build_from_config`` does those same three steps in this process (no Ray
cluster is started), and ``check_built`` compares the deployments with the pdserve config
that produced them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from pdserve.cluster.config import AppConfig

if TYPE_CHECKING:
    from ray.serve._private.build_app import BuiltApplication
    from ray.serve.deployment import Deployment


def build_from_config(app_entry: dict[str, Any], model_path: str) -> BuiltApplication:
    """Build one ``applications[]`` entry with its ``model`` replaced by ``model_path``.

    A config with a tensor-parallel pool skips (with the reason) while ``build_app`` still
    refuses tp != 1; once TP pools are wired the same call builds it and is checked."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    args = {**app_entry.get("args", {}), "model": model_path}
    builder = import_attr(app_entry["import_path"])
    try:
        app = call_user_app_builder_with_args_if_necessary(builder, args)
    except NotImplementedError as e:
        if "tensor-parallel" not in str(e):
            raise
        pytest.skip(f"build_app does not build TP pools yet: {e}")
    return build_app(app, name=app_entry.get("name", "default"),
                     route_prefix=app_entry.get("route_prefix", "/"))


def replica_cpus(deployment: Deployment) -> float:
    """Ray CPUs one replica of ``deployment`` reserves: its placement group's bundles when it
    has one (a TP replica reserves one bundle per rank), else its actor's num_cpus."""
    bundles = deployment._replica_config.placement_group_bundles
    if bundles:
        return float(sum(b.get("CPU", 0) for b in bundles))
    return float((deployment.ray_actor_options or {}).get("num_cpus", 1))


def check_built(built: BuiltApplication, cfg: AppConfig,
                overrides: list[dict[str, Any]] | None = None) -> None:
    """The built app has the router as ingress and one deployment per pool, each with the
    pool's replica count and tp * cpus Ray CPUs per replica; config overrides
    (``deployments:``) name deployments that exist."""
    deps = {d.name: d for d in built.deployments}
    assert built.ingress_deployment_name == "router"
    assert set(deps) == {"router", *cfg.pools}, sorted(deps)
    for name, pool in cfg.pools.items():
        d = deps[name]
        assert d.num_replicas == pool.replicas, (name, d.num_replicas, pool.replicas)
        assert replica_cpus(d) == pytest.approx(pool.tp * pool.cpus), (name, replica_cpus(d))
    for o in overrides or []:
        assert o["name"] in deps, f"deployments: override of {o['name']!r}, which the app lacks"
