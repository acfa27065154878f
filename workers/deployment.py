"""The Ray Serve deployment for pool instances: a thin adapter over ``Instance``.

One class serves every role; ``cluster.app.build_app`` binds it once per pool. Requests reach
a *specific* replica by passing ``target=<instance id>`` (the pool's request router, see
``pdserve.router.replica_router``, honours it); untargeted requests go where the routing
policy says, using the stats each replica reports through ``record_routing_stats``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

import torch
from ray import serve

from pdserve.kvtransfer import KVLayout, PeerId

from .config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from .instance import Instance
from .messages import ChannelOffer, Job, PrefillResult, ReceiveDescriptor, TokenChunk

log = logging.getLogger(__name__)


class PoolWorker:
    """Serve replica of one pool (prefill, decode or colocated)."""

    def __init__(self, app_config: dict, role: str, model_path: str, decode_handle=None) -> None:
        pool = app_config[role]
        threads = max(1, int(pool["cpus"]))
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        mc = ModelConfig.from_path(model_path, app_config["dtype"])
        cfg = EngineConfig(
            mc,
            CacheConfig(block_size=app_config["block_size"], memory_bytes=pool["kv_cache_memory"],
                        num_blocks=pool["num_blocks"]),
            SchedulerConfig(role=role, max_num_seqs=pool["max_num_seqs"],
                            max_num_batched_tokens=pool["max_num_batched_tokens"],
                            chunked_prefill=pool["chunked_prefill"],
                            max_waiting=pool["max_waiting"]),
            num_threads=threads,
        )
        ctx = serve.get_replica_context()
        self.instance_id = ctx.replica_id.unique_id
        self.decode = decode_handle
        kv = app_config["kv_transfer"]
        self.inst = Instance(cfg, self.instance_id, host=_channel_host(),
                             transfer_timeout_s=kv["timeout_s"], compress=kv["compress"],
                             expect_peer=self._expect_peer)
        log.info("pdserve %s instance %s ready", role, self.instance_id)

    # Called from a worker thread inside Instance.prefill (never on the event loop).
    def _expect_peer(self, desc: ReceiveDescriptor, src: PeerId, layout: KVLayout,
                     has_channel: bool) -> ChannelOffer | None:
        resp = self.decode.expect.remote(desc.request_id, src, layout, has_channel,
                                         target=desc.decode.instance_id)
        return resp.result(timeout_s=self.inst.timeout)

    # ---- control plane ---------------------------------------------------------------------
    async def info(self, target: str | None = None):
        return self.inst.info

    async def reserve(self, job: Job, target: str | None = None) -> ReceiveDescriptor:
        return self.inst.reserve(job)

    async def expect(self, request_id: str, src: PeerId, layout: KVLayout, has_channel: bool,
                     target: str | None = None) -> ChannelOffer | None:
        return self.inst.expect(request_id, src, layout, has_channel)

    async def prefill(self, job: Job, desc: ReceiveDescriptor, target: str | None = None
                      ) -> PrefillResult:
        return await self.inst.prefill(job, desc)

    async def generate(self, request_id: str, first_token: int, logprobs=None,
                       target: str | None = None) -> AsyncIterator[TokenChunk]:
        async for c in self.inst.generate(request_id, first_token, logprobs):
            yield c

    async def generate_full(self, job: Job, target: str | None = None) -> AsyncIterator[TokenChunk]:
        async for c in self.inst.generate_full(job):
            yield c

    async def abort(self, request_id: str, target: str | None = None) -> None:
        self.inst.abort(request_id)

    async def stats(self, target: str | None = None):
        return self.inst.stats()

    async def transfers(self, target: str | None = None) -> list[dict]:
        return list(self.inst.transfer_log)

    def record_routing_stats(self) -> dict:
        return self.inst.stats().as_routing_stats()

    def check_health(self) -> None:
        if not self.inst.aengine._thread.is_alive():
            raise RuntimeError("engine loop thread died")

    def __del__(self) -> None:
        inst = getattr(self, "inst", None)
        if inst is not None:
            inst.shutdown()


def _channel_host() -> str:
    """The address KV channels bind to: this node's Ray address (127.0.0.1 locally)."""
    import ray

    return ray.util.get_node_ip_address()
