"""Gather / scatter whole KV blocks between the paged cache and a contiguous buffer.

The instance's cache is one tensor ``kv[num_layers, 2, num_blocks, block_size, kv_heads, dim]``
(index 0 of dim 1 is K, 1 is V). ``gather_blocks(kv, ids)`` → ``[L, 2, n, bs, kv_heads, dim]``
(or ``[2, n, ...]`` for one ``layer``): what the KV-transfer layer sends.
"""

from __future__ import annotations

import torch

from .dispatch import check


def gather_blocks_ref(kv: torch.Tensor, block_ids: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    src = kv if layer is None else kv[layer]
    return src.index_select(src.dim() - 4, block_ids)


def scatter_blocks_ref(
    buf: torch.Tensor, kv: torch.Tensor, block_ids: torch.Tensor, layer: int | None = None
) -> None:
    dst = kv if layer is None else kv[layer]
    dst.index_copy_(dst.dim() - 4, block_ids, buf)


def _check(kv: torch.Tensor, block_ids: torch.Tensor, layer: int | None) -> None:
    check(kv.dim() == 6, "blocks: kv must be [layers, 2, blocks, block_size, kv_heads, dim]")
    check(block_ids.dim() == 1 and block_ids.dtype in (torch.int32, torch.int64),
          "blocks: block_ids must be a 1-D integer tensor")
    check(layer is None or 0 <= layer < kv.shape[0], f"blocks: layer {layer} out of range")


def gather_blocks(kv: torch.Tensor, block_ids: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    _check(kv, block_ids, layer)
    return gather_blocks_ref(kv, block_ids.long(), layer)


def scatter_blocks(
    buf: torch.Tensor, kv: torch.Tensor, block_ids: torch.Tensor, layer: int | None = None
) -> None:
    _check(kv, block_ids, layer)
    shape = list(kv.shape if layer is None else kv.shape[1:])
    shape[-4] = block_ids.shape[0]
    check(list(buf.shape) == shape, f"scatter_blocks: buffer {tuple(buf.shape)} != {tuple(shape)}")
    check(buf.dtype == kv.dtype, "scatter_blocks: dtype differs from the cache")
    scatter_blocks_ref(buf, kv, block_ids.long(), layer)
