"""Symmetric int8 quantization of K/V for compressed transfer (KIVI: K per channel, V per token).

``x`` is read as ``[..., tokens, heads, head_dim]`` (e.g. one layer's K from
``gather_blocks(kv, ids, layer)[0]``, shape ``[n, block_size, kv_heads, head_dim]``). Scales
keep the reduced dims as size 1, so ``q * scale`` broadcasts:

    per="channel" (K): one scale per (head, channel), over every token of the block set
                       (all dims but the last two reduced):  scale [1, ..., 1, heads, head_dim]
    per="token"   (V): one scale per (token, head), over head_dim
                       (the last dim reduced):                scale [..., tokens, heads, 1]

    scale = absmax / 127 (fp32; 0 where the group is all zeros)
    q     = clamp(round_half_even(x / scale), -127, 127)   (int8; 0 where scale == 0)
    deq   = q * scale

Error bound: ``|x - deq(q(x))| <= scale / 2`` elementwise (the rounding step; the clamp never
bites since |x / scale| <= 127), up to fp32 rounding in ``x / scale`` and ``q * scale`` of a few
ulps of |x| (tested). Keys carry outlier channels, so per-channel scales keep the bound tight
for the other channels; values have no channel structure and are quantized per token (Liu et
al., KIVI, 2024). Inputs must be finite (a NaN/inf poisons its group's scale).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import FLOATS, check, check_dtype, device_guard, next_pow2, runnable, use_triton

PERS = ("channel", "token")
QMAX = 127.0


def scale_shape(shape: torch.Size, per: str) -> torch.Size:
    """Shape of the scale ``quantize_kv`` returns for an input of ``shape``."""
    if per == "channel":
        return torch.Size((1,) * (len(shape) - 2) + tuple(shape[-2:]))
    return torch.Size((*shape[:-1], 1))


def quantize_kv_ref(x: torch.Tensor, per: str) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    dims = tuple(range(x.dim() - 2)) if per == "channel" else (-1,)
    scale = xf.abs().amax(dim=dims, keepdim=True) / QMAX
    y = torch.where(scale > 0, xf / torch.where(scale > 0, scale, 1.0), 0.0)
    q = torch.round(y).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_kv_ref(
    q: torch.Tensor, scale: torch.Tensor, per: str, dtype: torch.dtype
) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


# ---- kernels: x viewed as [rows, cols]; "channel": cols = heads * head_dim, "token": cols =
# head_dim, so a channel scale is per column and a token scale per row.


@triton.jit
def _absmax_columns_kernel(
    x_ptr, part_ptr, rows, cols, rows_per_prog,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (column tile, row chunk): part[chunk, cols] = max |x| over the chunk's rows.
    pc = tl.program_id(0)
    pr = tl.program_id(1)
    offs_c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < cols
    r0 = pr * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, rows)
    amax = tl.zeros([BLOCK_C], tl.float32)
    for start in range(r0, r1, BLOCK_R):
        offs_r = (start + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask = (offs_r < r1)[:, None] & c_mask[None, :]
        x = tl.load(x_ptr + offs_r[:, None] * cols + offs_c[None, :], mask=mask, other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), 0))
    tl.store(part_ptr + pr * cols + offs_c, amax, mask=c_mask)


@triton.jit
def _quantize_kv_kernel(
    x_ptr, q_ptr, scale_ptr, rows, cols,
    PER_TOKEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # PER_TOKEN: BLOCK_C covers a whole row; the row's scale is computed and stored here.
    # Otherwise scale[cols] (the channel scales) is read.
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = offs_r < rows
    c_mask = offs_c < cols
    mask = r_mask[:, None] & c_mask[None, :]
    x = tl.load(x_ptr + offs_r[:, None] * cols + offs_c[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if PER_TOKEN:
        scale = tl.max(tl.abs(x), 1) / 127.0
        tl.store(scale_ptr + offs_r, scale, mask=r_mask)
        div = scale[:, None]
    else:
        div = tl.load(scale_ptr + offs_c, mask=c_mask, other=0.0)[None, :]
    y = tl.where(div > 0, x / tl.where(div > 0, div, 1.0), 0.0)
    # round half to even, exactly (as torch.round): y - floor(y) is exact for |y| < 2^23
    q = tl.floor(y)
    frac = y - q
    odd = (q - 2.0 * tl.floor(q * 0.5)) != 0.0
    q = tl.where((frac > 0.5) | ((frac == 0.5) & odd), q + 1.0, q)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(q_ptr + offs_r[:, None] * cols + offs_c[None, :], q.to(tl.int8), mask=mask)


@triton.jit
def _dequantize_kv_kernel(
    q_ptr, scale_ptr, out_ptr, rows, cols,
    PER_TOKEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = offs_r < rows
    c_mask = offs_c < cols
    mask = r_mask[:, None] & c_mask[None, :]
    q = tl.load(q_ptr + offs_r[:, None] * cols + offs_c[None, :], mask=mask, other=0)
    if PER_TOKEN:
        s = tl.load(scale_ptr + offs_r, mask=r_mask, other=0.0)[:, None]
    else:
        s = tl.load(scale_ptr + offs_c, mask=c_mask, other=0.0)[None, :]
    out = q.to(tl.float32) * s
    tl.store(out_ptr + offs_r[:, None] * cols + offs_c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


def _view(x: torch.Tensor, per: str) -> tuple[int, int]:
    cols = x.shape[-2:].numel() if per == "channel" else x.shape[-1]
    return x.numel() // max(cols, 1), cols


def _tiles(rows: int, cols: int, per: str) -> tuple[int, int]:
    block_c = next_pow2(cols) if per == "token" else min(next_pow2(cols), 256)
    block_r = max(1, min(next_pow2(rows), 4096 // block_c))
    return block_r, block_c


def _quantize_kv_triton(x: torch.Tensor, per: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = _view(x, per)
    q = torch.empty_like(x, dtype=torch.int8)
    shape = scale_shape(x.shape, per)
    scale = torch.zeros(shape, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return q, scale
    block_r, block_c = _tiles(rows, cols, per)
    with device_guard(x):
        if per == "channel":
            # Pass 1: column absmax over row chunks in parallel, combined by a torch amax.
            chunks = max(1, min(triton.cdiv(rows, 256), 64))
            rows_per = triton.cdiv(rows, chunks)
            part = torch.empty(chunks, cols, dtype=torch.float32, device=x.device)
            runnable(_absmax_columns_kernel)[(triton.cdiv(cols, block_c), chunks)](
                x, part, rows, cols, rows_per, BLOCK_R=min(block_r, 32), BLOCK_C=block_c,
            )
            torch.div(part.amax(0).view(shape), QMAX, out=scale)
        runnable(_quantize_kv_kernel)[(triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))](
            x, q, scale, rows, cols, PER_TOKEN=per == "token", BLOCK_R=block_r, BLOCK_C=block_c,
        )
    return q, scale


def _dequantize_kv_triton(
    q: torch.Tensor, scale: torch.Tensor, per: str, dtype: torch.dtype
) -> torch.Tensor:
    rows, cols = _view(q, per)
    out = torch.empty_like(q, dtype=dtype)
    if q.numel() == 0:
        return out
    block_r, block_c = _tiles(rows, cols, per)
    with device_guard(q):
        runnable(_dequantize_kv_kernel)[(triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))](
            q, scale, out, rows, cols, PER_TOKEN=per == "token", BLOCK_R=block_r, BLOCK_C=block_c,
        )
    return out


def _check_per(name: str, x: torch.Tensor, per: str) -> None:
    check(per in PERS, f"{name}: per={per!r}; expected 'channel' (K) or 'token' (V)")
    check(x.dim() >= 3, f"{name}: expected [..., tokens, heads, head_dim], got {tuple(x.shape)}")


def quantize_kv(x: torch.Tensor, per: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., tokens, heads, head_dim]`` → ``(q int8 like x, scale fp32)``; see module doc."""
    _check_per("quantize_kv", x, per)
    check_dtype("quantize_kv", x, FLOATS)
    if not use_triton(x):
        return quantize_kv_ref(x, per)
    check(x.is_contiguous(), "quantize_kv: x must be contiguous")
    return _quantize_kv_triton(x, per)


def dequantize_kv(
    q: torch.Tensor, scale: torch.Tensor, per: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of ``quantize_kv``: ``q * scale`` (broadcast) in fp32, cast to ``dtype``;
    ``per`` is the one ``q`` was made with (it fixes the scale's shape)."""
    _check_per("dequantize_kv", q, per)
    check(q.dtype == torch.int8, f"dequantize_kv: q must be int8, got {q.dtype}")
    check(scale.dtype == torch.float32, f"dequantize_kv: scale must be fp32, got {scale.dtype}")
    want = scale_shape(q.shape, per)
    check(scale.shape == want, f"dequantize_kv: per={per!r} scale must be {tuple(want)}, got "
          f"{tuple(scale.shape)}")
    check(dtype in FLOATS, f"dequantize_kv: dtype {dtype} not supported")
    check(scale.device == q.device, "dequantize_kv: q and scale are on different devices")
    if not use_triton(q):
        return dequantize_kv_ref(q, scale, per, dtype)
    check(q.is_contiguous() and scale.is_contiguous(),
          "dequantize_kv: q and scale must be contiguous")
    return _dequantize_kv_triton(q, scale, per, dtype)
