"""The Ray Serve deployment for pool instances: a thin adapter over ``Instance``.

One class serves every role; ``cluster.app.build_app`` binds it once per pool. Requests reach
a *specific* replica by passing ``target=<instance id>`` (the pool's request router, see
``pdserve.router.replica_router``, honours it); untargeted requests go where the routing
policy says, using the stats each replica reports through ``record_routing_stats``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

import torch
from ray import serve

from pdserve.kvtransfer import KVLayout, PeerId

from .config import CacheConfig, ChunkConfig, EngineConfig, ModelConfig, SchedulerConfig
from .instance import Instance
from .messages import (
    ChannelOffer,
    Job,
    MigrationState,
    MigrationTicket,
    PrefillResult,
    ReceiveDescriptor,
    TokenChunk,
)
from .migration import MigrationError

log = logging.getLogger(__name__)


class PoolWorker:
    """Serve replica of one pool (prefill, decode or colocated)."""

    def __init__(self, app_config: dict, role: str, model_path: str, decode_handle=None,
                 index_publisher=None) -> None:
        pool = app_config[role]
        threads = max(1, int(pool["cpus"]))
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        mc = ModelConfig.from_path(model_path, app_config["dtype"])
        cfg = EngineConfig(
            mc,
            CacheConfig(block_size=app_config["block_size"], memory_bytes=pool["kv_cache_memory"],
                        num_blocks=pool["num_blocks"], prefix_caching=pool["prefix_caching"]),
            SchedulerConfig(role=role, max_num_seqs=pool["max_num_seqs"],
                            max_num_batched_tokens=pool["max_num_batched_tokens"],
                            chunked_prefill=pool["chunked_prefill"],
                            max_waiting=pool["max_waiting"]),
            num_threads=threads,
            chunks=ChunkConfig(**app_config.get("chunks", {})),
        )
        self.allow_faults = bool(app_config.get("testing_faults"))
        ctx = serve.get_replica_context()
        self.instance_id = ctx.replica_id.unique_id
        if decode_handle is None and role == "decode":  # live migration: decode to decode
            decode_handle = serve.get_deployment_handle(ctx.deployment, app_name=ctx.app_name)
        self.decode = decode_handle
        kv = app_config["kv_transfer"]
        engine = None
        if pool["tp"] > 1:
            from .parallel import ParallelConfig
            from .tp_engine import make_engine

            engine = make_engine(cfg, ParallelConfig(tp=pool["tp"], cpus_per_rank=pool["cpus"]))
        self.inst = Instance(cfg, self.instance_id, host=_channel_host(),
                             transfer_timeout_s=kv["timeout_s"], compress=kv["compress"],
                             peers=_ServePeers(decode_handle, kv["timeout_s"]), engine=engine)
        self.inst.migrations.announce = bool((app_config.get("migration") or {})
                                             .get("connect_early", False))
        # The global prefix index (Redis) is optional and duck-typed: this package never
        # imports cluster code; build_app hands us a publisher (cluster.metadata).
        self.publisher = None
        if index_publisher is not None:
            inst = self.inst
            cp = getattr(inst.engine, "chunk_prefill", None)  # RAG chunk store, if any
            self.publisher = index_publisher.start(
                self.instance_id, role, inst.info.epoch,
                lambda: inst.aengine.call(lambda e: e.blocks.cached_hashes()),
                (lambda: inst.aengine.call(lambda e: cp.store.hashes())) if cp else None)
            blocks = inst.engine.blocks
            blocks.on_cached, blocks.on_evicted = self.publisher.cached, self.publisher.evicted
            if cp is not None:
                cp.store.on_stored = self.publisher.chunk_cached
                cp.store.on_evicted = self.publisher.chunk_evicted
        log.info("pdserve %s instance %s ready", role, self.instance_id)

    # ---- control plane ---------------------------------------------------------------------
    async def info(self, target: str | None = None):
        return self.inst.info

    async def reserve(self, job: Job, target: str | None = None, routing=None
                      ) -> ReceiveDescriptor:
        return self.inst.reserve(job)

    async def open_channel(self, src: PeerId, target: str | None = None, rank: int = 0
                           ) -> ChannelOffer:
        # a TP rank > 0 is reached over a Ray call: keep it off the event loop
        return await asyncio.to_thread(self.inst.open_channel, src, rank)

    async def expect(self, request_id: str, src: PeerId, layout: KVLayout,
                     target: str | None = None) -> None:
        self.inst.expect(request_id, src, layout)

    async def prefill(self, job: Job, desc: ReceiveDescriptor, target: str | None = None,
                      routing=None) -> PrefillResult:
        return await self.inst.prefill(job, desc)

    async def generate(self, request_id: str, first_token: int, logprobs=None,
                       target: str | None = None) -> AsyncIterator[TokenChunk]:
        async for c in self.inst.generate(request_id, first_token, logprobs):
            yield c

    async def generate_full(self, job: Job, target: str | None = None, routing=None
                            ) -> AsyncIterator[TokenChunk]:
        async for c in self.inst.generate_full(job):
            yield c

    async def abort(self, request_id: str, target: str | None = None) -> None:
        self.inst.abort(request_id)

    async def drain(self, dests: list[str] | None = None, target: str | None = None) -> int:
        """Stop taking requests; live-migrate the running ones to ``dests`` (else hand them
        back to the router for recompute)."""
        return await asyncio.to_thread(self.inst.drain, dests)

    # ---- live migration (workers/migration.py) -----------------------------------------------
    async def migrate(self, request_id: str | None, dest: str, reason: str = "admin",
                      target: str | None = None) -> dict:
        """Move a decoding request (None: the one with the fewest KV blocks) to ``dest``."""
        if request_id is None:
            request_id = self.inst.aengine.call(_smallest_running)
            if request_id is None:
                raise MigrationError(f"{self.instance_id} has no decoding request to migrate")
        return await asyncio.to_thread(self.inst.migrations.migrate, request_id, dest, reason)

    async def migrate_reserve(self, request_id: str, num_tokens: int,
                              target: str | None = None) -> MigrationTicket:
        return self.inst.migrations.reserve(request_id, num_tokens)

    async def migrate_extend(self, request_id: str, num_blocks: int,
                             target: str | None = None) -> MigrationTicket:
        return self.inst.migrations.extend(request_id, num_blocks)

    async def migrate_expect(self, request_id: str, tag: str, src: PeerId, layout: KVLayout,
                             first: int, count: int, target: str | None = None) -> int:
        return self.inst.migrations.expect(request_id, tag, src, layout, first, count)

    async def migrate_commit(self, state: MigrationState, target: str | None = None) -> None:
        self.inst.migrations.commit(state, asyncio.get_running_loop())

    async def migrate_cancel(self, request_id: str, target: str | None = None) -> None:
        self.inst.migrations.cancel(request_id)

    async def resume(self, request_id: str, target: str | None = None
                     ) -> AsyncIterator[TokenChunk]:
        async for c in self.inst.resume(request_id):
            yield c

    async def migrations(self, target: str | None = None) -> dict:
        m = self.inst.migrations
        return {"counts": dict(m.counts), "log": list(m.log)}

    async def undrain(self, target: str | None = None) -> None:
        self.inst.undrain()

    async def stats(self, target: str | None = None):
        return self.inst.stats()

    async def transfers(self, target: str | None = None) -> list[dict]:
        return list(self.inst.transfer_log)

    async def inject_fault(self, name: str, count: int = 1, target: str | None = None) -> None:
        """Test hook: make the next ``count`` operations of kind ``name`` fail (see
        ``Instance.faults``). Only when the app config enables it (``testing_faults``)."""
        if not self.allow_faults:
            raise PermissionError("fault injection is disabled (testing_faults: false)")
        self.inst.faults[name] = count

    def record_routing_stats(self) -> dict:
        return self.inst.stats().as_routing_stats()

    def check_health(self) -> None:
        if not self.inst.aengine._thread.is_alive():
            raise RuntimeError("engine loop thread died")

    def __del__(self) -> None:
        pub = getattr(self, "publisher", None)
        if pub is not None:
            pub.stop()
        inst = getattr(self, "inst", None)
        if inst is not None:
            inst.shutdown()


def _smallest_running(e) -> str | None:
    reqs = [r for r in e.scheduler.running if not r.in_prefill]
    return min(reqs, key=lambda r: r.num_tokens).request_id if reqs else None


class _ServePeers:
    """``Instance.peers`` over targeted Serve calls to the decode pool. Called from worker
    threads (``Instance.prefill``, ``Migrations.migrate``), never on the event loop, hence
    ``.result()``. A decode replica gets a handle to its own pool (live migration talks
    decode to decode), made in its constructor: on the replica's event loop, where Serve
    handles must be created (one made lazily in a worker thread never delivered a call)."""

    def __init__(self, decode_handle, timeout_s: float) -> None:
        self._decode = decode_handle
        self.timeout = timeout_s

    @property
    def decode(self):
        if self._decode is None:
            raise RuntimeError("no handle to the decode pool")
        return self._decode

    def _call(self, method: str, *args, target: str, **kwargs):
        return getattr(self.decode, method).remote(*args, target=target, **kwargs).result(
            timeout_s=self.timeout)

    def info(self, instance_id: str):
        return self._call("info", target=instance_id)

    def migrate_reserve(self, instance_id: str, request_id: str, num_tokens: int):
        return self._call("migrate_reserve", request_id, num_tokens, target=instance_id)

    def migrate_expect(self, instance_id: str, request_id: str, tag: str, src: PeerId,
                       layout: KVLayout, first: int, count: int) -> int:
        return self._call("migrate_expect", request_id, tag, src, layout, first, count,
                          target=instance_id)

    def migrate_extend(self, instance_id: str, request_id: str, num_blocks: int):
        return self._call("migrate_extend", request_id, num_blocks, target=instance_id)

    def migrate_commit(self, instance_id: str, state: MigrationState) -> None:
        self._call("migrate_commit", state, target=instance_id)

    def migrate_cancel(self, instance_id: str, request_id: str) -> None:
        self._call("migrate_cancel", request_id, target=instance_id)

    def open_channel(self, peer: PeerId, src: PeerId) -> ChannelOffer:
        return self._call("open_channel", src, target=peer.instance_id, rank=peer.rank)

    def expect(self, desc: ReceiveDescriptor, src: PeerId, layout: KVLayout) -> None:
        self._call("expect", desc.request_id, src, layout, target=desc.decode.instance_id)


def _channel_host() -> str:
    """The address this replica's KV channels bind to (the rendezvous store and the gloo
    listener, never every interface): its node's Ray address, which is what other nodes reach
    it at. On a multi-node cluster that is the node's ``--node-ip-address`` (inside a network
    namespace host of ``deploy/netns.py``, the namespace's own address); on the loopback-only
    local cluster, 127.0.0.1. (Inside a replica Ray answers from the node it was started by,
    never by probing routes.)"""
    import ray

    return ray.util.get_node_ip_address()
