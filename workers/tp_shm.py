"""Same-node CPU collectives through one shared-memory segment, polled instead of woken.

Why: a 2-rank gloo all-reduce of one decode token's hidden state takes 0.3-1 ms on a small
VM, almost all of it thread and vCPU wake-ups (gloo hands each op to its own thread and blocks
on sockets). A Llama layer does two all-reduces, so SmolLM2's 30 layers spent ~55 ms of a
decode step there, more than the whole TP=1 step. Here each rank writes its tensor into its own
slot, bumps its sequence flag, and polls the others' flags: ~10-30 µs per op.

Segment (a file in /dev/shm, mapped by every rank, unlinked once all have mapped it)::

    flags  [size, 8] int64     flags[r, 0] = last op rank r has posted (its data is in place)
    data   [size, 2, capacity] bytes: rank r's two slots, op ``seq`` uses slot ``seq % 2``

Ordering (x86-64's TSO keeps stores visible in program order, so data lands before the flag;
on other CPUs the group uses gloo instead). Before writing slot ``seq % 2`` a rank waits until
every rank posted op ``seq - 1``; having posted it, each has finished op ``seq - 2``, the last
reader of that slot. An all-reduce then waits for every flag to reach ``seq`` and sums the
slots in rank order, so every rank gets bit-identical results. A gather's root waits likewise;
the others move on at once.

Waiting spins for ~100 µs (each rank has its own core), then yields the CPU, then sleeps in
short naps, so oversubscribed machines still make progress. A dead peer (checked every few ms)
or one silent past ``timeout_s`` raises ``TPError``.
"""

from __future__ import annotations

import os
import platform
import time
import uuid

import psutil
import torch

from .parallel import TPError

SHM_DIR = "/dev/shm"
_LINE = 64  # bytes per rank's flag row (one cache line)
_SPIN_S, _YIELD_S, _NAP_S, _LIVENESS_S = 100e-6, 2e-3, 50e-6, 5e-3


def shm_supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR)


def create_segment(size: int, capacity: int) -> str:
    """Rank 0: a new zero-filled segment file (mode 0600); returns its path."""
    path = os.path.join(SHM_DIR, f"pdserve-tp-{uuid.uuid4().hex}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, _total(size, capacity))
    finally:
        os.close(fd)
    return path


def _total(size: int, capacity: int) -> int:
    return size * _LINE + size * 2 * capacity


class ShmCollectives:
    def __init__(
        self, path: str, rank: int, size: int, capacity: int, pids: list[int], timeout_s: float
    ) -> None:
        if capacity % _LINE:
            raise ValueError(f"shm capacity {capacity} must be a multiple of {_LINE} bytes")
        self.rank, self.size, self.capacity = rank, size, capacity
        self.pids, self.timeout_s = pids, timeout_s
        mem = torch.from_file(path, shared=True, size=_total(size, capacity), dtype=torch.uint8)
        self.flags = mem[: size * _LINE].view(torch.int64).view(size, _LINE // 8)
        self.data = mem[size * _LINE :].view(size, 2, capacity)
        self.seq = 0

    def fits(self, t: torch.Tensor) -> bool:
        return (
            t.device.type == "cpu"
            and t.is_contiguous()
            and t.numel() * t.element_size() <= self.capacity
        )

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum ``t`` over ranks in place (``fits(t)`` must hold)."""
        slots = self._post(t)
        self._await_all(self.seq, "all_reduce")
        torch.sum(slots, 0, out=t.view(-1))

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Rank 0 gets a copy of every rank's ``t`` in rank order; the others get None."""
        slots = self._post(t)
        if self.rank != 0:
            return None
        self._await_all(self.seq, "gather")
        return [slots[r].clone().view(t.shape) for r in range(self.size)]

    def _post(self, t: torch.Tensor) -> torch.Tensor:
        """Write ``t`` into this op's slot and post it; returns every rank's slot as ``t``'s
        dtype, ``[size, t.numel()]``."""
        self.seq += 1
        self._await_all(
            self.seq - 1, "collective"
        )  # nobody still reads the slot we are about to overwrite
        nbytes = t.numel() * t.element_size()
        slots = self.data[:, self.seq % 2, :nbytes].view(t.dtype)
        slots[self.rank].copy_(t.view(-1))
        self.flags[self.rank, 0] = self.seq
        return slots

    def _await_all(self, seq: int, op: str) -> None:
        for r in range(self.size):
            if r != self.rank and self.flags[r, 0].item() < seq:
                self._await(r, seq, op)

    def _await(self, r: int, seq: int, op: str) -> None:
        flag = self.flags[r, 0]
        start = time.perf_counter()
        check_at = start + _LIVENESS_S
        n = 0
        while flag.item() < seq:
            n += 1
            if n & 31:
                continue
            now = time.perf_counter()
            waited = now - start
            if waited > _YIELD_S:
                time.sleep(_NAP_S)
            elif waited > _SPIN_S:
                os.sched_yield()
            if now > check_at:
                check_at = now + _LIVENESS_S
                self._check_peer(r, waited, op)

    def _check_peer(self, r: int, waited: float, op: str) -> None:
        who = f"rank {r} (pid {self.pids[r]})"
        try:
            alive = psutil.Process(self.pids[r]).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        if not alive:
            raise TPError(f"tensor-parallel {op} (shm) on rank {self.rank}/{self.size}: {who} died")
        if waited > self.timeout_s:
            raise TPError(
                f"tensor-parallel {op} (shm) on rank {self.rank}/{self.size}: {who} did not "
                f"answer within {self.timeout_s:g}s"
            )
