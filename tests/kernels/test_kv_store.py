"""KV store at slot indices against ``index_copy_``."""

from __future__ import annotations

import pytest
import torch
from pdserve.kernels import kv_store


@pytest.mark.parametrize("num_blocks,bs,tokens", [(1, 16, 1), (7, 16, 45), (257, 4, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_kv(num_blocks, bs, tokens, dtype, device, force_triton):
    gen = torch.Generator().manual_seed(tokens)
    hkv, d = 3, 64
    k = torch.randn(tokens, hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(tokens, hkv, d, generator=gen).to(device, dtype)
    slots = torch.randperm(num_blocks * bs, generator=gen)[:tokens].to(device)
    kc = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(device, dtype)
    vc = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(device, dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kv_store.store_kv(k, v, kc, vc, slots.to(torch.int32))
    kv_store.store_kv_ref(k, v, kc_ref, vc_ref, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)  # a copy is exact


def test_store_kv_rejects(force_triton, default_device):
    k, kc = torch.zeros(3, 2, 8), torch.zeros(4, 4, 2, 8)
    slots = torch.arange(3)
    with pytest.raises(ValueError, match="tokens, kv_heads, dim"):
        kv_store.store_kv(k, k[:2], kc, kc.clone(), slots)
    with pytest.raises(ValueError, match="differ from the cache"):
        kv_store.store_kv(k[:, :1], k[:, :1], kc, kc.clone(), slots)
    with pytest.raises(ValueError, match="one slot per token"):
        kv_store.store_kv(k, k, kc, kc.clone(), slots[:2])
    with pytest.raises(ValueError, match="dtype"):
        kv_store.store_kv(k.half(), k.half(), kc, kc.clone(), slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_store.store_kv(k, k, kc, kc.clone(), slots.float())
    with pytest.raises(ValueError, match="caches must be contiguous"):
        kv_store.store_kv(k, k, kc.transpose(0, 1), kc.clone(), slots)
    with pytest.raises(ValueError, match="must be contiguous"):
        kt = torch.zeros(3, 8, 2).transpose(1, 2)
        kv_store.store_kv(kt, kt, kc, kc.clone(), slots)
