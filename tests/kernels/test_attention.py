"""Paged decode attention (split-K) and varlen prefill attention against their references."""

from __future__ import annotations

import pytest
import torch
from pdserve.kernels import attention as A

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16


def _cache(num_blocks, bs, hkv, d, dtype, device, gen):
    k = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(device, dtype)
    return k, v


def _tables(lens, bs, num_blocks, width, gen, device):
    """Distinct random blocks per sequence; unused entries padded with block 0."""
    rows = torch.zeros(len(lens), width, dtype=torch.int32)
    for i, n in enumerate(lens):
        need = -(-n // bs)
        rows[i, :need] = torch.randperm(num_blocks, generator=gen)[:need].to(torch.int32)
    return rows.to(device)


DTYPES = [FP32, BF16, FP16]


def _id(v) -> str:
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else str(v)
GQA = [(2, 2), (3, 1), (4, 1)]  # (num_heads, num_kv_heads): ratios 1, 3 and 4

# (max blocks per sequence, block_size, head_dim, num_heads, num_kv_heads, dtype)
DECODE = [
    (blocks, 16, d, h, hkv, dtype)
    for blocks in (1, 7, 257) for d in (64, 128) for h, hkv in GQA for dtype in DTYPES
] + [(7, 5, 64, 3, 1, BF16)]  # a block size that is not a power of two


@pytest.mark.parametrize("blocks,bs,d,h,hkv,dtype", DECODE, ids=_id)
def test_paged_decode_attention(blocks, bs, d, h, hkv, dtype, device, force_triton, assert_close):
    gen = torch.Generator().manual_seed(blocks * 1000 + d + h)
    full = blocks * bs
    # 1 key; a full table but one row short of a block multiple; a middle length
    lens = [1, full - 3 if full > 3 else full, max(1, full // 2 + 1)]
    kc, vc = _cache(blocks + 3, bs, hkv, d, dtype, device, gen)
    q = torch.randn(len(lens), h, d, generator=gen).to(device, dtype)
    bt = _tables(lens, bs, blocks + 3, blocks, gen, device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = d**-0.5
    out = A.paged_decode_attention(q, kc, vc, bt, ctx, scale)
    ref32 = A.paged_decode_attention_ref(q.float(), kc.float(), vc.float(), bt, ctx, scale)
    assert_close(out, A.paged_decode_attention_ref(q, kc, vc, bt, ctx, scale), ref32)


@pytest.mark.parametrize("num_splits", [1, 3, 40])
def test_paged_decode_split_k(num_splits, device, assert_close):
    """Split-K with one split, uneven splits, and more splits than key tiles (empty ones)."""
    gen = torch.Generator().manual_seed(num_splits)
    bs, d, h, hkv, blocks = 16, 64, 4, 1, 20
    lens = [1, 17, 20 * 16 - 1]
    kc, vc = _cache(blocks, bs, hkv, d, FP16, device, gen)
    q = torch.randn(len(lens), h, d, generator=gen).to(device, FP16)
    bt = _tables(lens, bs, blocks, blocks, gen, device)
    ctx = torch.tensor(lens, dtype=torch.int64, device=device)
    out = A._paged_decode_attention_triton(q, kc, vc, bt, ctx, 0.125, num_splits=num_splits)
    ref32 = A.paged_decode_attention_ref(q.float(), kc.float(), vc.float(), bt, ctx, 0.125)
    assert_close(out, A.paged_decode_attention_ref(q, kc, vc, bt, ctx, 0.125), ref32)


# (new-token lengths, prefix lengths or None, head_dim, num_heads, num_kv_heads, dtype)
LENS = [1, 300, 7, 33]
PREFIXES = [3, 16, 0, 45]  # one block exactly, none, not a block multiple
PREFILL = [
    (LENS, prefixes, 128 if h == 3 else 64, h, hkv, dtype)
    for prefixes in (None, PREFIXES) for h, hkv in GQA for dtype in DTYPES
] + [([5, 2], [257 * 16 - 7, 7 * 16], 64, 3, 1, FP32)]  # prefixes of 257 and 7 blocks


@pytest.mark.parametrize("lens,prefixes,d,h,hkv,dtype", PREFILL, ids=_id)
def test_varlen_prefill_attention(lens, prefixes, d, h, hkv, dtype, device, force_triton,
                                  assert_close):
    gen = torch.Generator().manual_seed(sum(lens) + d + h)
    bs = 16
    t = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                      device=device)
    q = torch.randn(t, h, d, generator=gen).to(device, dtype)
    k = torch.randn(t, hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(t, hkv, d, generator=gen).to(device, dtype)
    pre = torch.tensor(prefixes or [0] * len(lens), dtype=torch.int32, device=device)
    cache = [None, None, None]
    if prefixes is not None:
        width = -(-max(prefixes) // bs)
        kc, vc = _cache(width + 2, bs, hkv, d, dtype, device, gen)
        cache = [kc, vc, _tables(prefixes, bs, width + 2, width, gen, device)]
    out = A.varlen_prefill_attention(q, k, v, cu, pre, *cache, scale=d**-0.5)
    c32 = [c.float() if c is not None and c.is_floating_point() else c for c in cache]
    ref32 = A.varlen_prefill_attention_ref(q.float(), k.float(), v.float(), cu, pre, *c32, d**-0.5)
    ref = A.varlen_prefill_attention_ref(q, k, v, cu, pre, *cache, d**-0.5)
    assert_close(out, ref, ref32)


def test_prefill_never_attends_across_sequences(device, force_triton):
    """Changing one packed sequence leaves the others' outputs bit-identical."""
    gen = torch.Generator().manual_seed(0)
    h, d = 2, 64  # sequences of 9, 40 and 3 tokens
    cu = torch.tensor([0, 9, 49, 52], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(52, h, d, generator=gen).to(device) for _ in range(3))
    pre = torch.zeros(3, dtype=torch.int32, device=device)
    out = A.varlen_prefill_attention(q, k, v, cu, pre, scale=0.125)
    k2, v2 = k.clone(), v.clone()
    k2[9:49] += 1.0
    v2[9:49] -= 1.0
    out2 = A.varlen_prefill_attention(q, k2, v2, cu, pre, scale=0.125)
    assert torch.equal(out[:9], out2[:9]) and torch.equal(out[49:], out2[49:])
    assert not torch.equal(out[9:49], out2[9:49])


def _decode_args(device, dtype=FP32):
    kc = torch.zeros(4, 16, 2, 64, dtype=dtype, device=device)
    return {
        "q": torch.zeros(2, 4, 64, dtype=dtype, device=device), "k_cache": kc,
        "v_cache": kc.clone(), "block_tables": torch.zeros(2, 3, dtype=torch.int32, device=device),
        "context_lens": torch.ones(2, dtype=torch.int32, device=device), "scale": 0.1,
    }


@pytest.mark.parametrize("bad,match", [
    ({"q": torch.zeros(2, 4)}, "q must be"),
    ({"q": torch.zeros(2, 4, 32)}, "head_dim"),
    ({"q": torch.zeros(2, 3, 64)}, "multiple of kv_heads"),
    ({"q": torch.zeros(2, 4, 64, dtype=torch.float16)}, "must match"),
    ({"q": torch.zeros(2, 4, 64, dtype=torch.int32)}, "not supported"),
    ({"block_tables": torch.zeros(3, 3, dtype=torch.int32)}, "block_tables"),
    ({"block_tables": torch.zeros(2, 3)}, "block_tables"),
    ({"context_lens": torch.ones(3, dtype=torch.int32)}, "context length"),
    ({"q": torch.zeros(2, 64, 4).transpose(1, 2)}, "contiguous"),
    ({"k_cache": torch.zeros(4, 2, 16, 64).transpose(1, 2)}, "contiguous"),
])
def test_paged_decode_attention_rejects(bad, match, force_triton, default_device):
    args = _decode_args(default_device)
    args.update({name: t.to(default_device) for name, t in bad.items()})  # keeps strides
    if "k_cache" in bad:
        args["v_cache"] = args["k_cache"]
    with pytest.raises(ValueError, match=match):
        A.paged_decode_attention(**args)


def test_varlen_prefill_attention_rejects(force_triton, default_device):
    q, k = torch.zeros(5, 4, 64), torch.zeros(5, 2, 64)
    cu, pre = torch.tensor([0, 5], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="token counts"):
        A.varlen_prefill_attention(q, k[:4], k[:4], cu, pre)
    with pytest.raises(ValueError, match="dtypes differ"):
        A.varlen_prefill_attention(q, k.half(), k.half(), cu, pre)
    with pytest.raises(ValueError, match="len\\(prefix_lens\\)"):
        A.varlen_prefill_attention(q, k, k, cu, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="cached prefixes need"):
        A.varlen_prefill_attention(q, k, k, cu, pre + 3)
    with pytest.raises(ValueError, match="all of k_cache"):
        A.varlen_prefill_attention(q, k, k, cu, pre + 3, torch.zeros(2, 16, 2, 64))
    with pytest.raises(ValueError, match="contiguous"):
        qt = torch.zeros(5, 64, 4).transpose(1, 2)
        A.varlen_prefill_attention(qt, k, k, cu, pre)
