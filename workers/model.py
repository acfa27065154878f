"""The Llama-family decoder (Llama, Mistral, Qwen2): RMSNorm, RoPE, GQA, SwiGLU.

No ``transformers`` modules run here: ``transformers`` supplies config, tokenizer and weights
and is the reference in tests. The model works on one flat batch of tokens from many
requests (no padding): decode tokens first, then packed prefill chunks (see ``AttnMetadata``).
Every attention/cache op goes through ``pdserve.kernels`` wrappers, which pick Triton on CUDA
and the torch reference on CPU. Tensor parallelism: a model built for a ``Shard`` holds only its
heads and MLP columns; ``all_reduce`` sums the row-parallel outputs across ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve import kernels

from .config import ModelConfig
from .loader import Shard, load_weights


@dataclass
class AttnMetadata:
    """Index tensors for one step. Tokens ``[0, num_decodes)`` are single-token decodes,
    the rest are prefill chunks of ``len(prefix_lens)`` sequences packed back to back."""

    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, flat cache slot each token's K/V is written to
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32
    decode_context_lens: torch.Tensor  # [num_decodes] int32, including the new token
    cu_seqlens: torch.Tensor  # [num_prefills + 1] int32, offsets into the prefill tokens
    prefix_lens: torch.Tensor  # [num_prefills] int32, tokens already cached before the chunk
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int32
    has_prefix: bool  # any prefix_lens > 0 (else attention never reads the cache)


class LlamaModel:
    def __init__(
        self,
        cfg: ModelConfig,
        shard: Shard = Shard(),
        all_reduce: Callable[[torch.Tensor], None] | None = None,
        weights: dict | None = None,
    ) -> None:
        self.cfg = cfg
        self.shard = shard
        self.all_reduce = all_reduce
        (h0, h1), (k0, k1) = shard.attention_heads(cfg.num_heads, cfg.num_kv_heads)
        self.num_heads = h1 - h0
        self.num_kv_heads = k1 - k0
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.w = weights if weights is not None else load_weights(cfg, shard)
        inv = kernels.rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.cos_sin = kernels.build_cos_sin(inv, cfg.max_position_embeddings)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.all_reduce is not None:
            self.all_reduce(x)
        return x

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttnMetadata,
        kv: torch.Tensor,
        sample_idx: torch.Tensor,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Returns fp32 logits ``[len(sample_idx), vocab]``. ``kv`` is this rank's cache,
        ``[layers, 2, blocks, block_size, kv_heads, head_dim]``; the new tokens' K/V are
        written into it. ``on_layer(i)`` runs once layer i's K/V are in the cache (the hook
        the KV-transfer layer uses to push layer i while layer i+1 computes)."""
        cfg, w = self.cfg, self.w
        nd, d = meta.num_decodes, self.head_dim
        nq, nk = self.num_heads * d, self.num_kv_heads * d
        x = F.embedding(input_ids, w["embed"])
        residual = None
        for i, lw in enumerate(w["layers"]):
            h, residual = kernels.add_rmsnorm(x, residual, lw["ln1"], cfg.rms_norm_eps)
            qkv = F.linear(h, lw["wqkv"], lw["bqkv"])
            q = qkv[:, :nq].reshape(-1, self.num_heads, d)
            k = qkv[:, nq : nq + nk].reshape(-1, self.num_kv_heads, d)
            v = qkv[:, nq + nk :].reshape(-1, self.num_kv_heads, d)
            q, k = q.contiguous(), k.contiguous()
            kernels.apply_rope(q, k, meta.positions, self.cos_sin)
            v = v.contiguous()
            kc, vc = kv[i, 0], kv[i, 1]
            kernels.store_kv(k, v, kc, vc, meta.slot_mapping)
            o = torch.empty_like(q)
            if nd:
                o[:nd] = kernels.paged_decode_attention(
                    q[:nd], kc, vc, meta.decode_block_tables, meta.decode_context_lens, self.scale
                )
            if nd < q.shape[0]:
                o[nd:] = kernels.varlen_prefill_attention(
                    q[nd:], k[nd:], v[nd:], meta.cu_seqlens, meta.prefix_lens,
                    kc if meta.has_prefix else None, vc if meta.has_prefix else None,
                    meta.prefill_block_tables if meta.has_prefix else None, self.scale,
                )
            if on_layer is not None:
                on_layer(i)
            x = self._reduce(F.linear(o.view(-1, nq), lw["wo"]))
            h, residual = kernels.add_rmsnorm(x, residual, lw["ln2"], cfg.rms_norm_eps)
            gu = F.linear(h, lw["w_gate_up"])
            g, u = gu.chunk(2, dim=-1)
            x = self._reduce(F.linear(F.silu(g) * u, lw["w_down"]))
        x = x.index_select(0, sample_idx)
        residual = residual.index_select(0, sample_idx)
        h, _ = kernels.add_rmsnorm(x, residual, w["norm"], cfg.rms_norm_eps)
        return F.linear(h, w["lm_head"]).float()
