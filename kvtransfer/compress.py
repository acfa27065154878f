"""int8 KV compression for transfers: the pure-torch reference.

K is quantized per channel (one scale per (head, head_dim) channel over all tokens: K has
outlier channels that are stable across tokens) and V per token (one scale per token and
head, over head_dim). Symmetric, no zero point:

    scale = amax / 127          q = clamp(round(x / scale), -127, 127)          x' = q * scale

Error bound, elementwise, computed in fp32: |x' - x| <= scale / 2 (round-to-nearest), when
amax >= 127 * float32.tiny; casting x' to a narrower dtype adds that dtype's rounding of x'.
Non-finite inputs (stale slots of a partly filled block may hold anything) are sent as 0 and
do not enter the scale.

The kernels package will provide a Triton version with the same signatures and semantics.
"""

from __future__ import annotations

from typing import Literal

import torch

QMAX = 127
_TINY = torch.finfo(torch.float32).tiny


def quantize_kv(
    k_or_v: torch.Tensor, per: Literal["channel", "token"]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `k_or_v` of shape [*tokens, heads, head_dim] to int8.

    Returns (q, scale): q is int8 with the input's shape; scale is float32, broadcastable to
    it, of shape [1, ..., 1, heads, head_dim] for per="channel" and [*tokens, heads, 1] for
    per="token". Both are contiguous and on the input's device.
    """
    if k_or_v.dim() < 3:
        raise ValueError(f"expected [*tokens, heads, head_dim], got shape {tuple(k_or_v.shape)}")
    x = k_or_v.float()
    x = torch.where(torch.isfinite(x), x, torch.zeros((), device=x.device))
    if per == "channel":
        amax = x.abs().amax(dim=tuple(range(x.dim() - 2)), keepdim=True)
    elif per == "token":
        amax = x.abs().amax(dim=-1, keepdim=True)
    else:
        raise ValueError(f"per must be 'channel' or 'token', got {per!r}")
    scale = (amax / QMAX).clamp_min(_TINY)
    q = torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale.contiguous()


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_kv`: q * scale in fp32, cast to `dtype`."""
    return (q.float() * scale).to(dtype)


def compressed_nbytes(shape: tuple[int, ...], per: Literal["channel", "token"]) -> tuple[int, int]:
    """(bytes of q, bytes of scale) for an input of `shape` [*tokens, heads, head_dim]."""
    n = 1
    for s in shape:
        n *= s
    heads, head_dim = shape[-2], shape[-1]
    n_scale = heads * head_dim if per == "channel" else n // head_dim
    return n, 4 * n_scale
