"""Admission control: a bounded queue per pool, so overload turns into fast, explicit
rejections (HTTP 429 with ``Retry-After``, gRPC ``RESOURCE_EXHAUSTED``) instead of unbounded
memory growth and timeouts.

Each pool has a ``Gate``: at most ``capacity`` requests hold it at once (the requests its
instances can run: replicas x ``max_num_seqs``), at most ``max_queue`` more wait for it in
FIFO order (each for at most ``queue_timeout_s``), and anyone beyond that is refused at
once. Router memory is thus bounded by capacity + queue per pool.

A request's ``Ticket`` passes the gates of the pools it will use, in a fixed order:

    disaggregated:  decode ──► prefill        (the orchestrator reserves decode blocks
                                               before it prefills, so decode is held first)
    colocated:      colocated

The prefill gate is released at the first token (the prompt is done), the others when the
request ends. The order is the same for every request and a prefill holder never waits for
a decode slot, so gates cannot deadlock. Tickets are released exactly once however the
request ends (finish, error, client gone): ``Ticket.close`` is idempotent.

Runs on the router's event loop only; nothing here blocks or takes a lock.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from .errors import Overloaded


class Gate:
    """``capacity`` concurrent holders plus a bounded FIFO of waiters (see module doc)."""

    def __init__(self, name: str, capacity: int, max_queue: int) -> None:
        if capacity < 1 or max_queue < 0:
            raise ValueError(f"gate {name}: capacity must be >= 1 and max_queue >= 0")
        self.name = name
        self.capacity = capacity
        self.max_queue = max_queue
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.admitted = 0
        self.rejected = 0
        self.peak_waiting = 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, timeout_s: float, retry_after_s: int) -> None:
        """Take a slot, waiting up to ``timeout_s`` in the queue; raises ``Overloaded`` when
        the queue is full or the wait times out. Cancellation leaves no trace."""
        if self.in_use < self.capacity and not self._waiters:
            self.in_use += 1
            self.admitted += 1
            return
        if len(self._waiters) >= self.max_queue:
            self.rejected += 1
            raise Overloaded(f"the {self.name} pool is busy: {self.in_use} requests running and "
                             f"{len(self._waiters)} queued (the queue holds {self.max_queue})",
                             retry_after_s)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self.peak_waiting = max(self.peak_waiting, len(self._waiters))
        try:
            # (not ``wait_for``: on Python 3.11 it can swallow a cancellation that arrives just
            # as the slot is handed over, leaving a cancelled task holding a slot)
            async with asyncio.timeout(timeout_s):
                await fut
        except BaseException as e:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            else:
                fut.cancel()
                self._remove(fut)
            if isinstance(e, TimeoutError):
                self.rejected += 1
                raise Overloaded(f"the {self.name} pool stayed busy for {timeout_s:g} s while "
                                 "this request waited in its queue", retry_after_s) from None
            raise
        self.admitted += 1

    def release(self) -> None:
        """Give a slot back: straight to the first live waiter, else back to the pool."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # in_use is unchanged: the slot changes hands
                return
        self.in_use = max(0, self.in_use - 1)

    def resize(self, capacity: int) -> None:
        """A new capacity (the pool's replica count changed); waiters that now fit go in."""
        self.capacity = max(1, capacity)
        while self._waiters and self.in_use < self.capacity:
            fut = self._waiters.popleft()
            if not fut.done():
                self.in_use += 1
                fut.set_result(None)

    def _remove(self, fut: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass

    def stats(self) -> dict[str, int]:
        return {"capacity": self.capacity, "max_queue": self.max_queue, "in_use": self.in_use,
                "waiting": self.waiting, "peak_waiting": self.peak_waiting,
                "admitted": self.admitted, "rejected": self.rejected}


class Ticket:
    """The gates one request holds; ``release(pool)`` and ``close()`` are idempotent."""

    def __init__(self, gates: dict[str, Gate]) -> None:
        self._gates = gates
        self._held: list[str] = []

    @property
    def held(self) -> tuple[str, ...]:
        return tuple(self._held)

    def _take(self, pool: str) -> None:
        self._held.append(pool)

    def release(self, pool: str) -> None:
        if pool in self._held:
            self._held.remove(pool)
            self._gates[pool].release()

    def close(self) -> None:
        for pool in list(self._held):
            self.release(pool)


@dataclass(frozen=True)
class AdmissionConfig:
    max_queue: int = 64  # per pool: requests waiting beyond what the pool runs
    queue_timeout_s: float = 30.0  # longest wait in a queue before a 429
    retry_after_s: int = 1  # what 429s tell clients to wait


class Admission:
    """The gates of one router replica, in acquisition order."""

    def __init__(self, capacities: dict[str, int], cfg: AdmissionConfig) -> None:
        # dict order is acquisition order (decode before prefill, see module doc)
        self.cfg = cfg
        self.gates = {name: Gate(name, cap, cfg.max_queue) for name, cap in capacities.items()}

    @classmethod
    def for_app(cls, app_config: dict) -> Admission:
        """Gates sized from the app config: capacity = replicas x max_num_seqs per pool."""
        r = app_config["router"]
        pools = ["colocated"] if app_config["mode"] == "colocated" else ["decode", "prefill"]
        caps = {p: app_config[p]["replicas"] * app_config[p]["max_num_seqs"] for p in pools}
        return cls(caps, AdmissionConfig(r["max_queue"], r["queue_timeout_s"],
                                         r["retry_after_s"]))

    async def admit(self, timeout_s: float | None = None) -> Ticket:
        """Pass every gate (waiting in their queues), or raise ``Overloaded`` holding none."""
        budget = self.cfg.queue_timeout_s if timeout_s is None else \
            min(timeout_s, self.cfg.queue_timeout_s)
        deadline = time.monotonic() + budget
        ticket = Ticket(self.gates)
        try:
            for name, gate in self.gates.items():
                await gate.acquire(max(0.0, deadline - time.monotonic()), self.cfg.retry_after_s)
                ticket._take(name)
        except BaseException:
            ticket.close()
            raise
        return ticket

    def stats(self) -> dict[str, dict[str, int]]:
        return {name: g.stats() for name, g in self.gates.items()}
