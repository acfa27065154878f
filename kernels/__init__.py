"""Kernels for the serving hot path: each op has a pure-torch reference (``*_ref``) and a
checked wrapper that dispatches (see ``dispatch``). This package imports nothing of pdserve."""

from .attention import paged_decode_attention, varlen_prefill_attention
from .blocks import gather_blocks, scatter_blocks
from .kv_store import store_kv
from .rmsnorm import add_rmsnorm
from .rope import apply_rope, build_cos_sin, rope_frequencies

__all__ = [
    "add_rmsnorm",
    "apply_rope",
    "build_cos_sin",
    "gather_blocks",
    "paged_decode_attention",
    "rope_frequencies",
    "scatter_blocks",
    "store_kv",
    "varlen_prefill_attention",
]
