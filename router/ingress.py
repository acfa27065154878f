"""The router's Serve ingress deployment: the FastAPI app (HTTP, through Serve's proxy) and,
with ``router.grpc_port``, the gRPC API (``grpc_service.GrpcServer``, served by this replica
on ``router.host``), both over one ``Frontend`` and the orchestrator."""

from __future__ import annotations

import logging

from pdserve.workers.config import ModelConfig
from pdserve.workers.llm import load_tokenizer
from ray import serve

from .api import build_fastapi
from .frontend import Frontend
from .grpc_service import GrpcServer
from .orchestrator import Orchestrator

log = logging.getLogger(__name__)

_front: Frontend | None = None


def _current_front() -> Frontend:
    # Looked up through the module at call time: the FastAPI app is pickled into the replica,
    # so a closure over this module's globals would see the driver's (empty) copy.
    from pdserve.router import ingress

    if ingress._front is None:
        raise RuntimeError("the router is still starting")
    return ingress._front


app = build_fastapi(_current_front)


def _own_handle(pool: str, app_name: str):
    """A handle of its own for a control loop (scaling, migration). Serve keeps routing state
    per handle; control loops time out and cancel calls to busy replicas, and a handle that
    cancelled calls already assigned to a replica was seen to stop delivering calls to it —
    that must never stall the request path's handles."""
    return serve.get_deployment_handle(pool, app_name=app_name)


@serve.ingress(app)
class Router:
    def __init__(self, app_config: dict, model_path: str, model_name: str,
                 prefill=None, decode=None, colocated=None) -> None:
        global _front
        mc = ModelConfig.from_path(model_path)
        r = app_config["router"]
        index = None
        if app_config.get("redis_url"):
            from pdserve.cluster.metadata import MetadataStore

            index = MetadataStore(app_config["redis_url"])
        orch = Orchestrator(app_config["mode"], prefill, decode, colocated,
                            timeout_s=app_config["kv_transfer"]["timeout_s"], retries=r["retries"],
                            index=index, block_size=app_config["block_size"],
                            salt=f"{mc.path}|{app_config['dtype']}")
        orch.app_name = serve.get_replica_context().app_name
        # Live migration between decode instances (triggers + drain), on this replica's loop.
        if decode is not None:
            from .migration import MigrationController

            mig = app_config.get("migration") or {}
            orch.migrator = MigrationController(_own_handle("decode", orch.app_name), mig).start()
            orch.connect_early = bool(mig.get("connect_early", False))
        _front = Frontend.for_app(app_config, load_tokenizer(model_path), model_name,
                                  mc.max_position_embeddings, mc.vocab_size, orch)
        self.front = _front
        # The ops console's state and the scaling controller (measures the pools; scales them
        # when autoscaling is on), on this replica's event loop.
        from .console import Ops

        names = ["colocated"] if colocated is not None else ["prefill", "decode"]
        pools = {n: _own_handle(n, orch.app_name) for n in names}
        _front.ops = Ops(_front, app_config, orch.app_name, pools).start()
        # Started here: Serve runs the constructor on the replica's event loop, which serves it.
        self.grpc = GrpcServer(_front, r["host"], r["grpc_port"]).start() \
            if r.get("grpc_port") else None
        log.info("pdserve router ready (%s mode)", app_config["mode"])
