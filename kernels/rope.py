"""Rotary position embedding, Llama "rotate-half" convention, applied to q and k in place.

``cos_sin`` is a table ``[max_positions, head_dim]`` whose first half holds cos(pos * f_i)
and second half sin(pos * f_i) for the ``head_dim // 2`` frequencies f_i (already scaled by
whatever RoPE-scaling variant the model uses; see ``rope_frequencies``). For each head vector
x = [x1 | x2] (halves): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin.

The reference rotates in the input dtype (every product rounded); the kernel rotates in fp32
and rounds once, so in bf16/fp16 it is at least as close to the fp32 result.
"""

from __future__ import annotations

import math

import torch
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
    runnable,
    use_triton,
)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` (fp32) for the supported scaling variants.

    Supported: none/"default", "linear" (positions divided by ``factor``) and "llama3"
    (wavelength-dependent smoothing between ``low_freq_factor`` and ``high_freq_factor``).
    """
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(mid, smoothed, scaled)
    raise ValueError(
        f"rope scaling {kind!r} is not supported; supported: default, linear, llama3"
    )


def build_cos_sin(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    pos = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq.float())
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    half = q.shape[-1] // 2
    cs = cos_sin[positions]  # [T, D]
    cos = cs[:, None, :half].to(q.dtype)
    sin = cs[:, None, half:].to(q.dtype)
    q.copy_(_rotate(q, cos, sin))
    k.copy_(_rotate(k, cos, sin))


@triton.jit
def _apply_rope_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # Program t: token t's q heads then k heads, one [heads, head_dim / 2] tile per half.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_HALF)
    c_mask = offs_c < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_c, mask=c_mask, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_c, mask=c_mask, other=0.0)[None, :]
    offs_h = tl.arange(0, BLOCK_H)

    mask = (offs_h < num_q_heads)[:, None] & c_mask[None, :]
    ptr = q_ptr + t * stride_qt + offs_h[:, None] * stride_qh + offs_c[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty), mask=mask)

    mask = (offs_h < num_k_heads)[:, None] & c_mask[None, :]
    ptr = k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_c[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x1 * cos - x2 * sin).to(k_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(k_ptr.dtype.element_ty), mask=mask)


def _apply_rope_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    if q.shape[0] == 0:
        return
    half = q.shape[2] // 2
    with device_guard(q):
        runnable(_apply_rope_kernel)[(q.shape[0],)](
            q, k, positions, cos_sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
            q.shape[1], k.shape[1],
            HALF=half, BLOCK_H=next_pow2(max(q.shape[1], k.shape[1])),
            BLOCK_HALF=next_pow2(half),
        )


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """In place on ``q [T, H, D]`` and ``k [T, Hkv, D]`` at integer ``positions [T]``."""
    check(q.dim() == 3 and k.dim() == 3, "apply_rope: q and k must be [tokens, heads, dim]")
    check(positions.dim() == 1, "apply_rope: positions must be [tokens]")
    check(cos_sin.dim() == 2, "apply_rope: cos_sin must be [max_positions, head_dim]")
    check(q.shape[0] == k.shape[0] == positions.shape[0], "apply_rope: token counts differ")
    check(q.shape[2] == k.shape[2] == cos_sin.shape[1], "apply_rope: head_dim != table width")
    check(q.shape[2] % 2 == 0, f"apply_rope: head_dim {q.shape[2]} must be even")
    check_dtype("apply_rope", q, FLOATS)
    check(k.dtype == q.dtype, f"apply_rope: q {q.dtype} and k {k.dtype} differ")
    check_dtype("apply_rope positions", positions, INTS)
    check_dtype("apply_rope cos_sin", cos_sin, FLOATS)
    check_same_device("apply_rope", q, k, positions, cos_sin)
    if not use_triton(q):
        apply_rope_ref(q, k, positions, cos_sin)
        return
    check(q.stride(2) == 1 and k.stride(2) == 1 and cos_sin.stride(1) == 1
          and positions.is_contiguous(),
          "apply_rope: the last dims of q, k, cos_sin and positions must be contiguous")
    _apply_rope_triton(q, k, positions, cos_sin)
