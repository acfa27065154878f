"""A tensor-parallel rank > 0: its model shard and KV-cache shard, driven by rank 0's messages.

``TPWorker`` is a plain class (it imports no Ray); ``TPEngine`` makes it a Ray actor. Its life:

    __init__   join the TP group, load this rank's weight slice, allocate its KV shard
    serve()    (gloo transport) loop: receive a step message, run the shard, until STOP
    execute()  (ray transport) run one step message passed as a Ray actor call
    kv_*()     this rank's KV-transfer endpoint (disaggregated instances): rank 0's control
               calls, run in their own threads (the actor's "kv" concurrency group) while the
               step loop goes on; the step message says which pushes start in a step, and the
               layer hook sends this rank's heads of them (see ``kvtransfer.endpoint``)

The forward pass meets rank 0's at every all-reduce, so the ranks stay in lockstep without
any other acknowledgement. A rank that fails writes its traceback into the group's store
(rank 0 reports it) and exits at once, so its peers' collectives fail now rather than after
the timeout.
"""

from __future__ import annotations

import logging
import os
import traceback

import torch
import torch.nn.functional as F
from pdserve.kvtransfer import ChannelAddress, PeerId, TransferPlan, TransferStats
from pdserve.kvtransfer.endpoint import PushSpec, RankEndpoint

from .config import CacheConfig, ModelConfig
from .loader import Shard, load_weights
from .model import LlamaModel
from .parallel import ParallelConfig, TPGroup
from .runner import ModelRunner
from .tp_layout import vocab_range
from .tp_message import FRAME_WORDS, STOP, StepMessage

log = logging.getLogger(__name__)


def error_key(rank: int) -> str:
    return f"tp/error/{rank}"


def load_shard(
    cfg: ModelConfig, rank: int, size: int, group: TPGroup | None, vocab_parallel: bool
) -> LlamaModel:
    """Rank ``rank``'s model: its heads and MLP columns (see ``tp_layout``); the embedding is
    replicated (a lookup costs nothing and saves an all-reduce per step); the LM head is
    either split by vocabulary (``vocab_parallel``) or held by rank 0 alone, since only rank 0
    samples."""
    w = load_weights(cfg, Shard(rank, size))
    if size > 1:
        tied = w["lm_head"] is w["embed"]
        v0, v1 = (
            vocab_range(cfg.vocab_size, rank, size)
            if vocab_parallel
            else (0, 0 if rank else cfg.vocab_size)
        )
        head = w["lm_head"][v0:v1]
        w["lm_head"] = head if tied else head.clone()  # untied: drop the full matrix
    return LlamaModel(cfg, Shard(rank, size), group.all_reduce if group else None, weights=w)


def collect_logits(
    group: TPGroup | None, logits: torch.Tensor, vocab_size: int, vocab_parallel: bool
) -> torch.Tensor | None:
    """Vocab-parallel: gather every rank's ``[S, V/tp]`` slice onto rank 0 (others get None).
    Slices are padded to ``ceil(V/tp)`` columns so the gather moves equal shapes."""
    if group is None or group.size == 1 or not vocab_parallel or logits.shape[0] == 0:
        return logits
    per = -(-vocab_size // group.size)
    if logits.shape[1] < per:
        logits = F.pad(logits, (0, per - logits.shape[1]))
    parts = group.gather(logits.contiguous())
    return None if parts is None else torch.cat(parts, dim=1)[:, :vocab_size]


class TPWorker:
    def __init__(
        self,
        cfg: ModelConfig,
        parallel: ParallelConfig,
        rank: int,
        port: int,
        cache: CacheConfig,  # num_blocks set: every rank's pool has the block count of rank 0's
    ) -> None:
        torch.set_num_threads(parallel.num_threads)
        self.rank, self.cfg, self.parallel = rank, cfg, parallel
        self.group = TPGroup(
            rank,
            parallel.tp,
            port,
            timeout_s=parallel.timeout_s,
            startup_timeout_s=parallel.startup_timeout_s,
            shm_bytes=parallel.shm_bytes,
        )
        self.model = load_shard(cfg, rank, parallel.tp, self.group, parallel.vocab_parallel)
        self.runner = ModelRunner(self.model, cache)
        self.num_steps = 0
        self.kv: RankEndpoint | None = None  # set by kv_init (disaggregated instances)

    def pid(self) -> int:
        return os.getpid()

    def serve(self) -> int:
        """Gloo transport: run step messages until rank 0 sends STOP; returns the step count."""
        first = torch.empty(FRAME_WORDS, dtype=torch.int64)
        try:
            while True:
                self.group.recv_control(first, idle=True)
                header, payload, missing = StepMessage.split_frame(first)
                if header[0].item() == STOP:
                    return self.num_steps
                if missing:
                    tail = torch.empty(missing, dtype=torch.int64)
                    self.group.recv_control(tail)
                    payload = torch.cat([payload, tail])
                self._run(StepMessage.unpack(header, payload))
        except BaseException:
            self._die()
            raise

    def execute(self, header: torch.Tensor, payload: torch.Tensor) -> None:
        """Ray transport: one step (Ray runs an actor's calls from one caller in order)."""
        try:
            self._run(StepMessage.unpack(header, payload))
        except BaseException:
            self._die()
            raise

    # ---- KV transfer (rank 0's control calls, in the "kv" concurrency group) -------------
    def kv_init(self, instance_id: str, epoch: int, host: str, timeout_s: float) -> None:
        if self.kv is None:
            self.kv = RankEndpoint(PeerId(instance_id, epoch, self.rank), host, timeout_s)

    def kv_listen(self, src: PeerId) -> ChannelAddress:
        return self.kv.listen(src)

    def kv_connect(self, peer: PeerId, address: ChannelAddress, timeout_s: float) -> None:
        self.kv.connect(peer, address, timeout_s)

    def kv_missing(self, peers: list[PeerId]) -> list[PeerId]:
        return self.kv.missing(peers)

    def kv_register(self, key: int, spec: PushSpec) -> list[PeerId]:
        return self.kv.register(key, spec)

    def kv_wait(self, key: int, timeout_s: float) -> TransferStats:
        return self.kv.wait(key, timeout_s)

    def kv_cancel(self, key: int, timeout_s: float, notify: bool) -> None:
        self.kv.cancel(key, timeout_s, notify)

    def kv_receive(self, plan: TransferPlan, src: PeerId, timeout_s: float) -> TransferStats:
        return self.kv.receive(plan, src, self.runner.kv, timeout_s)

    def _run(self, msg: StepMessage) -> None:
        orders = msg.push_orders()
        hook = self.kv.layer_hook(self.runner.kv, orders) if orders and self.kv else None
        logits = self.model.forward(msg.input_ids, msg.meta, self.runner.kv, msg.sample_idx, hook)
        collect_logits(self.group, logits, self.cfg.vocab_size, self.parallel.vocab_parallel)
        self.num_steps += 1

    def _die(self) -> None:
        tb = traceback.format_exc()
        log.error("tensor-parallel rank %d failed, exiting:\n%s", self.rank, tb)
        try:
            self.group.store.set(error_key(self.rank), tb)
        finally:
            os._exit(1)
