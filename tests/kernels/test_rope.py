"""RoPE (rotate-half, in place on q and k) against its reference, with scaled tables."""

from __future__ import annotations

import pytest
import torch
from pdserve.kernels import rope

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("d,scaling", [(64, None), (128, {"type": "linear", "factor": 2.0}),
                                       (128, LLAMA3)])
@pytest.mark.parametrize("h,hkv", [(2, 2), (3, 1), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_rope(d, scaling, h, hkv, dtype, device, force_triton, assert_close):
    gen = torch.Generator().manual_seed(d + h)
    tokens, max_pos = 37, 300
    cos_sin = rope.build_cos_sin(rope.rope_frequencies(d, 10000.0, scaling), max_pos).to(device)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(device)
    q = torch.randn(tokens, h, d, generator=gen).to(device, dtype)
    k = torch.randn(tokens, hkv, d, generator=gen).to(device, dtype)
    q_ref, k_ref = q.clone(), k.clone()
    q32, k32 = q.float(), k.float()
    rope.apply_rope(q, k, positions, cos_sin)
    rope.apply_rope_ref(q_ref, k_ref, positions, cos_sin)
    rope.apply_rope_ref(q32, k32, positions, cos_sin)
    assert_close(q, q_ref, q32)
    assert_close(k, k_ref, k32)


def test_apply_rope_rejects(force_triton, default_device):
    q, k, pos = torch.zeros(3, 2, 8), torch.zeros(3, 1, 8), torch.arange(3)
    cs = rope.build_cos_sin(rope.rope_frequencies(8, 10000.0, None), 16)
    with pytest.raises(ValueError, match="token counts"):
        rope.apply_rope(q, k[:2], pos, cs)
    with pytest.raises(ValueError, match="table width"):
        rope.apply_rope(q, k, pos, cs[:, :4])
    with pytest.raises(ValueError, match="differ"):
        rope.apply_rope(q, k.half(), pos, cs)
    with pytest.raises(ValueError, match="positions"):
        rope.apply_rope(q, k, pos.float(), cs)
    with pytest.raises(ValueError, match="contiguous"):
        rope.apply_rope(torch.zeros(3, 8, 2).transpose(1, 2), k, pos, cs)
