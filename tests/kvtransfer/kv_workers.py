"""Process bodies and helpers for the multi-process KV-transfer tests.

Each test starts one process per (instance, TP rank) with the spawn method. Receiver ranks
host a `ChannelListener` per sender rank and publish its address on a queue; sender ranks
connect. Both sides derive the same KV contents and plans from a seed, so each receiver checks
bit-exactness itself and only small results cross back to pytest.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from pdserve.kvtransfer import (
    ChannelClosed,
    ChannelListener,
    ChannelPool,
    KVLayout,
    KVReceiver,
    KVSender,
    PeerId,
    TransferCancelled,
    TransferPlan,
    TransferTimeout,
    connect,
    dequantize_kv,
    head_slices,
    quantize_kv,
)

HOST = "127.0.0.1"
CONNECT_S = 10.0
FILL = -7.0  # what receiver blocks hold before a transfer; must survive outside dst blocks


@dataclass(frozen=True)
class Spec:
    """One scenario, shared by every process of a test."""

    num_layers: int = 3
    block_size: int = 4
    heads: int = 2
    head_dim: int = 8
    dtype: str = "float32"
    src_tp: int = 1
    dst_tp: int = 1
    src_blocks: int = 48  # KV blocks per rank on each side
    dst_blocks: int = 44
    requests: tuple[int, ...] = (1, 7, 33)  # blocks per request
    compress: str | None = None
    interleave: bool = False  # send requests' layers interleaved, receive them concurrently
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # scenario switches

    def layout(self, tp: int) -> KVLayout:
        return KVLayout(self.num_layers, self.block_size, self.heads, self.head_dim, tp, self.dtype)

    def plans(self) -> list[TransferPlan]:
        # Random, unordered block ids; dst blocks are disjoint across requests (as the block
        # manager guarantees), src blocks may be shared (a cached prefix).
        g = torch.Generator().manual_seed(self.seed + 1)
        free = torch.randperm(self.dst_blocks, generator=g).tolist()
        plans = []
        for i, n in enumerate(self.requests):
            src = torch.randperm(self.src_blocks, generator=g)[:n].tolist()
            dst, free = free[:n], free[n:]
            plans.append(
                TransferPlan(
                    f"req-{i}",
                    src,
                    dst,
                    0,
                    self.num_layers,
                    self.layout(self.src_tp),
                    self.layout(self.dst_tp),
                    compress=self.compress,
                    transfer_id=i,
                )
            )
        return plans

    def global_kv(self) -> torch.Tensor:
        """All heads of the sending instance: [L, 2, blocks, bs, heads, head_dim]."""
        g = torch.Generator().manual_seed(self.seed)
        shape = (self.num_layers, 2, self.src_blocks, self.block_size, self.heads, self.head_dim)
        return torch.randn(shape, generator=g).to(self.layout(1).dtype)


def rank_kv(spec: Spec, tp: int, rank: int) -> torch.Tensor:
    heads = spec.layout(tp).head_range(rank)
    return spec.global_kv()[..., heads.start : heads.stop, :].contiguous()


def expected_layer(spec: Spec, plan: TransferPlan, dst_rank: int, layer: int) -> torch.Tensor:
    """What receiver rank `dst_rank` must hold in the plan's dst blocks for `layer`."""
    heads = plan.dst_layout.head_range(dst_rank)
    ids = torch.tensor(plan.src_block_ids)
    x = spec.global_kv()[layer][:, ids][..., heads.start : heads.stop, :]
    if plan.compress is None:
        return x
    # The same reference ops the sender ran (quantization is per message, i.e. per sender
    # rank's head slice): the result must equal it bit for bit.
    out = torch.empty_like(x)
    for s in range(plan.src_layout.tp_size):
        pair = head_slices(plan.src_layout, s, plan.dst_layout, dst_rank)
        if pair is None:
            continue
        hs = pair[1]
        for part, per in ((0, "channel"), (1, "token")):
            q, scale = quantize_kv(x[part][..., hs, :], per)
            out[part][..., hs, :] = dequantize_kv(q, scale, x.dtype)
    return out


# ---------------------------------------------------------------------------- process bodies


def sender_main(spec: Spec, rank: int, addresses: list[Any], results: Any, done: Any) -> Any:
    """Sender rank: connect to every receiver rank, stream the plans layer by layer."""
    channels = {}
    for r in range(spec.dst_tp):
        addr = addresses[r].get(timeout=CONNECT_S)
        channels[r] = connect(addr, f"decode/r{r}", timeout_s=CONNECT_S)
    kv = rank_kv(spec, spec.src_tp, rank)
    sender = KVSender(rank)
    plans = spec.plans()
    mode = spec.extra.get("sender", "normal")
    out: dict[str, Any] = {}
    if mode == "silent":  # connects, never sends; waits until the receiver gave up
        done.wait(20)
        return {"peer_closed_s": _peer_closed_after(channels[0])}
    for plan in plans:
        sender.begin(plan, channels)
    if mode == "cancel_first":
        sender.send_layers(plans[0], kv, [0])
        sender.abort(plans[0].request_id, timeout_s=10)
        plans = plans[1:]
    # Layer-wise streaming: layer l of every request, then layer l + 1 ("as prefill computes").
    order = [(p, layer) for layer in range(spec.num_layers) for p in plans]
    if not spec.interleave:
        order.sort(key=lambda pl: plans.index(pl[0]))
    for plan, layer in order:
        sender.send_layers(plan, kv, [layer])
    time.sleep(spec.extra.get("sender_delay_s", 0.0))  # e.g. busy computing the next batch
    timeout = spec.extra.get("wait_timeout_s", 15.0)
    for plan in plans:
        t0 = time.monotonic()
        try:
            stats = sender.wait_done(plan.request_id, timeout_s=timeout)
            out[plan.request_id] = stats.bytes
        except TransferTimeout:
            out[plan.request_id] = ("timeout", time.monotonic() - t0)
        except ChannelClosed:  # an earlier timeout broke the channel
            out[plan.request_id] = ("closed",)
    done.set()
    return out


def receiver_main(spec: Spec, rank: int, addresses: list[Any], results: Any, done: Any) -> Any:
    """Receiver rank: host one listener per sender rank, receive every plan, check it."""
    listeners = [ChannelListener(HOST, f"s{s}->r{rank}", epoch=1) for s in range(spec.src_tp)]
    for s, listener in enumerate(listeners):
        addresses[s].put(listener.address)
    channels = {
        s: ln.accept(f"prefill/r{s}", timeout_s=CONNECT_S) for s, ln in enumerate(listeners)
    }
    kv = torch.full(
        spec.layout(spec.dst_tp).kv_shape(rank, spec.dst_blocks), FILL, dtype=spec.layout(1).dtype
    )
    receiver = KVReceiver(rank)
    mode = spec.extra.get("receiver", "normal")
    if mode == "deaf":  # connects, never receives; waits until the sender gave up
        done.wait(20)
        return {"peer_closed_s": _peer_closed_after(channels[0])}
    timeout = spec.extra.get("recv_timeout_s", 15.0)
    out: dict[str, Any] = {}

    def one(plan: TransferPlan) -> None:
        t0 = time.monotonic()
        try:
            stats = receiver.receive(plan, kv, channels, timeout_s=timeout)
            out[plan.request_id] = ("ok", stats.bytes, time.monotonic() - t0)
        except TransferTimeout:
            out[plan.request_id] = ("timeout", time.monotonic() - t0)
        except TransferCancelled:
            out[plan.request_id] = ("cancelled",)
        except ChannelClosed:
            out[plan.request_id] = ("closed",)

    plans = spec.plans()
    if spec.interleave:  # concurrent receives, started in the reverse of the send order
        threads = [threading.Thread(target=one, args=(p,)) for p in reversed(plans)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    else:
        for plan in plans:
            one(plan)
    done.set()
    # Verify: every dst block of a completed plan is exact, and nothing else was written.
    touched = torch.zeros(spec.dst_blocks, dtype=torch.bool)
    for plan in plans:
        if out[plan.request_id][0] != "ok":
            continue
        ids = torch.tensor(plan.dst_block_ids)
        touched[ids] = True
        for layer in plan.layers:
            want = expected_layer(spec, plan, rank, layer)
            if not torch.equal(kv[layer][:, ids], want):
                out[plan.request_id] = ("mismatch", layer)
    cancelled = [p for p in plans if out[p.request_id][0] == "cancelled"]
    for p in cancelled:  # a cancelled request may have written its first layer, nothing more
        touched[torch.tensor(p.dst_block_ids)] = True
    out["untouched_ok"] = bool((kv[:, :, ~touched] == FILL).all())
    return out


def _peer_closed_after(channel: Any) -> float | None:
    """Seconds until an op on `channel` fails with ChannelClosed (None: it did not fail)."""
    t0 = time.monotonic()
    try:
        channel.recv(torch.empty(1), tag=12345).wait(5.0)
    except ChannelClosed:
        return time.monotonic() - t0
    except TransferTimeout:
        return None
    return None


def pool_sender_main(spec: Spec, addresses: list[Any], results: Any, done: Any) -> Any:
    """Sender with a ChannelPool: transfers to decode epoch 1, then to its restart (epoch 2)."""
    pool = ChannelPool(
        lambda peer: connect(
            addresses[peer.epoch - 1].get(timeout=CONNECT_S), f"{peer}", timeout_s=CONNECT_S
        )
    )
    kv = rank_kv(spec, 1, 0)
    sender = KVSender(0)
    plan = spec.plans()[0]
    seen = []
    for epoch in (1, 2):
        peer = PeerId("decode-0", epoch)
        with pool.lease(peer) as channel:
            seen.append(channel)
            assert pool.acquire(peer) is channel  # cached while alive
            pool.release(peer, channel)
            sender.begin(plan, {0: channel})
            sender.send_layers(plan, kv, plan.layers)
            sender.wait_done(plan.request_id, timeout_s=10)
    try:
        pool.acquire(PeerId("decode-0", 1))
        stale_refused = False
    except ChannelClosed:
        stale_refused = True
    out = {
        "distinct": seen[0] is not seen[1],
        "old_closed": seen[0].closed,
        "new_open": not seen[1].closed,
        "peers": [p.epoch for p in pool.peers()],
        "stale_refused": stale_refused,
    }
    pool.close_all()
    return out


def epoch_receiver_main(spec: Spec, epoch: int, address: Any, results: Any, done: Any) -> Any:
    """One incarnation of the decode rank: receive one plan, check it, exit."""
    listener = ChannelListener(HOST, "prefill-0/r0->decode-0/r0", epoch=epoch)
    address.put(listener.address)
    channel = listener.accept("prefill-0/r0", timeout_s=CONNECT_S)
    kv = torch.full(spec.layout(1).kv_shape(0, spec.dst_blocks), FILL, dtype=spec.layout(1).dtype)
    plan = spec.plans()[0]
    KVReceiver(0).receive(plan, kv, {0: channel}, timeout_s=10)
    ids = torch.tensor(plan.dst_block_ids)
    exact = all(
        torch.equal(kv[lay][:, ids], expected_layer(spec, plan, 0, lay)) for lay in plan.layers
    )
    if epoch == 1:
        _peer_closed_after(channel)  # stay until the sender moved on to epoch 2 and closed us
    return {"exact": exact}


# ------------------------------------------------------------------------------ the harness


def _entry(fn: Callable[..., Any], name: str, args: tuple, results: Any) -> None:
    torch.set_num_threads(1)
    try:
        results.put((name, "ok", fn(*args)))
    except Exception:  # noqa: BLE001 -- reported to pytest, which fails the test with it
        results.put((name, "err", traceback.format_exc()))


def run(spec: Spec, timeout_s: float = 25.0) -> dict[str, Any]:
    """Run every sender and receiver rank of `spec` as processes; return their results."""
    ctx = mp.get_context("spawn")
    results, done = ctx.Queue(), ctx.Event()
    # addresses[s][r]: receiver rank r -> sender rank s
    addresses = [[ctx.Queue() for _ in range(spec.dst_tp)] for _ in range(spec.src_tp)]
    procs = {}
    for r in range(spec.dst_tp):
        qs = [addresses[s][r] for s in range(spec.src_tp)]
        procs[f"recv{r}"] = (receiver_main, (spec, r, qs, results, done))
    for s in range(spec.src_tp):
        procs[f"send{s}"] = (sender_main, (spec, s, addresses[s], results, done))
    return run_procs(ctx, procs, results, timeout_s)


def run_pool_restart(spec: Spec, timeout_s: float = 25.0) -> dict[str, Any]:
    """A sender with a ChannelPool, and a decode rank that restarts with a new epoch."""
    ctx = mp.get_context("spawn")
    results, done = ctx.Queue(), ctx.Event()
    addresses = [ctx.Queue(), ctx.Queue()]  # per epoch
    procs = {
        "decode@1": (epoch_receiver_main, (spec, 1, addresses[0], results, done)),
        "decode@2": (epoch_receiver_main, (spec, 2, addresses[1], results, done)),
        "prefill": (pool_sender_main, (spec, addresses, results, done)),
    }
    return run_procs(ctx, procs, results, timeout_s)


def run_procs(ctx: Any, procs: dict[str, tuple], results: Any, timeout_s: float) -> dict:
    """Start `procs` {name: (fn, args)}; collect what each returns.

    Fails (AssertionError) if a process raised, did not report within `timeout_s`, or did not
    exit with status 0.
    """
    started = []
    for name, (fn, args) in procs.items():
        p = ctx.Process(target=_entry, args=(fn, name, args, results), daemon=True)
        p.start()
        started.append((name, p))
    deadline = time.monotonic() + timeout_s
    out: dict[str, Any] = {}
    try:
        while len(out) < len(started):
            name, status, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            assert status == "ok", f"{name} failed:\n{value}"
            out[name] = value
    except queue.Empty:
        raise AssertionError(f"processes did not report in {timeout_s}s: got {sorted(out)}")
    finally:
        for name, p in started:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
                raise AssertionError(f"{name} did not exit")
    for name, p in started:
        assert p.exitcode == 0, f"{name} exited with {p.exitcode}"
    return out


def with_(spec: Spec, **extra: Any) -> Spec:
    return replace(spec, extra={**spec.extra, **extra})
