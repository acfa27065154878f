"""``build_app(config)``: the one place the Serve application graph is built and validated.

The same function backs ``pdserve up``, ``serve run deploy/serve.yaml`` (Serve passes the
YAML ``args`` as a dict) and the Helm chart's RayService.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from pdserve.router.ingress import Router
from pdserve.router.replica_router import InstanceRouter
from pdserve.workers.config import ModelConfig
from pdserve.workers.deployment import PoolWorker
from pdserve.workers.model_store import DEFAULT_MODEL, resolve_model

from .config import AppConfig
from .metadata import IndexPublisher

STATS_PERIOD_S = 0.5  # how often replicas report routing stats to the routers


def _pool(cfg: AppConfig, role: str, model_path: str, decode_handle=None):
    pool = cfg.pools[role]
    tp_opts = {}
    actor = {"num_cpus": pool.cpus if pool.tp > 1 else pool.cpus * pool.tp,
             **_placement(pool.resources, pool.node_labels)}
    if pool.tp > 1:  # the replica is rank 0 in bundle 0; ranks 1.. take the other bundles
        bundles = [{"CPU": pool.cpus} for _ in range(pool.tp)]
        bundles[0].update(pool.resources)  # the replica's own custom resources
        tp_opts = {"placement_group_bundles": bundles, "placement_group_strategy": "STRICT_PACK"}
        if pool.node_labels:
            tp_opts["placement_group_bundle_label_selector"] = [dict(pool.node_labels)] * pool.tp
    return serve.deployment(PoolWorker).options(
        name=role,
        num_replicas=pool.replicas,
        ray_actor_options=actor,
        **tp_opts,
        max_ongoing_requests=100_000,  # admission is the engine's bounded queue, not Serve's
        request_router_config=RequestRouterConfig(
            request_router_class=InstanceRouter,
            request_router_kwargs={"policy": cfg.router.policy, "role": role,
                                   "prefix_weight": cfg.router.prefix_weight},
            request_routing_stats_period_s=STATS_PERIOD_S,
            request_routing_stats_timeout_s=5.0,
        ),
        health_check_period_s=5.0,
        graceful_shutdown_timeout_s=5.0,
    ).bind(cfg.to_dict(), role, model_path, decode_handle,
           IndexPublisher(cfg.redis_url) if cfg.redis_url else None)


def _placement(resources: dict[str, float], labels: dict[str, str]) -> dict:
    """Ray actor options that pin a replica to the nodes with these custom resources and
    labels (multi-node clusters; empty on one machine)."""
    out: dict = {}
    if resources:
        out["resources"] = dict(resources)
    if labels:
        out["label_selector"] = dict(labels)
    return out


def build_app(config: AppConfig | dict[str, Any] | None = None):
    cfg = config if isinstance(config, AppConfig) else AppConfig.from_dict(config)
    model_path = str(resolve_model(cfg.model))
    mc = ModelConfig.from_path(model_path)
    cfg.check_model(mc.num_heads, mc.num_kv_heads)
    name = DEFAULT_MODEL if cfg.model is None or cfg.model.lower() in ("smollm2", DEFAULT_MODEL.lower()) \
        else cfg.model.rstrip("/").split("/")[-1]
    router_actor = {"num_cpus": 0, **_placement(cfg.router.resources, cfg.router.node_labels)}
    router = serve.deployment(Router).options(name="router", num_replicas=1,
                                              ray_actor_options=router_actor,
                                              max_ongoing_requests=100_000)
    if cfg.mode == "colocated":
        colo = _pool(cfg, "colocated", model_path)
        return router.bind(cfg.to_dict(), model_path, name, colocated=colo)
    decode = _pool(cfg, "decode", model_path)
    prefill = _pool(cfg, "prefill", model_path, decode)
    return router.bind(cfg.to_dict(), model_path, name, prefill=prefill, decode=decode)
