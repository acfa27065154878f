"""The tensor-parallel group: rank, size and the collectives the TP ranks use.

Groups are **standalone process-group objects** (``ProcessGroupGloo`` / ``ProcessGroupNCCL``
built on an explicit ``TCPStore`` + ``PrefixStore``), never ``dist.init_process_group``: the
process-wide default group belongs to nobody, and the KV-transfer layer builds its own pairwise
groups in the same processes. Nothing reads ``MASTER_ADDR``/``RANK``-style environment
variables.

Rendezvous: rank 0 binds a listening socket on 127.0.0.1 port 0 (loopback only, a free port,
no race between choosing and binding it) and hands its fd to the ``TCPStore`` server; the other
ranks connect to that port. Gloo's own pairs are bound to 127.0.0.1 as well, so TP ranks must
share a node (the placement group guarantees it).

Two groups, as in vLLM: ``cpu`` (gloo, always) carries rank 0's per-step control messages;
``device`` (NCCL on CUDA, the same gloo group on CPU) carries all-reduces and logit gathers.

Same-node CPU fast path: ``all_reduce`` and ``gather`` of tensors up to ``shm_bytes`` go
through a shared-memory segment polled by every rank (``tp_shm``): ~15-30 µs instead of gloo's
0.2-1 ms for decode-sized tensors; larger ones, and everything on CUDA, use the device group.

Timeouts: every data collective waits at most ``timeout_s`` and then raises ``TPError``; a
killed peer is noticed at once (gloo: its sockets close; shm: its pid is checked every 5 ms). Only the idle wait for the next step
message (``recv_control(idle=True)``) is effectively unbounded, since an instance may sit idle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
IDLE_TIMEOUT = timedelta(days=30)  # a worker waiting for rank 0's next step
TRANSPORTS = ("gloo", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1  # tensor-parallel degree: ranks (processes) per instance
    cpus_per_rank: float = 1.0  # Ray CPUs reserved per rank; also its torch threads (floor, >= 1)
    timeout_s: float = 60.0  # a collective waiting longer means a rank hung: the step raises
    startup_timeout_s: float = 300.0  # placing ranks, rendezvous and loading weights
    vocab_parallel: bool = True  # LM head split over ranks, logits gathered on rank 0
    shm_bytes: int = 4 << 20  # CPU: shared-memory collectives up to this size per rank; 0: gloo
    transport: str = "gloo"  # rank 0 -> ranks step messages: gloo broadcast | ray actor calls

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp={self.tp}: the tensor-parallel degree must be >= 1")
        if self.cpus_per_rank <= 0:
            raise ValueError(f"cpus_per_rank={self.cpus_per_rank}: must be > 0")
        if self.timeout_s <= 0 or self.startup_timeout_s <= 0:
            raise ValueError("timeout_s and startup_timeout_s must be > 0 seconds")
        if self.shm_bytes < 0:
            raise ValueError(f"shm_bytes={self.shm_bytes}: must be >= 0 (0 turns shm off)")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport={self.transport!r}: choose one of {', '.join(TRANSPORTS)}")

    @property
    def num_threads(self) -> int:
        return max(1, int(self.cpus_per_rank))


class TPError(RuntimeError):
    """A tensor-parallel rank died, hung or failed. The instance cannot continue: its ranks'
    caches and collectives are out of step. Create a new instance."""


def listen_loopback() -> socket.socket:
    """A listening TCP socket on 127.0.0.1 with a free port (for rank 0's ``TCPStore``)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((LOOPBACK, 0))
    s.listen(128)
    return s


class TPGroup:
    """Rank ``rank`` of ``size``. Construction is collective: it returns once every rank has
    joined (or raises after ``startup_timeout_s``). Rank 0 passes ``listen`` (from
    ``listen_loopback``) and hosts the store; the others pass its ``port``."""

    def __init__(
        self,
        rank: int,
        size: int,
        port: int,
        *,
        listen: socket.socket | None = None,
        device: torch.device | None = None,
        timeout_s: float = 60.0,
        startup_timeout_s: float = 300.0,
        shm_bytes: int = 0,
        name: str = "tp",
    ) -> None:
        if rank == 0 and listen is None:
            raise ValueError("rank 0 hosts the store: pass listen=listen_loopback()")
        self.rank, self.size = rank, size
        self.device = device or torch.device("cpu")
        self.timeout = timedelta(seconds=timeout_s)
        startup = timedelta(seconds=startup_timeout_s)
        # the store server takes the listening fd over (and closes it): detach it from Python
        self.store = dist.TCPStore(
            LOOPBACK,
            port,
            size,
            rank == 0,
            timeout=startup,
            wait_for_workers=False,
            master_listen_fd=listen.detach() if rank == 0 else None,
        )
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = startup  # connecting; every collective below passes its own timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=LOOPBACK)]
        self.cpu = dist.ProcessGroupGloo(
            dist.PrefixStore(f"{name}/gloo", self.store), rank, size, opts
        )
        self.dev = self.cpu
        if self.device.type == "cuda":
            nopts = dist.ProcessGroupNCCL.Options()
            nopts._timeout = self.timeout  # enforced by NCCL's watchdog (GPU ops are async)
            self.dev = dist.ProcessGroupNCCL(
                dist.PrefixStore(f"{name}/nccl", self.store), rank, size, nopts
            )
        self.shm = None  # same-node CPU fast path for all_reduce / gather (see tp_shm)
        if self.device.type == "cpu" and size > 1 and shm_bytes > 0:
            self.shm = self._setup_shm(dist.PrefixStore(f"{name}/shm", self.store), shm_bytes)

    def _setup_shm(self, store: dist.Store, nbytes: int):
        """Rank 0 creates the segment; every rank maps it; all agree (an all-reduce of "mapped
        ok" flags) before it is used, else all stay on gloo. Rank 0 then unlinks the file: the
        mappings live on, and nothing is left behind in /dev/shm whatever happens later."""
        from .tp_shm import ShmCollectives, create_segment, shm_supported

        capacity = -(-nbytes // 64) * 64
        store.set(f"pid/{self.rank}", str(os.getpid()))
        path, shm = "", None
        try:
            if self.rank == 0:
                path = create_segment(self.size, capacity) if shm_supported() else ""
                store.set("path", path)
            else:
                path = store.get("path").decode()
            if path:
                pids = [int(store.get(f"pid/{r}")) for r in range(self.size)]
                shm = ShmCollectives(
                    path, self.rank, self.size, capacity, pids, self.timeout.total_seconds()
                )
        except (OSError, RuntimeError) as e:
            log.warning(
                "shared-memory collectives unavailable on rank %d (%s); using gloo", self.rank, e
            )
            shm = None
        ok = torch.tensor([1 if shm is not None else 0])
        self._wait(self.cpu.allreduce([ok]), "all_reduce")
        if self.rank == 0 and path:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return shm if int(ok) == self.size else None

    # ---- data collectives (bounded by timeout_s) ----------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum ``t`` over ranks, in place."""
        if self.shm is not None and self.shm.fits(t):
            self.shm.all_reduce(t)
        else:
            o = dist.AllreduceOptions()
            o.reduceOp, o.timeout = dist.ReduceOp.SUM, self.timeout
            self._wait(self.dev.allreduce([t], o), "all_reduce")

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Rank 0 gets every rank's ``t`` (equal shapes), in rank order; others get None."""
        if self.shm is not None and self.shm.fits(t):
            return self.shm.gather(t)
        o = dist.GatherOptions()
        o.rootRank, o.timeout = 0, self.timeout
        out = [[torch.empty_like(t) for _ in range(self.size)]] if self.rank == 0 else []
        self._wait(self.dev.gather(out, [t], o), "gather")
        return out[0] if self.rank == 0 else None

    # ---- control messages (CPU group) --------------------------------------------------------
    def send_control(self, t: torch.Tensor) -> None:
        """Rank 0: broadcast a CPU tensor whose shape the receivers know."""
        self._wait(self.cpu.broadcast([t], self._bcast(self.timeout)), "broadcast")

    def recv_control(self, t: torch.Tensor, idle: bool = False) -> None:
        """Ranks > 0: receive into ``t``. ``idle``: waiting for the next step, no time limit
        (rank 0's death still ends the wait at once: its socket closes)."""
        timeout = IDLE_TIMEOUT if idle else self.timeout
        self._wait(self.cpu.broadcast([t], self._bcast(timeout)), "broadcast")

    @staticmethod
    def _bcast(timeout: timedelta) -> dist.BroadcastOptions:
        o = dist.BroadcastOptions()
        o.rootRank, o.rootTensor, o.timeout = 0, 0, timeout
        return o

    def _wait(self, work, op: str) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            first = _gist(e)
            raise TPError(
                f"tensor-parallel {op} on rank {self.rank}/{self.size} failed: a rank died or "
                f"did not answer within {self.timeout.total_seconds():g}s ({first})"
            ) from e

    def close(self) -> None:
        for pg in {id(self.cpu): self.cpu, id(self.dev): self.dev}.values():
            with contextlib.suppress(Exception):  # best effort on a possibly broken group
                pg.shutdown()


def _gist(e: BaseException) -> str:
    """Gloo's message without its source path and boilerplate advice."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0]
