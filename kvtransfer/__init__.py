"""pdserve.kvtransfer: moving KV blocks between instances.

Channels (`Channel`, `TorchDistChannel` over gloo/NCCL pair groups, rendezvous through
`ChannelListener` / `connect`), the per-peer `ChannelPool`, transfer plans with head
re-sharding for heterogeneous TP (`KVLayout`, `TransferPlan`, `head_slices`), the layer-wise
`KVSender` / `KVReceiver` (reusing `StagingPool` buffers), the per-TP-rank `RankEndpoint` with
its `PushSpec` (what rank 0 of a TP instance registers with its other ranks before a push),
and optional int8 compression (`quantize_kv`, `dequantize_kv`).
It moves bytes; it does not decide which instances talk.
"""

from __future__ import annotations

from pdserve.kvtransfer.channel import (
    Channel,
    ChannelClosed,
    Pending,
    TransferError,
    TransferTimeout,
)
from pdserve.kvtransfer.compress import dequantize_kv, quantize_kv
from pdserve.kvtransfer.endpoint import PushSpec, RankEndpoint
from pdserve.kvtransfer.plan import KVLayout, TransferPlan, head_slices
from pdserve.kvtransfer.pool import ChannelPool, PeerId
from pdserve.kvtransfer.rendezvous import ChannelAddress, ChannelListener, connect
from pdserve.kvtransfer.staging import StagingPool
from pdserve.kvtransfer.torch_channel import TorchDistChannel
from pdserve.kvtransfer.transfer import KVReceiver, KVSender, TransferCancelled, TransferStats

__all__ = [
    "Channel",
    "ChannelAddress",
    "ChannelClosed",
    "ChannelListener",
    "ChannelPool",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "PeerId",
    "Pending",
    "PushSpec",
    "RankEndpoint",
    "StagingPool",
    "TorchDistChannel",
    "TransferCancelled",
    "TransferError",
    "TransferPlan",
    "TransferStats",
    "TransferTimeout",
    "connect",
    "dequantize_kv",
    "head_slices",
    "quantize_kv",
]
