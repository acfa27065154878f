"""int8 KV quantization (K per channel, V per token): kernel == reference, and the
round-trip bound |x - deq(q(x))| <= scale / 2."""

from __future__ import annotations

import pytest
import torch
from pdserve.kernels import kv_quant


def _kv(shape, dtype, device, gen):
    # outlier channels, as real keys have, and an all-zero token and channel (scale 0)
    x = torch.randn(shape, generator=gen) * torch.linspace(0.05, 8.0, shape[-1])
    x[..., 0, :, :] = 0.0
    x[..., 3] = 0.0
    return x.to(device, dtype)


def _bound(x: torch.Tensor, deq: torch.Tensor, scale: torch.Tensor) -> None:
    err = (x.float() - deq).abs()
    # scale / 2, plus fp32 rounding in x / scale and q * scale (a few ulps of |x|)
    assert bool((err <= scale / 2 + 4 * torch.finfo(torch.float32).eps * x.float().abs()).all())


@pytest.mark.parametrize("shape", [(1, 16, 2, 64), (7, 16, 3, 128), (257, 4, 1, 64), (5, 2, 64)])
@pytest.mark.parametrize("per", ["channel", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_kv(shape, per, dtype, device, force_triton):
    gen = torch.Generator().manual_seed(sum(shape))
    x = _kv(shape, dtype, device, gen)
    q, scale = kv_quant.quantize_kv(x, per)
    q_ref, scale_ref = kv_quant.quantize_kv_ref(x, per)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    want = (1,) * (x.dim() - 2) + x.shape[-2:] if per == "channel" else (*x.shape[:-1], 1)
    assert scale.shape == want
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    # a GPU's fast division may flip a near-tie; the interpreter matches exactly
    assert int((q.int() - q_ref.int()).abs().max()) <= (0 if x.device.type == "cpu" else 1)
    deq = kv_quant.dequantize_kv(q, scale, per, torch.float32)
    assert torch.equal(deq, kv_quant.dequantize_kv_ref(q, scale, per, torch.float32))
    _bound(x, deq, scale)
    _bound(x, kv_quant.dequantize_kv_ref(q_ref, scale_ref, per, torch.float32), scale_ref)
    low = kv_quant.dequantize_kv(q, scale, per, dtype)
    assert low.dtype == dtype
    if dtype == torch.bfloat16:  # the interpreter truncates to bf16 (1 ulp) where torch rounds
        assert bool(((low.float() - deq).abs() <= deq.abs() * 2**-7).all())
    else:
        assert torch.equal(low, deq.to(dtype))


@pytest.mark.parametrize("per", ["channel", "token"])
def test_quantize_kv_rounds_half_to_even(per, device, force_triton):
    # absmax 127 -> scale 1, so x / scale are exact ties
    x = torch.tensor([127.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, 126.5], device=device)
    x = x.view(1, 1, 8).expand(2, 1, 8).contiguous() if per == "token" else x.view(8, 1, 1)
    q, scale = kv_quant.quantize_kv(x, per)
    assert bool((scale == 1.0).all())
    want = torch.tensor([127, 2, 4, -2, 0, 0, 2, 126], dtype=torch.int8, device=device)
    assert torch.equal(q.flatten()[:8], want)


def test_quantize_kv_rejects(force_triton, default_device):
    x = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="per="):
        kv_quant.quantize_kv(x, "head")
    with pytest.raises(ValueError, match="tokens, heads, head_dim"):
        kv_quant.quantize_kv(x[0], "token")
    with pytest.raises(ValueError, match="not supported"):
        kv_quant.quantize_kv(x.long(), "token")
    with pytest.raises(ValueError, match="contiguous"):
        kv_quant.quantize_kv(x.transpose(0, 1), "channel")
    q, s = kv_quant.quantize_kv(x, "token")
    with pytest.raises(ValueError, match="int8"):
        kv_quant.dequantize_kv(q.float(), s, "token")
    with pytest.raises(ValueError, match="scale must be"):
        kv_quant.dequantize_kv(q, s, "channel")
