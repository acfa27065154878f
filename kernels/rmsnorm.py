"""Fused residual add + RMSNorm.

``out, new_residual = add_rmsnorm(x, residual, weight, eps)``:
    new_residual = x + residual   (or x when residual is None)
    out = new_residual * rsqrt(mean(new_residual^2) + eps) * weight
Statistics are computed in fp32 whatever the input dtype (as Hugging Face Llama does).
"""

from __future__ import annotations

import torch

from .dispatch import check


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


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    check(x.dim() == 2, f"add_rmsnorm: x must be [tokens, hidden], got {tuple(x.shape)}")
    check(weight.shape == (x.shape[1],), "add_rmsnorm: weight must be [hidden]")
    check(residual is None or residual.shape == x.shape, "add_rmsnorm: residual shape != x")
    return add_rmsnorm_ref(x, residual, weight, eps)
