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

            orch.migrator = MigrationController(decode, app_config.get("migration") or {}).start()
        _front = Frontend.for_app(app_config, load_tokenizer(model_path), model_name,
                                  mc.max_position_embeddings, mc.vocab_size, orch)
        self.front = _front
        # The ops console's state and the scaling controller (measures the pools; scales them
        # when autoscaling is on), on this replica's event loop.
        from .console import Ops

        pools = {"colocated": colocated} if colocated is not None else \
            {"prefill": prefill, "decode": decode}
        _front.ops = Ops(_front, app_config, orch.app_name, pools).start()
        # Started here: Serve runs the constructor on the replica's event loop, which serves it.
        self.grpc = GrpcServer(_front, r["host"], r["grpc_port"]).start() \
            if r.get("grpc_port") else None
        log.info("pdserve router ready (%s mode)", app_config["mode"])
