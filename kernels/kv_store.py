"""Write new K/V rows into the paged cache at flat slot indices.

Cache layout (one layer): ``k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]``;
token t of a request lives at slot ``block_ids[t // block_size] * block_size + t % block_size``.
"""

from __future__ import annotations

import torch

from .dispatch import check


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    hk, d = k_cache.shape[-2:]
    k_cache.view(-1, hk, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, hk, d).index_copy_(0, slot_mapping, v)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    check(k.shape == v.shape and k.dim() == 3, "store_kv: k and v must be [tokens, kv_heads, dim]")
    check(k_cache.shape == v_cache.shape and k_cache.dim() == 4,
          "store_kv: caches must be [blocks, block_size, kv_heads, dim]")
    check(k.shape[1:] == k_cache.shape[2:], "store_kv: head count/dim differ from the cache")
    check(slot_mapping.shape == (k.shape[0],), "store_kv: one slot per token required")
    check(k.dtype == k_cache.dtype, f"store_kv: dtype {k.dtype} != cache {k_cache.dtype}")
    check(k_cache.is_contiguous() and v_cache.is_contiguous(), "store_kv: caches must be contiguous")
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
