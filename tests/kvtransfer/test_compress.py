"""Unit tests of int8 KV quantization and of the layer-message format (no channel)."""

from __future__ import annotations

import pytest
import torch
from pdserve.kvtransfer import KVLayout, TransferError, TransferPlan, dequantize_kv, quantize_kv
from pdserve.kvtransfer.wire import LayerWire

SHAPES = [(1, 1, 1, 1), (7, 3, 5, 16), (33, 16, 2, 64), (2, 3, 1, 7)]  # [blocks, bs, heads, d]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per", ["channel", "token"])
def test_int8_error_is_at_most_half_a_step(shape, per):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g) * 10
    q, scale = quantize_kv(x, per)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.dtype == torch.float32
    want = (1, 1, *shape[-2:]) if per == "channel" else (*shape[:-1], 1)
    assert scale.shape == want
    err = (dequantize_kv(q, scale, torch.float32) - x).abs()
    # Documented bound: |x' - x| <= scale / 2, computed in fp32 (tiny slack for fp32 rounding).
    assert (err <= scale / 2 * (1 + 1e-6) + 1e-12).all()
    assert q.abs().max() <= 127


def test_int8_bf16_adds_only_output_rounding():
    x = torch.randn(5, 4, 2, 32).to(torch.bfloat16)
    q, scale = quantize_kv(x, "token")
    y = dequantize_kv(q, scale, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    err = (y.float() - x.float()).abs()
    assert (err <= scale / 2 * (1 + 1e-6) + y.float().abs() * 2**-8).all()


def test_int8_zeros_and_non_finite():
    x = torch.zeros(2, 3, 1, 4)
    x[0, 0, 0, 0] = float("nan")
    x[1, 2, 0, 3] = float("inf")
    x[1, 1, 0, 1] = 2.0
    q, scale = quantize_kv(x, "channel")
    y = dequantize_kv(q, scale, torch.float32)
    assert torch.isfinite(y).all() and y[0, 0, 0, 0] == 0 and y[1, 2, 0, 3] == 0
    assert y[1, 1, 0, 1] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        quantize_kv(x, "row")


def _plan(dtype: str, compress: str | None, n: int) -> TransferPlan:
    lay = KVLayout(3, 4, 4, 8, 1, dtype)
    return TransferPlan(
        "r", list(range(n, 0, -1)), list(range(0, 2 * n, 2)), 0, 3, lay, lay, compress=compress
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("compress", [None, "int8"])
@pytest.mark.parametrize("n", [1, 7])
def test_layer_message_round_trip(dtype, compress, n):
    plan = _plan(dtype, compress, n)
    torch_dtype = plan.src_layout.dtype
    src = torch.randn(3, 2, n + 1, 4, 4, 8).to(torch_dtype)
    dst = torch.full((3, 2, 2 * n, 4, 4, 8), -7.0, dtype=torch_dtype)
    heads_src, heads_dst = slice(1, 3), slice(2, 4)  # heads 1..2 of src land in 2..3 of dst
    wire = LayerWire.for_plan(plan, num_heads=2)
    src_ids = torch.tensor(plan.src_block_ids)
    dst_ids = torch.tensor(plan.dst_block_ids)
    buf = wire.empty(torch.device("cpu"))
    wire.pack(src[1], src_ids, heads_src, buf, plan.fingerprint, 1)
    assert LayerWire.check_header(buf, plan.fingerprint, 1)
    wire.unpack(buf, dst[1], dst_ids, heads_dst)
    got = dst[1][:, dst_ids][..., heads_dst, :]
    sent = src[1][:, src_ids][..., heads_src, :]
    if compress is None:
        assert torch.equal(got, sent)
    else:
        for part, per in ((0, "channel"), (1, "token")):
            _, scale = quantize_kv(sent[part], per)
            bound = scale / 2 * (1 + 1e-6) + got[part].float().abs() * 2**-8 + 1e-12
            assert ((got[part].float() - sent[part].float()).abs() <= bound).all()
        assert wire.nbytes < 16 + 2 * sent[0].numel() * torch_dtype.itemsize
    untouched = torch.ones(2 * n, dtype=torch.bool)
    untouched[dst_ids] = False
    assert (dst[1][:, untouched] == -7).all() and (dst[1][..., :2, :] == -7).all()
    assert (dst[0] == -7).all() and (dst[2] == -7).all()


def test_header_mismatch_and_cancel():
    plan = _plan("float32", None, 2)
    wire = LayerWire.for_plan(plan, num_heads=4)
    buf = wire.empty(torch.device("cpu"))
    wire.pack(
        torch.zeros(2, 3, 4, 4, 8), torch.tensor([0, 1]), slice(0, 4), buf, plan.fingerprint, 2
    )
    with pytest.raises(TransferError, match="mixed up"):
        LayerWire.check_header(buf, plan.fingerprint, 1)
    with pytest.raises(TransferError, match="mixed up"):
        LayerWire.check_header(buf, plan.fingerprint + 1, 2)
    LayerWire.write_cancel(buf, plan.fingerprint)
    assert LayerWire.check_header(buf, plan.fingerprint, 1) is False
