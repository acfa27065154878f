"""Attention over the paged KV cache: decode (one query per sequence) and varlen prefill.

Cache layout (one layer): ``[num_blocks, block_size, num_kv_heads, head_dim]`` for K and V.
``block_tables[i, j]`` is the j-th block of sequence i (rows padded with any valid block id;
entries past a sequence's length are never read unmasked). GQA: query head h reads KV head
``h // (num_heads // num_kv_heads)``.

Packed prefill (Prepacking): the new tokens of S sequences are concatenated into one
``[T, H, D]`` batch; ``cu_seqlens[i]:cu_seqlens[i+1]`` are sequence i's new tokens, which sit
after ``prefix_lens[i]`` tokens already in the cache (a prefix-cache hit or earlier chunks):

    keys of seq i:   [ cached prefix (p_i, read via block table) | new tokens (n_i) ]
    query j of seq i attends key t  iff  t <= p_i + j      (causal, never across sequences)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import check


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    b, h, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    m = block_tables.shape[1]
    idx = block_tables.long()
    k = k_cache[idx].view(b, m * bs, hkv, d).transpose(1, 2)
    v = v_cache[idx].view(b, m * bs, hkv, d).transpose(1, 2)
    mask = torch.arange(m * bs, device=q.device)[None, :] < context_lens[:, None]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=hkv != h
    )
    return out.squeeze(2)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``q [B, H, D]`` → ``[B, H, D]``; sequence i attends its first ``context_lens[i]`` keys."""
    check(q.dim() == 3, f"paged_decode_attention: q must be [batch, heads, dim], got {tuple(q.shape)}")
    check(k_cache.shape == v_cache.shape and k_cache.dim() == 4,
          "paged_decode_attention: caches must be [blocks, block_size, kv_heads, dim]")
    check(q.shape[2] == k_cache.shape[3], "paged_decode_attention: head_dim differs from cache")
    check(q.shape[1] % k_cache.shape[2] == 0, "paged_decode_attention: heads % kv_heads != 0")
    check(block_tables.dim() == 2 and block_tables.shape[0] == q.shape[0],
          "paged_decode_attention: block_tables must be [batch, max_blocks]")
    check(context_lens.shape == (q.shape[0],), "paged_decode_attention: one context length per row")
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)


def varlen_prefill_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefix_lens: torch.Tensor,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    block_tables: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    out = torch.empty_like(q)
    h, hkv = q.shape[1], k.shape[1]
    cu = cu_seqlens.tolist()
    prefixes = prefix_lens.tolist()
    for i, p in enumerate(prefixes):
        s, e = cu[i], cu[i + 1]
        qi = q[s:e].transpose(0, 1)  # [H, n, D]
        ki, vi = k[s:e], v[s:e]
        if p == 0:
            o = F.scaled_dot_product_attention(
                qi, ki.transpose(0, 1), vi.transpose(0, 1), is_causal=True, scale=scale,
                enable_gqa=hkv != h,
            )
        else:
            bs = k_cache.shape[1]
            blocks = block_tables[i, : (p + bs - 1) // bs].long()
            kp = k_cache[blocks].reshape(-1, hkv, k.shape[2])[:p]
            vp = v_cache[blocks].reshape(-1, hkv, k.shape[2])[:p]
            kk = torch.cat([kp, ki]).transpose(0, 1)
            vv = torch.cat([vp, vi]).transpose(0, 1)
            n = e - s
            mask = torch.arange(p + n, device=q.device)[None, :] <= (
                p + torch.arange(n, device=q.device)[:, None]
            )
            o = F.scaled_dot_product_attention(
                qi, kk, vv, attn_mask=mask, scale=scale, enable_gqa=hkv != h
            )
        out[s:e] = o.transpose(0, 1)
    return out


def varlen_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefix_lens: torch.Tensor,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    block_tables: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Packed causal attention; ``q [T, H, D]``, ``k, v [T, Hkv, D]`` (the new tokens only)."""
    check(q.dim() == 3 and k.dim() == 3 and k.shape == v.shape,
          "varlen_prefill_attention: q [T, H, D] and k, v [T, Hkv, D] required")
    check(q.shape[0] == k.shape[0], "varlen_prefill_attention: q and k token counts differ")
    check(q.shape[1] % k.shape[1] == 0, "varlen_prefill_attention: heads % kv_heads != 0")
    check(cu_seqlens.dim() == 1 and prefix_lens.shape[0] == cu_seqlens.shape[0] - 1,
          "varlen_prefill_attention: need len(prefix_lens) == len(cu_seqlens) - 1")
    if bool((prefix_lens > 0).any()):
        check(k_cache is not None and v_cache is not None and block_tables is not None,
              "varlen_prefill_attention: cached prefixes need k_cache, v_cache, block_tables")
    return varlen_prefill_attention_ref(
        q, k, v, cu_seqlens, prefix_lens, k_cache, v_cache, block_tables, scale
    )
