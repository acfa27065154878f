"""A tensor-parallel engine instance: rank 0 in the caller's process, ranks 1..tp-1 as Ray actors.

    caller process (rank 0)                     Ray actors (placement group, same node)
    Engine: scheduler, blocks, sampler          TPWorker 1 .. tp-1
    TPRunner.execute(batch):
      prepare -> StepMessage ──── gloo bcast ──> receive message
      forward(shard 0) <════ all-reduce ═══════> forward(shard r)      (2 per layer)
      logits  <─────────── gather (vocab) ────── LM-head slice

``TPEngine`` *is* an ``Engine`` (same ``add_request``/``abort``/``step``/``has_work``): only
its runner differs, so Serve deployments take either. For KV transfer (disaggregated pools),
``kv_ranks`` reaches the other ranks' transfer endpoints (``tp_kv``), and ``runner.push_orders``,
when set, names the KV pushes each step starts: they ride in the step message, and every rank sends
its heads of them from its layer hook. ``make_engine`` returns a plain
``Engine`` for ``tp == 1`` (no Ray, no group); ``TPEngine`` itself also runs ``tp == 1``
through the same code path without actors.

Placement: one bundle per rank, ``{"CPU": cpus_per_rank}`` each, ``STRICT_PACK`` and pinned to
this node (the group rendezvous is on 127.0.0.1). Bundle 0 stands for rank 0, the caller. A
caller that already runs inside a placement group of at least ``tp`` bundles (a Serve replica
deployed with ``placement_group_bundles=[{"CPU": c}] * tp``) sits in bundle 0 of it, and the
ranks take bundles 1..tp-1.

Failures: a collective that fails or waits past ``timeout_s`` raises ``TPError`` from
``step()``, saying which rank died, is stopped or hung (and the failed rank's traceback when it
recorded one). The instance then closes itself (actors killed, bundles returned); every later
``step()`` raises the same error.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Self

import psutil
import torch

from .config import CacheConfig, EngineConfig
from .engine import Engine
from .model import LlamaModel
from .parallel import ParallelConfig, TPError, TPGroup, listen_loopback
from .runner import DEFAULT_KV_CAP, DEFAULT_KV_FRACTION, ModelRunner, num_kv_blocks
from .scheduler import ScheduledBatch
from .tp_kv import KV_GROUP, KV_THREADS, TPRanksKV
from .tp_layout import check_tp, head_ranges
from .tp_message import StepMessage
from .tp_worker import TPWorker, collect_logits, error_key, load_shard

log = logging.getLogger(__name__)

__all__ = ["TPEngine", "TPRunner", "make_engine"]


def make_engine(config: EngineConfig, parallel: ParallelConfig | None = None) -> Engine:
    """An ``Engine`` for ``parallel.tp`` ranks: a plain one for tp=1, else a ``TPEngine``."""
    if parallel is None or parallel.tp == 1:
        return Engine(config)
    return TPEngine(config, parallel)


class TPRunner(ModelRunner):
    """Rank 0's runner: prepares the batch, ships it to the other ranks (``send``), runs shard
    0, and gathers the logits. Any failure on the way marks the runner failed for good."""

    def __init__(
        self,
        model: LlamaModel,
        cache: CacheConfig,
        group: TPGroup | None,
        vocab_parallel: bool,
        send: Callable[[StepMessage], None] | None,
        on_failure: Callable[[BaseException], TPError],
    ) -> None:
        super().__init__(model, cache)
        self.group, self.vocab_parallel = group, vocab_parallel
        self.send, self.on_failure = send, on_failure
        self.failed: TPError | None = None
        # batch -> [(push key, source block ids)]: KV pushes the ranks start in this step
        self.push_orders: Callable[[ScheduledBatch], list[tuple[int, list[int]]]] | None = None

    def execute(
        self, batch: ScheduledBatch, on_layer: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Returns full-vocabulary fp32 logits. ``on_layer`` fires for rank 0's shard only."""
        if self.failed is not None:
            raise TPError(
                f"this tensor-parallel instance failed earlier and is closed: {self.failed}"
            )
        ids, meta, sample_idx = self.prepare(batch)
        try:
            if self.send is not None:
                orders = self.push_orders(batch) if self.push_orders is not None else []
                pushes = StepMessage.encode_pushes(orders) if orders else None
                self.send(StepMessage(ids, meta, sample_idx, pushes))
            logits = self.model.forward(ids, meta, self.kv, sample_idx, on_layer)
            return collect_logits(
                self.group, logits, self.model.cfg.vocab_size, self.vocab_parallel
            )
        except Exception as e:
            self.failed = self.on_failure(e)
            raise self.failed from e


class TPEngine(Engine):
    """An ``Engine`` whose model runs on ``parallel.tp`` ranks; call ``close()`` (or use it as a
    context manager) to stop the ranks. Raises ``ValueError`` for a TP degree the model's
    heads do not allow, ``TPError`` when ranks cannot be placed or started."""

    def __init__(self, config: EngineConfig, parallel: ParallelConfig | None = None) -> None:
        parallel = parallel or ParallelConfig()
        mcfg = config.model
        check_tp(mcfg.num_heads, mcfg.num_kv_heads, parallel.tp)
        self.parallel = parallel
        self.group: TPGroup | None = None
        self.workers: list = []  # Ray actor handles, rank r at index r - 1
        self.kv_ranks: TPRanksKV | None = None  # their KV-transfer endpoints (tp > 1)
        self.pids: list[int] = []  # their process ids (same node)
        self._loops: list = []  # gloo transport: each worker's serve() call
        self._pending: list = []  # ray transport: step calls not yet seen complete
        self._pg, self._owns_pg = None, False
        self._closed = False
        config = replace(config, cache=replace(config.cache, num_blocks=self._num_blocks(config)))
        try:
            ready = self._start_ranks(config) if parallel.tp > 1 else []
            model = load_shard(mcfg, 0, parallel.tp, self.group, parallel.vocab_parallel)
            self.pids = self._wait_ready(ready)
            send = None
            if parallel.tp > 1:
                if parallel.transport == "gloo":
                    self._loops = [w.serve.remote() for w in self.workers]
                    send = self._send_gloo
                else:
                    send = self._send_ray
            runner = TPRunner(
                model, config.cache, self.group, parallel.vocab_parallel, send, self._fail
            )
            super().__init__(config, model=model, runner=runner)
            if self.workers:
                self.kv_ranks = TPRanksKV(self.workers)
        except BaseException:
            self.close()
            raise
        log.info(
            "tensor-parallel engine: tp=%d, worker pids %s, transport %s",
            parallel.tp,
            self.pids,
            parallel.transport,
        )

    # ---- setup -----------------------------------------------------------------------------
    def _num_blocks(self, config: EngineConfig) -> int:
        """One block count for every rank: the pool of the rank with the most KV heads. On CPU
        the default budget (a share of free RAM) is divided among the ranks sharing the node."""
        cache, cfg, tp = config.cache, config.model, self.parallel.tp
        if cache.num_blocks is not None:
            return cache.num_blocks
        kv_max = max(
            k1 - k0
            for _, (k0, k1) in (
                head_ranges(cfg.num_heads, cfg.num_kv_heads, r, tp) for r in range(tp)
            )
        )
        if cache.memory_bytes is None:
            budget = min(
                int(psutil.virtual_memory().available * DEFAULT_KV_FRACTION), DEFAULT_KV_CAP
            )
            cache = replace(cache, memory_bytes=max(1, budget // tp))
        return num_kv_blocks(cfg, cache, kv_max)

    def _start_ranks(self, config: EngineConfig) -> list:
        import ray

        if not ray.is_initialized():
            raise RuntimeError(
                f"tp={self.parallel.tp} runs ranks as Ray actors: call ray.init() first "
                "(`pdserve up` does), or use tp=1"
            )
        p = self.parallel
        self._placement(ray)
        listen = listen_loopback()
        port = listen.getsockname()[1]
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # KV-transfer control calls run in their own threads beside the step loop (tp_kv)
        actor = ray.remote(concurrency_groups={KV_GROUP: KV_THREADS})(TPWorker)
        for r in range(1, p.tp):
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=r)
            self.workers.append(
                actor.options(
                    num_cpus=p.cpus_per_rank,
                    max_restarts=0,
                    scheduling_strategy=strategy,
                ).remote(config.model, p, r, port, config.cache)
            )
        ready = [w.pid.remote() for w in self.workers]
        self.group = self._rendezvous(ray, listen, port, ready)
        return ready

    def _placement(self, ray) -> None:
        from ray.util.placement_group import get_current_placement_group, placement_group

        p = self.parallel
        current = get_current_placement_group()
        if current is not None and len(current.bundle_specs) >= p.tp:
            self._pg = current  # a Serve replica in bundle 0; ranks take bundles 1..tp-1
            return
        me = ray.get_runtime_context().get_node_id()
        ip = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == me)
        bundle = {"CPU": p.cpus_per_rank, f"node:{ip}": 0.001}  # pinned to this node
        self._pg = placement_group([dict(bundle) for _ in range(p.tp)], strategy="STRICT_PACK")
        self._owns_pg = True
        try:
            ray.get(self._pg.ready(), timeout=p.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            free = ray.available_resources().get("CPU", 0)
            raise TPError(
                f"could not reserve {p.tp} bundles of {p.cpus_per_rank:g} CPU on this node "
                f"within {p.startup_timeout_s:g}s (Ray reports {free:g} CPUs free); lower "
                "cpus_per_rank or tp, or give Ray more CPUs"
            ) from None

    def _rendezvous(self, ray, listen, port: int, ready: list) -> TPGroup:
        """Build rank 0's group (collective: it returns once every rank joined) while watching
        the actors, so a rank that fails to start is reported at once, not after the timeout."""
        p, box = self.parallel, {}

        def build() -> None:
            try:
                box["group"] = TPGroup(
                    0,
                    p.tp,
                    port,
                    listen=listen,
                    timeout_s=p.timeout_s,
                    startup_timeout_s=p.startup_timeout_s,
                    shm_bytes=p.shm_bytes,
                )
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = e

        th = threading.Thread(target=build, name="tp-rendezvous", daemon=True)
        th.start()
        deadline = time.monotonic() + p.startup_timeout_s
        while th.is_alive():
            th.join(0.05)
            done, _ = ray.wait(ready, num_returns=len(ready), timeout=0)
            for ref in done:
                self._get_startup(ray, ready, ref)
            if time.monotonic() > deadline:
                raise TPError(f"tensor-parallel ranks did not join within {p.startup_timeout_s:g}s")
        if "error" in box:
            raise TPError(f"tensor-parallel rendezvous failed: {box['error']}") from box["error"]
        return box["group"]

    def _get_startup(self, ray, ready: list, ref, timeout: float | None = 0):
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise TPError(
                f"tensor-parallel rank {ready.index(ref) + 1} did not finish loading within "
                f"{self.parallel.startup_timeout_s:g}s"
            ) from None
        except ray.exceptions.RayError as e:
            raise TPError(
                f"tensor-parallel rank {ready.index(ref) + 1} failed to start: {e}"
            ) from e

    def _wait_ready(self, ready: list) -> list[int]:
        if not ready:
            return []
        import ray

        t = self.parallel.startup_timeout_s
        return [self._get_startup(ray, ready, ref, t) for ref in ready]

    # ---- per-step transports -----------------------------------------------------------------
    def _send_gloo(self, msg: StepMessage) -> None:
        for frame in msg.frames():
            self.group.send_control(frame)

    def _send_ray(self, msg: StepMessage) -> None:
        import ray

        header, payload = msg.pack()
        self._pending += [w.execute.remote(header, payload) for w in self.workers]
        # surface a worker's error from earlier steps; never wait on the step just sent
        done, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
        if done:
            ray.get(done)

    # ---- failure and shutdown ----------------------------------------------------------------
    def _fail(self, err: BaseException) -> TPError:
        """Turn a step's exception into a report of what each rank is doing, then close."""
        grace = min(2.0, self.parallel.timeout_s)
        hang = isinstance(err, TPError)
        ranks = [self._rank_state(r, grace, hang) for r in range(1, self.parallel.tp)]
        self.close()
        detail = "; ".join(ranks) if ranks else "no other ranks"
        return TPError(
            f"tensor-parallel step failed (tp={self.parallel.tp}): {detail}. Rank 0 saw: "
            f"{type(err).__name__}: {err}. The instance is closed; start a new one."
        )

    def _recorded_error(self, rank: int) -> str | None:
        # the store is served by this process, so this cannot hang; best effort all the same
        with contextlib.suppress(Exception):
            if self.group is not None and self.group.store.check([error_key(rank)]):
                lines = self.group.store.get(error_key(rank)).decode().strip().splitlines()
                return lines[-1] if lines else "?"
        return None

    def _rank_state(self, rank: int, grace: float, hang: bool) -> str:
        """Ranks share rank 0's node, so their processes can be looked at directly."""
        pid = self.pids[rank - 1] if rank - 1 < len(self.pids) else None
        who = f"rank {rank} (pid {pid})"
        deadline = time.monotonic() + grace
        while True:
            if (tb := self._recorded_error(rank)) is not None:
                return f"{who} failed: {tb}"
            try:
                status = psutil.Process(pid).status() if pid is not None else None
            except psutil.NoSuchProcess:
                status = psutil.STATUS_DEAD
            if status in (psutil.STATUS_DEAD, psutil.STATUS_ZOMBIE):
                tb = self._recorded_error(rank)  # written just before it exited
                return f"{who} failed: {tb}" if tb else f"{who} died"
            if status == psutil.STATUS_STOPPED:
                return f"{who} is stopped (SIGSTOP?)"
            if time.monotonic() > deadline:
                if hang:
                    return f"{who} is alive but did not answer within {self.parallel.timeout_s:g}s (hung)"
                return f"{who} is alive"
            time.sleep(0.05)

    def close(self) -> None:
        """Stop the ranks and return their bundles. Idempotent; the engine is unusable after."""
        if self._closed:
            return
        self._closed = True
        runner = getattr(self, "runner", None)
        healthy = runner is not None and getattr(runner, "failed", None) is None
        if self.workers:
            import ray

            if healthy and self._loops:
                with contextlib.suppress(Exception):  # let serve() return; killed below anyway
                    self.group.send_control(StepMessage.stop_frame())
                    ray.wait(self._loops, num_returns=len(self._loops), timeout=5)
            for w in self.workers:
                ray.kill(w, no_restart=True)
            if self._owns_pg and self._pg is not None:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(self._pg)
        if self.group is not None:
            self.group.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
