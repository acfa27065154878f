"""What a KV transfer moves: the layouts of both sides and the plan of one transfer.

Both instances keep one KV tensor per TP rank,
`kv[num_layers, 2, num_blocks, block_size, heads_local, head_dim]` (index 0 = K, 1 = V), with
the KV heads split across TP ranks. When prefill and decode use different TP sizes, a decode
rank needs heads that live on one or several prefill ranks; `head_slices` says exactly which
heads each (sender rank, receiver rank) pair moves, so that every head a receiver rank holds
arrives exactly once, from one sender rank that owns it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPRESSIONS = (None, "int8")
MAX_LAYERS = 2046  # layer messages are tagged with the layer index in 11 bits (see wire.py)
_TRANSFER_ID_BITS = 20  # the rest of a 31-bit tag


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The KV cache layout of one instance (all its TP ranks)."""

    num_layers: int
    block_size: int  # tokens per block
    num_kv_heads_total: int  # KV heads of the model, before TP sharding
    head_dim: int
    tp_size: int
    dtype_str: str  # "float32" | "bfloat16" | "float16"

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_size", "num_kv_heads_total", "head_dim", "tp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVLayout.{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype_str not in _DTYPES:
            raise ValueError(f"KVLayout.dtype_str must be one of {sorted(_DTYPES)}")

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype_str]

    def head_range(self, rank: int) -> range:
        """The global KV heads that TP rank `rank` holds, in the order of its local heads.

        tp <= H: contiguous split, rank r holds [r*H//tp, (r+1)*H//tp) (uneven when tp does not
        divide H). tp > H: each rank holds one head, r*H//tp, so each head sits on ~tp/H ranks.

            H=4, tp=2: r0 [0,1]  r1 [2,3]          H=2, tp=4: r0 [0] r1 [0] r2 [1] r3 [1]
        """
        if not 0 <= rank < self.tp_size:
            raise ValueError(f"rank {rank} outside TP size {self.tp_size}")
        h, tp = self.num_kv_heads_total, self.tp_size
        if tp <= h:
            return range(rank * h // tp, (rank + 1) * h // tp)
        first = rank * h // tp
        return range(first, first + 1)

    def num_heads_local(self, rank: int) -> int:
        return len(self.head_range(rank))

    def owners(self, head: int) -> list[int]:
        """The TP ranks that hold `head` (one unless heads are replicated)."""
        return [r for r in range(self.tp_size) if head in self.head_range(r)]

    def kv_shape(self, rank: int, num_blocks: int) -> tuple[int, ...]:
        """The shape of TP rank `rank`'s KV tensor with `num_blocks` blocks."""
        return (
            self.num_layers,
            2,
            num_blocks,
            self.block_size,
            self.num_heads_local(rank),
            self.head_dim,
        )


def _sender_of(head: int, src: KVLayout, dst_rank: int) -> int:
    # With replicated heads, spread the receivers over the replicas (deterministically, so
    # both sides agree without talking): receiver rank r takes replica r mod #replicas.
    owners = src.owners(head)
    return owners[dst_rank % len(owners)]


def head_slices(
    src_layout: KVLayout, src_rank: int, dst_layout: KVLayout, dst_rank: int
) -> tuple[slice, slice] | None:
    """Which heads sender rank `src_rank` sends to receiver rank `dst_rank`, or None.

    Returns (slice of the sender's local heads, slice of the receiver's local heads), both of
    the same length. The set is contiguous: without replication it is the intersection of two
    contiguous ranges; with replication a sender holds a single head.
    """
    if src_layout.num_kv_heads_total != dst_layout.num_kv_heads_total:
        raise ValueError("sender and receiver disagree on the number of KV heads")
    src_heads = src_layout.head_range(src_rank)
    dst_heads = dst_layout.head_range(dst_rank)
    mine = [h for h in dst_heads if _sender_of(h, src_layout, dst_rank) == src_rank]
    if not mine:
        return None
    lo, hi = mine[0], mine[-1] + 1
    assert hi - lo == len(mine), "head assignment must be contiguous"
    return (
        slice(lo - src_heads.start, hi - src_heads.start),
        slice(lo - dst_heads.start, hi - dst_heads.start),
    )


def peer_ranks(src_layout: KVLayout, dst_layout: KVLayout, rank: int, sending: bool) -> list[int]:
    """The peer TP ranks that rank `rank` exchanges heads with: the receiver ranks it sends to
    (`sending`) or the sender ranks it receives from. A sender rank holding only replicas
    that other ranks send may have none."""
    if sending:
        return [r for r in range(dst_layout.tp_size)
                if head_slices(src_layout, rank, dst_layout, r) is not None]
    return [s for s in range(src_layout.tp_size)
            if head_slices(src_layout, s, dst_layout, rank) is not None]


@dataclass(frozen=True, slots=True)
class TransferPlan:
    """One request's blocks moving from a sending instance to a receiving instance.

    Block i of `src_block_ids` lands in block i of `dst_block_ids`; layers
    [layer_start, layer_end) move. `transfer_id` must be unique among transfers in flight over
    one channel: the receiver assigns it (a counter) when it reserves the blocks. Left None, it
    is derived from a hash of `request_id`; two requests in flight can then collide, which the
    receiver detects (message headers carry `fingerprint`) and reports as a failed transfer.
    """

    request_id: str
    src_block_ids: Sequence[int]
    dst_block_ids: Sequence[int]
    layer_start: int
    layer_end: int
    src_layout: KVLayout
    dst_layout: KVLayout
    compress: str | None = None  # None: bit-exact; "int8": see compress.py
    transfer_id: int | None = None

    def __post_init__(self) -> None:
        # Tuples keep the plan hashable and immutable after validation.
        object.__setattr__(self, "src_block_ids", tuple(int(b) for b in self.src_block_ids))
        object.__setattr__(self, "dst_block_ids", tuple(int(b) for b in self.dst_block_ids))
        s, d = self.src_layout, self.dst_layout
        if len(self.src_block_ids) != len(self.dst_block_ids) or not self.src_block_ids:
            raise ValueError("src_block_ids and dst_block_ids must be non-empty, equal length")
        if len(set(self.dst_block_ids)) != len(self.dst_block_ids):
            raise ValueError("dst_block_ids must not repeat a block")
        for name in ("num_layers", "block_size", "num_kv_heads_total", "head_dim", "dtype_str"):
            if getattr(s, name) != getattr(d, name):
                raise ValueError(
                    f"layouts differ in {name}: {getattr(s, name)} vs "
                    f"{getattr(d, name)}; only tp_size may differ"
                )
        if not 0 <= self.layer_start < self.layer_end <= s.num_layers:
            raise ValueError(
                f"layers [{self.layer_start}, {self.layer_end}) outside [0, {s.num_layers})"
            )
        if self.layer_end > MAX_LAYERS:
            raise ValueError(f"at most {MAX_LAYERS} layers can be transferred")
        if self.compress not in COMPRESSIONS:
            raise ValueError(f"compress must be one of {COMPRESSIONS}, got {self.compress!r}")
        if self.transfer_id is not None and self.transfer_id < 0:
            raise ValueError("transfer_id must be >= 0")

    @property
    def layers(self) -> range:
        return range(self.layer_start, self.layer_end)

    @property
    def num_blocks(self) -> int:
        return len(self.src_block_ids)

    @property
    def fingerprint(self) -> int:
        """63 bits naming this transfer; every message header and the ack carry it."""
        key = f"{self.request_id}\x00{self.transfer_id}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1

    @property
    def tag_id(self) -> int:
        """The transfer's 20-bit tag namespace (see wire.py for the tag layout)."""
        tid = self.fingerprint if self.transfer_id is None else self.transfer_id
        return tid % (1 << _TRANSFER_ID_BITS)
