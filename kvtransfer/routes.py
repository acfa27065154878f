"""The legs of a transfer: which peer ranks a TP rank exchanges which heads with.

A transfer between a sending instance (TP=p) and a receiving instance (TP=d) splits into one
leg per (sender rank, receiver rank) pair that `head_slices` pairs up; each leg has its own
channel and its own message size. These helpers are shared by `KVSender` and `KVReceiver`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from pdserve.kvtransfer.channel import Channel, TransferError
from pdserve.kvtransfer.plan import KVLayout, TransferPlan, head_slices
from pdserve.kvtransfer.wire import LayerWire


@dataclass(slots=True)
class Route:
    """One (sender rank, receiver rank) leg of a transfer."""

    peer_rank: int  # the other side's TP rank
    channel: Channel
    heads: slice  # this side's local heads on the leg
    wire: LayerWire


def plan_routes(
    plan: TransferPlan, rank: int, channels: Mapping[int, Channel], sending: bool
) -> list[Route]:
    """The legs this rank takes part in; `channels` maps the peer's TP rank to a channel."""
    src, dst = plan.src_layout, plan.dst_layout
    routes = []
    peers = range(dst.tp_size if sending else src.tp_size)
    for peer in peers:
        pair = head_slices(src, rank, dst, peer) if sending else head_slices(src, peer, dst, rank)
        if pair is None:
            continue
        if peer not in channels:
            side = "receiver" if sending else "sender"
            raise ValueError(f"transfer {plan.request_id!r} needs a channel to {side} rank {peer}")
        heads = pair[0] if sending else pair[1]
        wire = LayerWire.for_plan(plan, heads.stop - heads.start)
        routes.append(Route(peer, channels[peer], heads, wire))
    return routes


def check_kv(kv: torch.Tensor, layout: KVLayout, rank: int, block_ids: tuple[int, ...]) -> None:
    """Refuse a KV tensor whose shape or dtype does not match the layout of TP rank `rank`."""
    expect = layout.kv_shape(rank, kv.shape[2] if kv.dim() == 6 else 0)
    if tuple(kv.shape) != expect or kv.dtype != layout.dtype:
        raise ValueError(
            f"kv is {tuple(kv.shape)} {kv.dtype}, the layout says {expect} "
            f"{layout.dtype} for TP rank {rank}"
        )
    if max(block_ids) >= kv.shape[2] or min(block_ids) < 0:
        raise ValueError(f"block ids must lie in [0, {kv.shape[2]})")


class OrderedGuard:
    """Keeps order-only channels (NCCL) to one transfer at a time, per side."""

    def __init__(self) -> None:
        self._busy: set[int] = set()
        self._lock = threading.Lock()

    def claim(self, routes: list[Route], request_id: str) -> None:
        with self._lock:
            ordered = [id(r.channel) for r in routes if r.channel.ordered_only]
            if any(c in self._busy for c in ordered):
                raise TransferError(f"{request_id!r}: an order-only channel is already busy")
            self._busy.update(ordered)

    def release(self, routes: list[Route]) -> None:
        with self._lock:
            self._busy.difference_update(id(r.channel) for r in routes)


def close_routes(routes: list[Route]) -> None:
    # A transfer that failed midway may leave posted ops behind; breaking its channels makes
    # sure none of them can later match a message of another transfer (see channel.py).
    for route in routes:
        route.channel.close()
