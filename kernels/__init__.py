"""Kernels for the serving hot path: each op has a pure-torch reference (``*_ref``) and a
checked wrapper that dispatches (see ``dispatch``). This package imports nothing of pdserve."""

from .attention import paged_decode_attention, varlen_prefill_attention
from .blocks import gather_blocks, scatter_blocks
from .kv_quant import dequantize_kv, quantize_kv
from .kv_store import store_kv
from .rmsnorm import add_rmsnorm
from .rope import apply_rope, build_cos_sin, rope_frequencies

__all__ = [
    "add_rmsnorm",
    "apply_rope",
    "build_cos_sin",
    "dequantize_kv",
    "gather_blocks",
    "paged_decode_attention",
    "quantize_kv",
    "rope_frequencies",
    "scatter_blocks",
    "store_kv",
    "varlen_prefill_attention",
]
