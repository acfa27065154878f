"""Rank 0's handle on the KV-transfer endpoints of TP ranks 1..tp-1 (disaggregated instances).

Each rank > 0 owns a ``kvtransfer.RankEndpoint`` (its channels to the peer instance's ranks,
its sender and receiver). Rank 0 coordinates them with Ray actor calls in the workers' ``kv``
concurrency group, so they run in their own threads beside the step loop, which holds the
actor's default group (one thread: steps stay in order)::

    prefill rank 0                                  prefill rank s (TPWorker)
    prepare(key, spec): kv_register ──────────────> knows where push `key` goes; answers
      for each missing channel: the receiver          the receiver ranks it has no channel to
      rank opens a listener (its instance's
      open_channel), then kv_connect ─────────────> joins it
    (step message: key + source blocks) ──────────> layer hook sends its heads
    wait(key): kv_wait ───────────────────────────> until the receivers acked
    cancel(key, notify): kv_cancel ───────────────> cancel messages / forget

    decode rank 0                                   decode rank r (TPWorker)
    listen(r, src): kv_listen ────────────────────> rendezvous for sender rank src
    receive(plan, src): kv_receive ───────────────> receives its heads into its KV shard

``Instance`` (which imports no Ray) reaches this through ``TPEngine.kv_ranks``. Every call
returns or raises ``TransferError`` within its deadline; ``Calls.result`` waits for *all* ranks
before it reports the first failure, so that rank 0 never frees blocks a rank may still write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pdserve.kvtransfer import ChannelAddress, PeerId, TransferError, TransferPlan
from pdserve.kvtransfer.endpoint import PushSpec, senders

KV_GROUP = "kv"  # the workers' concurrency group for these calls
KV_THREADS = 64  # calls in flight per rank: receives block for a whole transfer
CONTROL_MARGIN_S = 5.0  # on top of a transfer's own deadline, for the Ray call around it


class Calls:
    """Ray calls in flight on several ranks (``{rank: ObjectRef}``), each bounded by its own
    deadline; ``timeout_s`` (from now) adds the control plane's margin to it."""

    def __init__(self, refs: dict, timeout_s: float) -> None:
        self.refs = refs
        self.timeout = timeout_s
        self.deadline = time.monotonic() + timeout_s + CONTROL_MARGIN_S

    def result(self) -> dict[int, object]:
        """Every rank's return value; waits for all (until the deadline), then raises
        ``TransferError`` naming the first rank that failed or did not answer."""
        if not self.refs:
            return {}
        import ray

        refs = list(self.refs.values())
        left = max(self.deadline - time.monotonic(), 0.001)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=left)
        done = set(ready)
        out: dict[int, object] = {}
        first: TransferError | None = None
        for rank, ref in self.refs.items():
            try:
                if ref not in done:
                    raise TimeoutError(f"no answer within {self.timeout:g}s")
                out[rank] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - Ray wraps the rank's exception
                if first is None:
                    first = TransferError(f"TP rank {rank}: {_gist(e)}")
                    first.__cause__ = e
        if first is not None:
            raise first
        return out


def _gist(e: BaseException) -> str:
    cause = getattr(e, "cause", None)  # RayTaskError: the rank's own exception
    e = cause if isinstance(cause, BaseException) else e
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"


class TPRanksKV:
    """Ranks 1..tp-1 of one instance, by Ray actor handle (``workers[r - 1]`` is rank r)."""

    def __init__(self, workers: list) -> None:
        self.workers = workers
        self.me: PeerId | None = None
        self.timeout = 30.0
        self._locks: dict[tuple[int, PeerId], threading.Lock] = {}
        self._locks_lock = threading.Lock()

    @property
    def ranks(self) -> range:
        return range(1, len(self.workers) + 1)

    def _call(self, rank: int, method: str, *args):
        return getattr(self.workers[rank - 1], method).options(concurrency_group=KV_GROUP).remote(
            *args)

    def init(self, instance_id: str, epoch: int, host: str, timeout_s: float) -> None:
        """Give every rank its endpoint (its identity as a peer, the address it binds)."""
        self.me, self.timeout = PeerId(instance_id, epoch, 0), timeout_s
        Calls({r: self._call(r, "kv_init", instance_id, epoch, host, timeout_s)
               for r in self.ranks}, timeout_s).result()

    # ---- receiving instance ----------------------------------------------------------------
    def listen(self, rank: int, src: PeerId) -> ChannelAddress:
        """Rank ``rank`` opens a rendezvous for sender rank ``src``; where to connect."""
        return Calls({rank: self._call(rank, "kv_listen", src)}, self.timeout).result()[rank]

    def receive(self, plan: TransferPlan, src: PeerId) -> Calls:
        """Start the receive of ``plan`` on every rank > 0 with heads from instance ``src``."""
        return Calls({r: self._call(r, "kv_receive", plan, src, self.timeout)
                      for r in self.ranks if senders(plan, src, r)}, self.timeout)

    # ---- sending instance ------------------------------------------------------------------
    def sending_ranks(self, spec: PushSpec) -> list[int]:
        return [r for r in self.ranks if spec.receivers(r)]

    def prepare(self, key: int, spec: PushSpec,
                open_channel: Callable[[PeerId, PeerId], object]) -> None:
        """Register push ``key`` on every rank > 0 that sends heads of it, and give each the
        channels it lacks: ``open_channel(receiver rank, sender rank)`` asks the receiving
        instance for a rendezvous (a ``ChannelOffer``), which the rank then joins. On failure
        the push is forgotten on every rank and the error raised."""
        ranks = self.sending_ranks(spec)
        try:
            missing = Calls({r: self._call(r, "kv_register", key, spec) for r in ranks},
                            self.timeout).result()
            for rank, peers in missing.items():
                for peer in peers:
                    self._connect(rank, peer, open_channel)
        except BaseException:
            try:
                self.cancel(key, spec, notify=False).result()
            except TransferError:
                pass  # the ranks report their own state; the first error is the one to raise
            raise

    def _connect(self, rank: int, peer: PeerId, open_channel) -> None:
        with self._locks_lock:
            lock = self._locks.setdefault((rank, peer), threading.Lock())
        with lock:  # one rendezvous per pair at a time; a concurrent prepare may have made it
            missing = Calls({rank: self._call(rank, "kv_missing", [peer])}, self.timeout)
            if not missing.result()[rank]:
                return
            offer = open_channel(peer, PeerId(self.me.instance_id, self.me.epoch, rank))
            Calls({rank: self._call(rank, "kv_connect", peer, offer.address, offer.timeout_s)},
                  offer.timeout_s).result()

    def wait(self, key: int, spec: PushSpec) -> Calls:
        """Every sending rank waits for its receivers' acks of push ``key``."""
        return Calls({r: self._call(r, "kv_wait", key, self.timeout)
                      for r in self.sending_ranks(spec)}, self.timeout)

    def cancel(self, key: int, spec: PushSpec, notify: bool) -> Calls:
        """Every sending rank gives push ``key`` up (see ``RankEndpoint.cancel``)."""
        return Calls({r: self._call(r, "kv_cancel", key, self.timeout, notify)
                      for r in self.sending_ranks(spec)}, self.timeout)
