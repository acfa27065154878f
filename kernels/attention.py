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

Both kernels keep an fp32 online softmax (running max ``m``, running sum ``l``, unnormalised
accumulator) in base 2, and read the cache token by token through the block table, so any
block size works. Every sequence must attend at least one key (``context_lens >= 1``).
Dots use ``input_precision="ieee"``: fp32 inputs must not drop to TF32 (parity with the fp32
reference); for bf16/fp16 inputs the setting is moot and tensor cores are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    num_sms,
    runnable,
    upcast_dots,
    use_triton,
)

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e))


# ==== paged decode =========================================================================


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
    k = k_cache[idx].view(b, m * bs, hkv, d).transpose(1, 2)  # [B, Hkv, T, D]
    v = v_cache[idx].view(b, m * bs, hkv, d).transpose(1, 2)
    mask = torch.arange(m * bs, device=q.device)[None, :] < context_lens[:, None]
    # Grouped matmuls instead of SDPA: on CPU, SDPA with a mask and GQA falls back to a slow
    # math path in bf16 (measured 12x slower at batch 32). Scores and softmax in fp32.
    qg = q.view(b, hkv, h // hkv, d)
    s = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G, T]
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = s.softmax(-1).to(v.dtype)
    return torch.matmul(p, v).reshape(b, h, d)


@triton.jit
def _paged_decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    o_part_ptr, lse_part_ptr,  # [B, H, S, D] fp32 (normalised per split), [B, H, S] fp32
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh,
    stride_cb, stride_ct, stride_ch,  # cache strides (block, token, head); dim stride is 1
    stride_btb,
    block_size, split_len,  # split_len: tokens per split, a multiple of BLOCK_N
    num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Program (b, kv head, split): the GROUP query heads sharing one KV head ride together as
    # the rows of a [BLOCK_G, D] tile (padded to >= 16 for tl.dot), so each K/V tile is read
    # once per group. Split s covers keys [s * split_len, min((s + 1) * split_len, ctx)).
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    lo = s * split_len
    hi = tl.minimum(lo + split_len, ctx)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = hkv * GROUP + offs_g
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        page = tl.load(block_tables_ptr + b * stride_btb + offs_n // block_size, mask=n_mask,
                       other=0).to(tl.int64)
        rows = page * stride_cb + (offs_n % block_size) * stride_ct + hkv * stride_ch
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        # each tile has >= 1 valid key, so m_new is finite and exp2(-inf - m_new) == 0
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v.dtype)  # as flash attention: P is rounded to the input dtype for P @ V
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new

    # An empty split (lo >= ctx) stores o = 0, lse = -inf: weight 0 in the reduction.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    row = (b * tl.num_programs(1) * GROUP + heads) * num_splits + s  # index into [B, H, S]
    tl.store(o_part_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o,
             mask=g_mask[:, None] & d_mask[None, :])
    tl.store(lse_part_ptr + row, lse, mask=g_mask)


@triton.jit
def _paged_decode_reduce_kernel(
    o_part_ptr, lse_part_ptr, out_ptr,
    stride_ob, stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (b, h): out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse), the
    # exact softmax over the union of the splits' keys.
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    base = (b * tl.num_programs(1) + h) * num_splits
    lse = tl.load(lse_part_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    o = tl.load(o_part_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _decode_num_splits(q: torch.Tensor, num_kv_heads: int, max_ctx: int, block_n: int) -> int:
    """Split-K only when (batch x kv heads) programs would leave the GPU idle: aim for about
    two programs per SM, never splitting below 4 tiles of keys."""
    programs = q.shape[0] * num_kv_heads
    want = triton.cdiv(2 * num_sms(q), programs)
    return max(1, min(want, triton.cdiv(max_ctx, 4 * block_n), 64))


def _paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    b, h, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    group = h // hkv
    out = torch.empty_like(q)
    if b == 0:
        return out
    block_n = 64 if q.is_cuda else 32
    # Upper bound on any context from shapes alone: no device sync to read context_lens.
    max_ctx = block_tables.shape[1] * bs
    auto = num_splits is None
    if auto:
        num_splits = _decode_num_splits(q, hkv, max_ctx, block_n)
    split_len = triton.cdiv(triton.cdiv(max_ctx, num_splits), block_n) * block_n
    if auto:  # rounding split_len up to whole tiles may leave trailing splits empty
        num_splits = triton.cdiv(max_ctx, split_len)
    o_part = torch.empty(b, h, num_splits, d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, h, num_splits, dtype=torch.float32, device=q.device)
    block_d = max(16, next_pow2(d))
    with device_guard(q):
        runnable(_paged_decode_attention_kernel)[(b, hkv, num_splits)](
            q, k_cache, v_cache, block_tables, context_lens, o_part, lse_part,
            scale * LOG2E,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_tables.stride(0),
            bs, split_len, num_splits,
            GROUP=group, HEAD_DIM=d,
            BLOCK_G=max(16, next_pow2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
            UPCAST=upcast_dots(q.dtype),
        )
        runnable(_paged_decode_reduce_kernel)[(b, h)](
            o_part, lse_part, out, out.stride(0), out.stride(1), num_splits,
            HEAD_DIM=d, BLOCK_S=next_pow2(num_splits), BLOCK_D=next_pow2(d),
        )
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``q [B, H, D]`` → ``[B, H, D]``; sequence i attends its first ``context_lens[i]`` keys."""
    name = "paged_decode_attention"
    check(q.dim() == 3, f"{name}: q must be [batch, heads, dim], got {tuple(q.shape)}")
    check(k_cache.shape == v_cache.shape and k_cache.dim() == 4,
          f"{name}: caches must be [blocks, block_size, kv_heads, dim], got "
          f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    check(q.shape[2] == k_cache.shape[3], f"{name}: head_dim of q ({q.shape[2]}) differs "
          f"from the cache ({k_cache.shape[3]})")
    check(q.shape[1] % k_cache.shape[2] == 0,
          f"{name}: heads ({q.shape[1]}) not a multiple of kv_heads ({k_cache.shape[2]})")
    check(block_tables.dim() == 2 and block_tables.shape[0] == q.shape[0],
          f"{name}: block_tables must be [batch, max_blocks], got {tuple(block_tables.shape)}")
    check(context_lens.shape == (q.shape[0],), f"{name}: one context length per row")
    check_dtype(name, q, FLOATS)
    check(k_cache.dtype == v_cache.dtype == q.dtype,
          f"{name}: q {q.dtype}, caches {k_cache.dtype}/{v_cache.dtype} must match")
    check_dtype(f"{name} block_tables", block_tables, INTS)
    check_dtype(f"{name} context_lens", context_lens, INTS)
    check_same_device(name, q, k_cache, v_cache, block_tables, context_lens)
    if not use_triton(q):
        return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
    check(q.stride(2) == 1, f"{name}: q's last dim must be contiguous")
    check(k_cache.is_contiguous() and v_cache.is_contiguous(), f"{name}: caches must be contiguous")
    check(block_tables.stride(1) == 1 and context_lens.is_contiguous(),
          f"{name}: block_tables rows and context_lens must be contiguous")
    return _paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale)


# ==== varlen prefill =======================================================================


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


@triton.jit
def _varlen_prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    k_cache_ptr, v_cache_ptr, block_tables_ptr,
    cu_seqlens_ptr, prefix_lens_ptr, tile_seq_ptr, tile_idx_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_cb, stride_ct, stride_ch, stride_btb,
    block_size, num_seqs,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_PREFIX: tl.constexpr, UPCAST: tl.constexpr,
):
    # Program (tile, head): rows j in [m0, m0 + BLOCK_M) of sequence `seq`'s new tokens.
    # tile_seq/tile_idx map the flat tile id to (seq, m-tile); ids past the last tile carry
    # seq == num_seqs and do nothing (the grid is an upper bound known without a sync).
    #
    #   keys:  0 ........ p-1 | p ................ p+n-1
    #          cached prefix    new tokens (local t = 0..n-1); visible iff t <= j
    tile = tl.program_id(0)
    h = tl.program_id(1)
    hkv = h // GROUP
    seq = tl.load(tile_seq_ptr + tile)
    valid = seq < num_seqs
    seq = tl.minimum(seq, num_seqs - 1)
    q0 = tl.load(cu_seqlens_ptr + seq)
    n = tl.where(valid, tl.load(cu_seqlens_ptr + seq + 1) - q0, 0)
    m0 = tl.load(tile_idx_ptr + tile) * BLOCK_M

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < n
    d_mask = offs_d < HEAD_DIM
    tok_m = (q0 + offs_m).to(tl.int64)
    q = tl.load(q_ptr + tok_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # 1) the cached prefix: every query sees all p keys. The first tile seen by a row always
    #    has a visible key (prefix key 0, or new key 0 <= j), so m_new stays finite.
    if HAS_PREFIX:
        p_len = tl.where(valid, tl.load(prefix_lens_ptr + seq), 0)
        for start in range(0, p_len, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < p_len
            page = tl.load(block_tables_ptr + seq * stride_btb + offs_n // block_size,
                           mask=n_mask, other=0).to(tl.int64)
            rows = page * stride_cb + (offs_n % block_size) * stride_ct + hkv * stride_ch
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp2(qk - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(v.dtype)
            if UPCAST:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new

    # 2) the new tokens, causal: keys past this tile's last row are never visible.
    hi = tl.minimum(n, m0 + BLOCK_M)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n
        tok_n = (q0 + offs_n).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + tok_n[:, None] * stride_kt + hkv * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + tok_n[:, None] * stride_vt + hkv * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        visible = n_mask[None, :] & (offs_n[None, :] <= offs_m[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v.dtype)
        if UPCAST:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # rows past n (never stored)
    o = acc / l_safe[:, None]
    tl.store(o_ptr + tok_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _prefill_tiles(cu_seqlens: torch.Tensor, total: int, block_m: int):
    """Map flat tile ids to (sequence, m-tile) on the device, no host sync. Returns the grid
    size (an upper bound: sum_i ceil(n_i / M) <= ceil(T / M) + S) and the two index tensors;
    ids past the real tiles get sequence S."""
    num_seqs = cu_seqlens.shape[0] - 1
    grid = triton.cdiv(total, block_m) + num_seqs
    cu = cu_seqlens.long()
    tiles = (cu[1:] - cu[:-1] + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)
    ids = torch.arange(grid, device=cu.device)
    seq = torch.searchsorted(ends, ids, right=True)
    first = (ends - tiles).index_select(0, seq.clamp(max=num_seqs - 1))
    return grid, seq.to(torch.int32), (ids - first).to(torch.int32)


def _varlen_prefill_attention_triton(
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
    t, h, d = q.shape
    hkv = k.shape[1]
    out = torch.empty_like(q)
    num_seqs = prefix_lens.shape[0]
    if t == 0 or num_seqs == 0:
        return out
    block_m, block_n = (64, 64) if q.is_cuda else (32, 32)
    grid, tile_seq, tile_idx = _prefill_tiles(cu_seqlens, t, block_m)
    has_prefix = k_cache is not None
    if not has_prefix:  # unused pointers; never dereferenced with HAS_PREFIX=False
        k_cache, v_cache, block_tables = k, v, cu_seqlens.view(1, -1)
    with device_guard(q):
        runnable(_varlen_prefill_attention_kernel)[(grid, h)](
            q, k, v, out, k_cache, v_cache, block_tables,
            cu_seqlens, prefix_lens, tile_seq, tile_idx,
            scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1) if has_prefix else 0,
            k_cache.stride(2) if has_prefix else 0, block_tables.stride(0),
            k_cache.shape[1] if has_prefix else 1, num_seqs,
            GROUP=h // hkv, HEAD_DIM=d,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(d)),
            HAS_PREFIX=has_prefix, UPCAST=upcast_dots(q.dtype),
            num_warps=4, num_stages=2,  # two K/V stages fit the shared memory of any sm_80+
        )
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
    """Packed causal attention; ``q [T, H, D]``, ``k, v [T, Hkv, D]`` (the new tokens only).

    ``k_cache, v_cache, block_tables`` are required when any ``prefix_lens > 0``; that is
    checked except on the GPU Triton path, where reading ``prefix_lens`` would sync."""
    name = "varlen_prefill_attention"
    check(q.dim() == 3 and k.dim() == 3 and k.shape == v.shape,
          f"{name}: q [T, H, D] and k, v [T, Hkv, D] required, got {tuple(q.shape)}, "
          f"{tuple(k.shape)}, {tuple(v.shape)}")
    check(q.shape[0] == k.shape[0], f"{name}: q and k token counts differ")
    check(q.shape[2] == k.shape[2], f"{name}: q and k head_dim differ")
    check(q.shape[1] % k.shape[1] == 0,
          f"{name}: heads ({q.shape[1]}) not a multiple of kv_heads ({k.shape[1]})")
    check(cu_seqlens.dim() == 1 and prefix_lens.dim() == 1
          and prefix_lens.shape[0] == cu_seqlens.shape[0] - 1,
          f"{name}: need 1-D cu_seqlens and len(prefix_lens) == len(cu_seqlens) - 1")
    check_dtype(name, q, FLOATS)
    check(k.dtype == v.dtype == q.dtype, f"{name}: q, k, v dtypes differ")
    check_dtype(f"{name} cu_seqlens", cu_seqlens, INTS)
    check_dtype(f"{name} prefix_lens", prefix_lens, INTS)
    cached = (k_cache, v_cache, block_tables)
    if any(c is not None for c in cached):
        check(all(c is not None for c in cached),
              f"{name}: pass all of k_cache, v_cache, block_tables or none")
        check(k_cache.shape == v_cache.shape and k_cache.dim() == 4
              and k_cache.shape[2:] == k.shape[1:],
              f"{name}: caches must be [blocks, block_size, {k.shape[1]}, {k.shape[2]}], got "
              f"{tuple(k_cache.shape)}")
        check(k_cache.dtype == v_cache.dtype == q.dtype, f"{name}: cache dtype differs from q")
        check(block_tables.dim() == 2 and block_tables.shape[0] == prefix_lens.shape[0],
              f"{name}: block_tables must be [num_seqs, max_blocks]")
        check_dtype(f"{name} block_tables", block_tables, INTS)
    elif prefix_lens.device.type == "cpu" or not use_triton(q):  # a sync on GPU: skip there
        check(not bool((prefix_lens > 0).any()),
              f"{name}: cached prefixes need k_cache, v_cache, block_tables")
    check_same_device(name, q, k, v, cu_seqlens, prefix_lens, *cached)
    if not use_triton(q):
        return varlen_prefill_attention_ref(
            q, k, v, cu_seqlens, prefix_lens, k_cache, v_cache, block_tables, scale
        )
    check(q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1,
          f"{name}: the last dim of q, k, v must be contiguous")
    check(cu_seqlens.is_contiguous() and prefix_lens.is_contiguous(),
          f"{name}: cu_seqlens and prefix_lens must be contiguous")
    if k_cache is not None:
        check(k_cache.is_contiguous() and v_cache.is_contiguous() and block_tables.stride(1) == 1,
              f"{name}: caches and block_tables must be contiguous")
    return _varlen_prefill_attention_triton(
        q, k, v, cu_seqlens, prefix_lens, k_cache, v_cache, block_tables, scale
    )
