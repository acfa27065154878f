"""Fused residual add + RMSNorm.

``out, new_residual = add_rmsnorm(x, residual, weight, eps)``:
    new_residual = x + residual   (or x when residual is None)
    out = new_residual * rsqrt(mean(new_residual^2) + eps) * weight
Statistics are computed in fp32 whatever the input dtype (as Hugging Face Llama does). The
sum is rounded to the input dtype before the statistics, as the reference does. With no
residual the returned residual is ``x`` itself (no copy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import (
    FLOATS,
    check,
    check_dtype,
    check_same_device,
    device_guard,
    next_pow2,
    runnable,
    use_triton,
)

MAX_HIDDEN = 65536  # one row is one tile in the kernel


def add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    residual = x
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    out = (xf * torch.rsqrt(var + eps)).to(x.dtype) * weight
    return out, residual


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    stride_x, stride_res, stride_out, stride_new_res,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row * stride_new_res + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 0) / hidden
    normed = (xf * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)  # one rounding, like torch's x * w
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _add_rmsnorm_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))
    new_res = torch.empty_like(x) if residual is not None else x
    if x.shape[0] == 0:
        return out, new_res
    block = next_pow2(x.shape[1])
    res = residual if residual is not None else x
    with device_guard(x):
        runnable(_add_rmsnorm_kernel)[(x.shape[0],)](
            x, res, weight, out, new_res,
            x.stride(0), res.stride(0), out.stride(0), new_res.stride(0),
            x.shape[1], eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(max(block // 256, 1), 16),
        )
    return out, new_res


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    check(x.dim() == 2, f"add_rmsnorm: x must be [tokens, hidden], got {tuple(x.shape)}")
    check(weight.shape == (x.shape[1],),
          f"add_rmsnorm: weight must be [{x.shape[1]}], got {tuple(weight.shape)}")
    check(residual is None or residual.shape == x.shape,
          f"add_rmsnorm: residual {tuple(residual.shape) if residual is not None else ()} "
          f"!= x {tuple(x.shape)}")
    check_dtype("add_rmsnorm", x, FLOATS)
    check_dtype("add_rmsnorm weight", weight, FLOATS)
    check(residual is None or residual.dtype == x.dtype, "add_rmsnorm: residual dtype != x")
    check_same_device("add_rmsnorm", x, residual, weight)
    if not use_triton(x):
        return add_rmsnorm_ref(x, residual, weight, eps)
    check(x.shape[1] <= MAX_HIDDEN, f"add_rmsnorm: hidden {x.shape[1]} > {MAX_HIDDEN}")
    check(x.stride(1) == 1 and weight.is_contiguous()
          and (residual is None or residual.stride(1) == 1),
          "add_rmsnorm: rows of x, residual and weight must be contiguous")
    return _add_rmsnorm_triton(x, residual, weight, eps)
