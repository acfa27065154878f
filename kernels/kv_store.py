"""Write new K/V rows into the paged cache at flat slot indices.

Cache layout (one layer): ``k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]``;
token t of a request lives at slot ``block_ids[t // block_size] * block_size + t % block_size``.
Slots must be distinct within one call (two writers to a slot race, as with ``index_copy_``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import (
    FLOATS,
    INTS,
    check,
    check_dtype,
    check_same_device,
    device_guard,
    next_pow2,
    runnable,
    use_triton,
)


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    hk, d = k_cache.shape[-2:]
    k_cache.view(-1, hk, d).index_copy_(0, slot_mapping.long(), k)
    v_cache.view(-1, hk, d).index_copy_(0, slot_mapping.long(), v)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_vt,
    row,  # kv_heads * head_dim: one token's K (or V), contiguous in both source and cache
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    for start in range(0, row, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < row
        k = tl.load(k_ptr + t * stride_kt + offs, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + offs, mask=mask)
        tl.store(k_cache_ptr + slot * row + offs, k, mask=mask)
        tl.store(v_cache_ptr + slot * row + offs, v, mask=mask)


def _store_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if k.shape[0] == 0:
        return
    row = k.shape[1] * k.shape[2]
    with device_guard(k):
        runnable(_store_kv_kernel)[(k.shape[0],)](
            k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), row,
            BLOCK=min(next_pow2(row), 4096),
        )


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    check(k.shape == v.shape and k.dim() == 3,
          f"store_kv: k and v must be [tokens, kv_heads, dim], got {tuple(k.shape)}, "
          f"{tuple(v.shape)}")
    check(k_cache.shape == v_cache.shape and k_cache.dim() == 4,
          "store_kv: caches must be [blocks, block_size, kv_heads, dim]")
    check(k.shape[1:] == k_cache.shape[2:], f"store_kv: k rows {tuple(k.shape[1:])} differ "
          f"from the cache's {tuple(k_cache.shape[2:])}")
    check(slot_mapping.shape == (k.shape[0],), "store_kv: one slot per token required")
    check_dtype("store_kv", k, FLOATS)
    check(k.dtype == v.dtype == k_cache.dtype == v_cache.dtype,
          f"store_kv: dtype {k.dtype}/{v.dtype} != cache {k_cache.dtype}/{v_cache.dtype}")
    check_dtype("store_kv slot_mapping", slot_mapping, INTS)
    check(k_cache.is_contiguous() and v_cache.is_contiguous(),
          "store_kv: caches must be contiguous")
    check_same_device("store_kv", k, v, k_cache, v_cache, slot_mapping)
    if not use_triton(k):
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
        return
    row_ok = all(t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (k, v))
    check(row_ok, "store_kv: each token's [kv_heads, dim] block of k and v must be contiguous")
    check(slot_mapping.is_contiguous(), "store_kv: slot_mapping must be contiguous")
    _store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
