"""Gather / scatter whole KV blocks between the paged cache and a contiguous buffer.

The instance's cache is one tensor ``kv[num_layers, 2, num_blocks, block_size, kv_heads, dim]``
(index 0 of dim 1 is K, 1 is V). ``gather_blocks(kv, ids)`` → ``[L, 2, n, bs, kv_heads, dim]``
(or ``[2, n, ...]`` for one ``layer``): what the KV-transfer layer sends. ``scatter_blocks``
is the inverse; its ``block_ids`` must be distinct (duplicates race, as with ``index_copy_``).

In a contiguous cache one block of one (layer, K|V) plane is ``bs * kv_heads * dim``
contiguous elements, so the kernels copy flat runs:

    kv   viewed as [planes, num_blocks, E]      planes = 2L (or 2 for one layer)
    buf  viewed as [planes, n,          E]      buf[p, j] <-> kv[p, block_ids[j]]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import FLOATS, INTS, check, check_dtype, device_guard, runnable, use_triton

COPY_BLOCK = 2048  # elements per copy step


def gather_blocks_ref(
    kv: torch.Tensor, block_ids: torch.Tensor, layer: int | None = None
) -> torch.Tensor:
    src = kv if layer is None else kv[layer]
    return src.index_select(src.dim() - 4, block_ids)


def scatter_blocks_ref(
    buf: torch.Tensor, kv: torch.Tensor, block_ids: torch.Tensor, layer: int | None = None
) -> None:
    dst = kv if layer is None else kv[layer]
    dst.index_copy_(dst.dim() - 4, block_ids, buf)


@triton.jit
def _gather_blocks_kernel(
    kv_ptr, buf_ptr, block_ids_ptr, num_blocks, num_ids, block_numel, BLOCK: tl.constexpr,
):
    # Program (j, plane): buf[plane, j] = kv[plane, block_ids[j]]
    j = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    src = (plane * num_blocks + tl.load(block_ids_ptr + j).to(tl.int64)) * block_numel
    dst = (plane * num_ids + j) * block_numel
    for start in range(0, block_numel, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < block_numel
        tl.store(buf_ptr + dst + offs, tl.load(kv_ptr + src + offs, mask=mask), mask=mask)


@triton.jit
def _scatter_blocks_kernel(
    buf_ptr, kv_ptr, block_ids_ptr, num_blocks, num_ids, block_numel, BLOCK: tl.constexpr,
):
    # Program (j, plane): kv[plane, block_ids[j]] = buf[plane, j]
    j = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    src = (plane * num_ids + j) * block_numel
    dst = (plane * num_blocks + tl.load(block_ids_ptr + j).to(tl.int64)) * block_numel
    for start in range(0, block_numel, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < block_numel
        tl.store(kv_ptr + dst + offs, tl.load(buf_ptr + src + offs, mask=mask), mask=mask)


def _planes(kv: torch.Tensor, layer: int | None) -> tuple[torch.Tensor, int, int, int]:
    """(the cache or its one layer, planes, num_blocks, elements per block)."""
    src = kv if layer is None else kv[layer]
    return src, src.shape[:-4].numel(), src.shape[-4], src.shape[-3:].numel()


def _gather_blocks_triton(
    kv: torch.Tensor, block_ids: torch.Tensor, layer: int | None
) -> torch.Tensor:
    src, planes, nb, numel = _planes(kv, layer)
    shape = list(src.shape)
    shape[-4] = block_ids.shape[0]
    buf = torch.empty(shape, dtype=kv.dtype, device=kv.device)
    if buf.numel():
        with device_guard(kv):
            runnable(_gather_blocks_kernel)[(block_ids.shape[0], planes)](
                src, buf, block_ids, nb, block_ids.shape[0], numel,
                BLOCK=min(COPY_BLOCK, triton.next_power_of_2(numel)),
            )
    return buf


def _scatter_blocks_triton(
    buf: torch.Tensor, kv: torch.Tensor, block_ids: torch.Tensor, layer: int | None
) -> None:
    dst, planes, nb, numel = _planes(kv, layer)
    if buf.numel():
        with device_guard(kv):
            runnable(_scatter_blocks_kernel)[(block_ids.shape[0], planes)](
                buf, dst, block_ids, nb, block_ids.shape[0], numel,
                BLOCK=min(COPY_BLOCK, triton.next_power_of_2(numel)),
            )


def _check(kv: torch.Tensor, block_ids: torch.Tensor, layer: int | None) -> None:
    check(kv.dim() == 6, "blocks: kv must be [layers, 2, blocks, block_size, kv_heads, dim]")
    check(block_ids.dim() == 1, "blocks: block_ids must be 1-D")
    check_dtype("blocks block_ids", block_ids, INTS)
    check_dtype("blocks kv", kv, FLOATS + (torch.int8, torch.uint8))
    check(layer is None or 0 <= layer < kv.shape[0], f"blocks: layer {layer} out of range")
    check(block_ids.device == kv.device, "blocks: block_ids and kv are on different devices")


def gather_blocks(
    kv: torch.Tensor, block_ids: torch.Tensor, layer: int | None = None
) -> torch.Tensor:
    _check(kv, block_ids, layer)
    if not use_triton(kv):
        return gather_blocks_ref(kv, block_ids.long(), layer)
    check(kv.is_contiguous() and block_ids.is_contiguous(),
          "gather_blocks: kv and block_ids must be contiguous")
    return _gather_blocks_triton(kv, block_ids, layer)


def scatter_blocks(
    buf: torch.Tensor, kv: torch.Tensor, block_ids: torch.Tensor, layer: int | None = None
) -> None:
    _check(kv, block_ids, layer)
    shape = list(kv.shape if layer is None else kv.shape[1:])
    shape[-4] = block_ids.shape[0]
    check(list(buf.shape) == shape, f"scatter_blocks: buffer {tuple(buf.shape)} != {tuple(shape)}")
    check(buf.dtype == kv.dtype, f"scatter_blocks: dtype {buf.dtype} differs from the cache's "
          f"{kv.dtype}")
    check(buf.device == kv.device, "scatter_blocks: buffer and kv are on different devices")
    if not use_triton(kv):
        scatter_blocks_ref(buf, kv, block_ids.long(), layer)
        return
    check(kv.is_contiguous() and buf.is_contiguous() and block_ids.is_contiguous(),
          "scatter_blocks: kv, buf and block_ids must be contiguous")
    _scatter_blocks_triton(buf, kv, block_ids, layer)
