"""The model runner: owns the KV cache tensor and turns a ``ScheduledBatch`` into tensors.

Cache: one tensor per rank, ``kv[layers, 2, num_blocks, block_size, kv_heads, head_dim]``
(K at index 0, V at 1). One tensor means a block of every layer is one index along dim 2,
which is what block gather/scatter for KV transfer wants.

Token t of a request lives at flat slot ``block_ids[t // bs] * bs + t % bs``::

    block_ids = [7, 2]   bs = 4        tokens 0..5  →  slots 28 29 30 31 8 9
"""

from __future__ import annotations

from collections.abc import Callable

import psutil
import torch

from .config import CacheConfig, ModelConfig
from .model import AttnMetadata, LlamaModel
from .scheduler import ScheduledBatch

DEFAULT_KV_FRACTION = 0.25  # of available RAM when no budget is given
DEFAULT_KV_CAP = 4 << 30


def bytes_per_block(cfg: ModelConfig, block_size: int, kv_heads: int) -> int:
    elem = torch.empty((), dtype=cfg.torch_dtype).element_size()
    return cfg.num_layers * 2 * block_size * kv_heads * cfg.head_dim * elem


def num_kv_blocks(cfg: ModelConfig, cache: CacheConfig, kv_heads: int) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    budget = cache.memory_bytes
    if budget is None:
        budget = min(int(psutil.virtual_memory().available * DEFAULT_KV_FRACTION), DEFAULT_KV_CAP)
    n = budget // bytes_per_block(cfg, cache.block_size, kv_heads)
    if n < 2:
        raise ValueError(
            f"KV cache budget of {budget} bytes holds fewer than 2 blocks of "
            f"{bytes_per_block(cfg, cache.block_size, kv_heads)} bytes; raise --kv-cache-memory"
        )
    return int(n)


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: CacheConfig, device: torch.device | None = None) -> None:
        self.model = model
        self.block_size = cache.block_size
        self.device = device or torch.device("cpu")
        cfg = model.cfg
        self.num_blocks = num_kv_blocks(cfg, cache, model.num_kv_heads)
        self.kv = torch.zeros(
            cfg.num_layers, 2, self.num_blocks, self.block_size, model.num_kv_heads, cfg.head_dim,
            dtype=cfg.torch_dtype, device=self.device,
        )

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, AttnMetadata, torch.Tensor]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_idx: list[int] = []
        cu, prefix, tables, ctx = [0], [], [], []
        offset = 0
        for i, (req, n) in enumerate(zip(batch.requests, batch.num_new)):
            s = req.num_computed
            ids.extend(req.token_slice(s, s + n))
            table = req.block_ids
            positions.extend(range(s, s + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(s, s + n))
            tables.append(table)
            offset += n
            if s + n == req.num_tokens:
                sample_idx.append(offset - 1)
            if i < batch.num_decodes:
                ctx.append(s + 1)
            else:
                cu.append(cu[-1] + n)
                prefix.append(s)
        nd = batch.num_decodes
        dev = self.device
        meta = AttnMetadata(
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decodes=nd,
            decode_block_tables=_pad(tables[:nd]).to(dev),
            decode_context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=dev),
            prefix_lens=torch.tensor(prefix, dtype=torch.int32, device=dev),
            prefill_block_tables=_pad(tables[nd:]).to(dev),
            has_prefix=any(p > 0 for p in prefix),
        )
        return (
            torch.tensor(ids, dtype=torch.int64, device=dev),
            meta,
            torch.tensor(sample_idx, dtype=torch.int64, device=dev),
        )

    def execute(
        self, batch: ScheduledBatch, on_layer: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Run one step; returns fp32 logits for the requests that sample, in batch order."""
        ids, meta, sample_idx = self.prepare(batch)
        return self.model.forward(ids, meta, self.kv, sample_idx, on_layer)


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), max(width, 1), dtype=torch.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
    return out
