"""Fused residual add + RMSNorm against its reference."""

from __future__ import annotations

import pytest
import torch
from pdserve.kernels import rmsnorm


@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 100), (33, 1024)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_rmsnorm(tokens, hidden, with_residual, dtype, device, force_triton, assert_close):
    gen = torch.Generator().manual_seed(tokens + hidden)
    x = (3 * torch.randn(tokens, hidden, generator=gen)).to(device, dtype)
    res = torch.randn(tokens, hidden, generator=gen).to(device, dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
    out, new_res = rmsnorm.add_rmsnorm(x, res, w, 1e-5)
    ref, ref_res = rmsnorm.add_rmsnorm_ref(x, res, w, 1e-5)
    f = (lambda t: t.float() if t is not None else None)
    ref32, ref32_res = rmsnorm.add_rmsnorm_ref(f(x), f(res), f(w), 1e-5)
    assert_close(out, ref, ref32)
    assert_close(new_res, ref_res, ref32_res)
    if not with_residual:
        assert new_res is x
    elif dtype != torch.bfloat16:  # bf16: the interpreter truncates where torch rounds
        assert torch.equal(new_res, ref_res)


def test_add_rmsnorm_rejects(force_triton, default_device):
    x, w = torch.zeros(3, 8), torch.ones(8)
    with pytest.raises(ValueError, match="tokens, hidden"):
        rmsnorm.add_rmsnorm(x[0], None, w, 1e-5)
    with pytest.raises(ValueError, match="weight must be"):
        rmsnorm.add_rmsnorm(x, None, w[:4], 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rmsnorm.add_rmsnorm(x, x[:2], w, 1e-5)
    with pytest.raises(ValueError, match="residual dtype"):
        rmsnorm.add_rmsnorm(x, x.half(), w, 1e-5)
    with pytest.raises(ValueError, match="not supported"):
        rmsnorm.add_rmsnorm(x.long(), None, w, 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        rmsnorm.add_rmsnorm(torch.zeros(8, 3).t(), None, w, 1e-5)
