"""The bytes of one layer message and the tags they travel under.

One message carries one layer of one transfer between one (sender rank, receiver rank) pair:
the K and V of the plan's blocks, restricted to the heads `head_slices` gave that pair. It is
a single contiguous uint8 buffer, so one send/recv moves a whole layer whatever the dtype:

    raw   : | header 16 B | K,V  [2, n_blocks, block_size, heads, head_dim] in the KV dtype |
    int8  : | header 16 B | qK [n,bs,h,d] | qV [n,bs,h,d] | pad to 16 | sK fp32 [h,d] |
            | sV fp32 [n,bs,h] |
    header: int64 fingerprint of the transfer, int64 layer index (CANCELLED = -1: the sender
            gave the transfer up; the payload is garbage and the receiver drains the rest)

Split format (large uncompressed layers whose receiver blocks form few runs): the same bytes
as several messages under the layer's tag, matched in order, so that neither side copies
through a staging buffer where the cache already holds them contiguously:

    split : | header 16 B |  then per run of consecutive receiver blocks (n blocks):
            | K [n, bs, h, d] | V [n, bs, h, d] |

A sender whose source blocks over a run are consecutive too, and who sends all its local
heads, sends straight from its cache; a receiver taking all its local heads receives straight
into its cache. Either side otherwise stages that part (gather / slice copy). Both sides know
the receiver's block ids (the plan), so both derive the same message sizes.

The receiver checks the header before it scatters anything, so a message that matched the
wrong recv (a tag collision, or NCCL's order-only matching used wrongly) fails the transfer
instead of silently writing another request's KV. (Split parts received in place land in the
transfer's own reserved blocks before the check; a failed check fails the transfer and the
caller frees those blocks, as after any failure.)

Tags are 31 bits: | transfer tag_id (20 bits) | message (11 bits) |, with message = the layer
index (0..2045) for data, 2047 for the ack, and 2046 reserved by torch_channel for close().
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from pdserve.kvtransfer.channel import TransferError
from pdserve.kvtransfer.compress import compressed_nbytes, dequantize_kv, quantize_kv
from pdserve.kvtransfer.plan import TransferPlan

HEADER_BYTES = 16
SPLIT_MIN_BYTES = 256 << 10  # a layer's payload at least this big may use the split format
SPLIT_MAX_RUNS = 8  # ... when the receiver's blocks form at most this many runs
_MSG_BITS = 11
ACK_MSG = (1 << _MSG_BITS) - 1
CANCELLED = -1  # the header's layer field of a cancel message


def layer_tag(plan: TransferPlan, layer: int) -> int:
    return (plan.tag_id << _MSG_BITS) | layer


def ack_tag(plan: TransferPlan) -> int:
    return (plan.tag_id << _MSG_BITS) | ACK_MSG


def _align16(n: int) -> int:
    return (n + 15) // 16 * 16


@dataclass(frozen=True, slots=True)
class BlockIndex:
    """One side's block ids of a transfer, and their contiguous runs.

    A run of consecutive block ids moves with one slice copy; an indexed copy (`index_copy_`)
    of the same bytes is ~3x slower on CPU, so when the ids form few runs (the usual case: the
    allocator hands out neighbours) pack/unpack copy run by run::

        ids  [7, 8, 9, 2, 3]   runs  (0, 7, 3)  (3, 2, 2)   = (position in message, first id, length)
    """

    ids: torch.Tensor  # [n] int64
    runs: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, block_ids: Sequence[int], device: torch.device) -> BlockIndex:
        ids = [int(b) for b in block_ids]
        runs, start = [], 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[i - 1] + 1:
                runs.append((start, ids[start], i - start))
                start = i
        return cls(torch.tensor(ids, dtype=torch.long, device=device), tuple(runs))

    @property
    def by_runs(self) -> bool:
        return len(self.runs) * 4 <= len(self.ids)

    def span(self, at: int, n: int) -> int | None:
        """The first id if ids[at:at+n] are consecutive, else None."""
        for pos, first, length in self.runs:
            if pos <= at < pos + length:
                return first + at - pos if at + n <= pos + length else None
        return None


def _as_index(block_ids: torch.Tensor | BlockIndex) -> BlockIndex:
    if isinstance(block_ids, BlockIndex):
        return block_ids
    return BlockIndex.of(block_ids.tolist(), block_ids.device)


@dataclass(frozen=True, slots=True)
class LayerWire:
    """The byte layout of one layer message of a plan, for a route carrying `num_heads` heads."""

    num_blocks: int
    block_size: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype
    compress: str | None
    split: tuple[int, ...] = ()  # split format: the receiver's block runs (lengths); () packed

    @classmethod
    def for_plan(cls, plan: TransferPlan, num_heads: int) -> LayerWire:
        lay = plan.src_layout
        wire = cls(
            plan.num_blocks, lay.block_size, num_heads, lay.head_dim, lay.dtype, plan.compress
        )
        if plan.compress is None and wire.nbytes - HEADER_BYTES >= SPLIT_MIN_BYTES:
            runs = BlockIndex.of(plan.dst_block_ids, torch.device("cpu")).runs
            if len(runs) <= SPLIT_MAX_RUNS:
                wire = replace(wire, split=tuple(n for _, _, n in runs))
        return wire

    def chunk_bytes(self, n: int) -> int:
        """Bytes of the K (or V) part of `n` blocks."""
        return n * self.block_size * self.num_heads * self.head_dim * self.dtype.itemsize

    def chunk_shape(self, n: int) -> tuple[int, int, int, int]:
        return (n, self.block_size, self.num_heads, self.head_dim)

    def part_sizes(self) -> list[int]:
        """The byte sizes of the messages of one layer, in the order they are sent."""
        if not self.split:
            return [self.nbytes]
        return [HEADER_BYTES] + [self.chunk_bytes(n) for n in self.split for _ in (0, 1)]

    @property
    def _one_shape(self) -> tuple[int, int, int, int]:
        return (self.num_blocks, self.block_size, self.num_heads, self.head_dim)

    @property
    def _int8_offsets(self) -> tuple[int, int, int, int, int]:
        """(qK, qV, sK, sV, end) byte offsets of the int8 layout."""
        nq, nsk = compressed_nbytes(self._one_shape, "channel")
        _, nsv = compressed_nbytes(self._one_shape, "token")
        qk = HEADER_BYTES
        sk = _align16(qk + 2 * nq)
        return qk, qk + nq, sk, sk + nsk, sk + nsk + nsv

    @property
    def nbytes(self) -> int:
        if self.compress == "int8":
            return self._int8_offsets[-1]
        n = self.num_blocks * self.block_size * self.num_heads * self.head_dim
        return HEADER_BYTES + 2 * n * self.dtype.itemsize

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.nbytes, dtype=torch.uint8, device=device)

    def _rows(self, kv_layer: torch.Tensor, heads: slice) -> torch.Tensor | None:
        """kv_layer as [2, blocks, block bytes] rows when the message carries all its heads
        (one contiguous row per block and part), else None."""
        if heads.start == 0 and heads.stop == kv_layer.shape[3] and kv_layer.is_contiguous():
            return kv_layer.view(2, kv_layer.shape[1], -1)
        return None

    def pack(
        self,
        kv_layer: torch.Tensor,
        block_ids: torch.Tensor | BlockIndex,
        heads: slice,
        out: torch.Tensor,
        fingerprint: int,
        layer: int,
    ) -> None:
        """Gather kv_layer[:, block_ids][..., heads, :] ([2, nb, bs, h, d] view) into `out`."""
        index = _as_index(block_ids)
        out[:HEADER_BYTES].view(torch.int64).copy_(torch.tensor([fingerprint, layer]))
        src = kv_layer[:, :, :, heads, :]
        if self.compress is None:
            payload = out[HEADER_BYTES:].view(self.dtype).view(2, *self._one_shape)
            rows = self._rows(kv_layer, heads)
            if rows is None:
                torch.index_select(src, 1, index.ids, out=payload)
                return
            flat = payload.view(2, self.num_blocks, -1)
            if index.by_runs:
                for at, first, n in index.runs:
                    flat[:, at : at + n].copy_(rows[:, first : first + n])
            else:
                torch.index_select(rows, 1, index.ids, out=flat)
            return
        qk, qv, sk, sv, end = self._int8_offsets
        kv = src.index_select(1, index.ids)  # [2, n, bs, h, d]
        for part, per, q_at, s_at, s_end in ((0, "channel", qk, sk, sv), (1, "token", qv, sv, end)):
            q, scale = quantize_kv(kv[part], per)
            out[q_at : q_at + q.numel()].view(torch.int8).view(q.shape).copy_(q)
            out[s_at:s_end].view(torch.float32).view(scale.shape).copy_(scale)

    @staticmethod
    def write_header(out: torch.Tensor, fingerprint: int, layer: int) -> None:
        out[:HEADER_BYTES].view(torch.int64).copy_(torch.tensor([fingerprint, layer]))

    @staticmethod
    def write_cancel(out: torch.Tensor, fingerprint: int) -> None:
        """Make `out` a cancel message: right size and tag, header layer CANCELLED."""
        out[:HEADER_BYTES].view(torch.int64).copy_(torch.tensor([fingerprint, CANCELLED]))

    @staticmethod
    def check_header(buf: torch.Tensor, fingerprint: int, layer: int) -> bool:
        """True for the expected layer message, False for a cancel message of this transfer;
        raises TransferError for anything else (messages were mixed up)."""
        got = buf[:HEADER_BYTES].view(torch.int64).tolist()
        if got == [fingerprint, layer]:
            return True
        if got == [fingerprint, CANCELLED]:
            return False
        raise TransferError(
            f"message for layer {layer} carried (transfer {got[0]:#x}, layer {got[1]}), "
            f"expected ({fingerprint:#x}, {layer}): messages were mixed up"
        )

    def unpack(
        self,
        buf: torch.Tensor,
        kv_layer: torch.Tensor,
        block_ids: torch.Tensor | BlockIndex,
        heads: slice,
    ) -> None:
        """Scatter `buf` (header already checked) into kv_layer[:, block_ids][..., heads, :]."""
        index = _as_index(block_ids)
        block_ids = index.ids
        dst = kv_layer[:, :, :, heads, :]
        if self.compress is None:
            payload = buf[HEADER_BYTES:].view(self.dtype).view(2, *self._one_shape)
            rows = self._rows(kv_layer, heads)
            if rows is None:
                dst.index_copy_(1, block_ids, payload)
                return
            flat = payload.view(2, self.num_blocks, -1)
            if index.by_runs:
                for at, first, n in index.runs:
                    rows[:, first : first + n].copy_(flat[:, at : at + n])
            else:
                rows.index_copy_(1, block_ids, flat)
            return
        qk, qv, sk, sv, end = self._int8_offsets
        nq = qv - qk
        b, bs, h, d = self._one_shape
        for part, q_at, s_at, s_end, s_shape in (
            (0, qk, sk, sv, (1, 1, h, d)),
            (1, qv, sv, end, (b, bs, h, 1)),
        ):
            q = buf[q_at : q_at + nq].view(torch.int8).view(self._one_shape)
            scale = buf[s_at:s_end].view(torch.float32).view(s_shape)
            dst[part].index_copy_(0, block_ids, dequantize_kv(q, scale, self.dtype))
