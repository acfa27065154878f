"""Rotary position embedding, Llama "rotate-half" convention, applied to q and k in place.

``cos_sin`` is a table ``[max_positions, head_dim]`` whose first half holds cos(pos * f_i)
and second half sin(pos * f_i) for the ``head_dim // 2`` frequencies f_i (already scaled by
whatever RoPE-scaling variant the model uses; see ``rope_frequencies``). For each head vector
x = [x1 | x2] (halves): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin.
"""

from __future__ import annotations

import math

import torch

from .dispatch import check


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


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """In place on ``q [T, H, D]`` and ``k [T, Hkv, D]`` at integer ``positions [T]``."""
    check(q.dim() == 3 and k.dim() == 3, "apply_rope: q and k must be [tokens, heads, dim]")
    check(q.shape[0] == k.shape[0] == positions.shape[0], "apply_rope: token counts differ")
    check(q.shape[2] == k.shape[2] == cos_sin.shape[1], "apply_rope: head_dim != table width")
    apply_rope_ref(q, k, positions, cos_sin)
