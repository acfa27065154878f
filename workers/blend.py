"""CacheBlend: a prompt's KV from precomputed document-chunk KV plus a few recomputed tokens.

A chunk's KV computed on its own lacks the chunk's attention to whatever precedes it in the
prompt (cross-chunk attention), and its K was rotated for positions 0..n-1. Blending a
region ``[0, E)`` of a prompt (everything up to the end of its last chunk):

1. every chunk's stored KV is written into the request's cache slots, K re-rotated from
   positions ``0..n-1`` to ``s..s+n-1`` (RoPE rotations compose: R(s + j) = R(s) R(j));
2. layers ``0 .. select_layer - 1`` run in full over all E tokens (causal prefill);
3. at ``select_layer`` the K/V of all E tokens are computed and compared with the reused
   ones; the chunk tokens whose KV deviates most (top ``ratio`` of them) are *selected*;
4. from then on only the active tokens (non-chunk tokens, selected chunk tokens) run through
   the layers: their queries attend over all E positions (the cache), and their fresh K/V
   overwrite the reused ones. Every other chunk token keeps its reused KV.

::

    tokens      [ sys ][ chunk A ............ ][ sep ][ chunk B ............ ]
    layer 0     ██████ ██████████████████████ ██████ ██████████████████████   all computed
    layer ≥ 1   ██████ ░░██░░░░░█░░░░░░░██░░░ ██████ ░█░░░░██░░░░░░░░░█░░░░   █ computed
                                                                             ░ reused KV

At ``ratio = 1`` no token is ever inactive and every layer is the ordinary causal prefill
(the same kernels in the same order as ``LlamaModel.forward``), so the result is a full
prefill. The query after the last chunk is not part of the region: the scheduler computes
it as an ordinary prefill chunk on top of the blended cache, like a prefix-cache hit.

The layer arithmetic below mirrors ``LlamaModel.forward`` (which cannot run a different
token subset per layer); a change to one must be made to the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve import kernels

from .model import AttnMetadata, LlamaModel

__all__ = ["BlendStats", "blend_prefill", "compute_alone", "rerotate", "select_tokens"]


def rerotate(k: torch.Tensor, delta: int, cos_sin: torch.Tensor) -> torch.Tensor:
    """K rotated for positions ``p`` → K for positions ``p + delta`` (``k [..., D]``, any
    leading dims; computed in fp32, rounded once)."""
    if delta == 0:
        return k
    half = k.shape[-1] // 2
    cos, sin = cos_sin[delta, :half], cos_sin[delta, half:]
    x = k.float()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(k.dtype)


def select_tokens(deviation: torch.Tensor, reuse: torch.Tensor, ratio: float) -> torch.Tensor:
    """Sorted indices of the tokens that stay active: every token not reused, plus the
    ``ceil(ratio * reused)`` reused tokens with the largest ``deviation``."""
    n_reuse = int(reuse.sum())
    k = min(n_reuse, math.ceil(ratio * n_reuse - 1e-9))
    keep = ~reuse
    if k:
        dev = deviation.masked_fill(~reuse, float("-inf"))
        keep = keep.clone()
        keep[dev.topk(k).indices] = True
    return keep.nonzero().flatten()


def compute_alone(model: LlamaModel, chunks: list[list[int]], block_size: int) -> list[torch.Tensor]:
    """Each chunk's KV computed on its own at positions ``0..n-1`` (one packed varlen forward
    of the model itself into a scratch cache). Returns ``[layers, 2, n, kv_heads, head_dim]``
    tensors."""
    cfg = model.cfg
    lens = [len(c) for c in chunks]
    total = sum(lens)
    dev = model.w["embed"].device
    nblk = -(-total // block_size)
    scratch = torch.empty(cfg.num_layers, 2, nblk, block_size, model.num_kv_heads,
                          model.head_dim, dtype=cfg.torch_dtype, device=dev)
    i32 = {"dtype": torch.int32, "device": dev}
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], **i32)
    meta = AttnMetadata(
        positions=torch.cat([torch.arange(n, device=dev) for n in lens]),
        slot_mapping=torch.arange(total, device=dev),  # scratch slots in packed order
        num_decodes=0,
        decode_block_tables=torch.zeros(0, 1, **i32),
        decode_context_lens=torch.zeros(0, **i32),
        cu_seqlens=cu,
        prefix_lens=torch.zeros(len(chunks), **i32),
        prefill_block_tables=torch.zeros(len(chunks), 1, **i32),
        has_prefix=False,
    )
    ids = torch.tensor([t for c in chunks for t in c], dtype=torch.int64, device=dev)
    model.forward(ids, meta, scratch, torch.zeros(0, dtype=torch.int64, device=dev))
    flat = scratch.view(cfg.num_layers, 2, nblk * block_size, model.num_kv_heads, model.head_dim)
    offs = cu.tolist()
    return [flat[:, :, offs[i]:offs[i + 1]].clone() for i in range(len(chunks))]


@dataclass(frozen=True)
class BlendStats:
    """What one blend did (for tests and the benchmark)."""

    num_tokens: int  # tokens in the blended region
    num_reused: int  # chunk tokens whose KV came from the store
    num_recomputed: int  # of those, recomputed from select_layer on


@torch.inference_mode()
def blend_prefill(
    model: LlamaModel,
    kv: torch.Tensor,
    token_ids: list[int],
    slots: torch.Tensor,
    chunks: list[tuple[int, torch.Tensor]],
    ratio: float,
    select_layer: int = 1,
) -> BlendStats:
    """Fill the cache slots ``slots [E]`` of tokens ``token_ids [E]`` (positions 0..E-1) with
    their blended KV. ``chunks``: (start position, stored KV ``[layers, 2, n, kv_heads, D]``)
    of the chunks inside the region. ``kv`` is the runner's paged cache."""
    cfg, w = model.cfg, model.w
    dev = kv.device
    n_tok, d, hkv = len(token_ids), model.head_dim, model.num_kv_heads
    nq, nk = model.num_heads * d, hkv * d
    num_layers = cfg.num_layers
    flat = kv.view(num_layers, 2, -1, hkv, d)  # [layers, K/V, slots, heads, D]
    reuse = torch.zeros(n_tok, dtype=torch.bool, device=dev)
    for s, ckv in chunks:
        n = ckv.shape[2]
        sl = slots[s:s + n]
        flat[select_layer:, 0, sl] = rerotate(ckv[select_layer:, 0], s, model.cos_sin).to(kv.dtype)
        flat[select_layer:, 1, sl] = ckv[select_layer:, 1].to(kv.dtype)
        reuse[s:s + n] = True
    pos = torch.arange(n_tok, device=dev)
    active: torch.Tensor | None = None  # None: every token (the ordinary causal prefill)
    cu = torch.tensor([0, n_tok], dtype=torch.int32, device=dev)
    no_prefix = torch.zeros(1, dtype=torch.int32, device=dev)
    x = F.embedding(torch.tensor(token_ids, dtype=torch.int64, device=dev), w["embed"])
    residual = None
    n_recomputed = int(reuse.sum())
    for i, lw in enumerate(w["layers"]):
        h, residual = kernels.add_rmsnorm(x, residual, lw["ln1"], cfg.rms_norm_eps)
        qkv = F.linear(h, lw["wqkv"], lw["bqkv"])
        q = qkv[:, :nq].reshape(-1, model.num_heads, d)
        k = qkv[:, nq: nq + nk].reshape(-1, hkv, d)
        v = qkv[:, nq + nk:].reshape(-1, hkv, d)
        q, k = q.contiguous(), k.contiguous()
        kernels.apply_rope(q, k, pos if active is None else active, model.cos_sin)
        v = v.contiguous()
        kc, vc = kv[i, 0], kv[i, 1]
        if i == select_layer and active is None and ratio < 1.0 and bool(reuse.any()):
            # deviation of the fresh KV from the reused KV, per token
            dk = (k.float() - flat[i, 0, slots].float()).square().sum((1, 2))
            dv = (v.float() - flat[i, 1, slots].float()).square().sum((1, 2))
            keep = select_tokens(dk + dv, reuse, ratio)
            n_recomputed = int(reuse[keep].sum())
            # this layer's fresh K/V of all tokens are better than the reused ones: keep all
            kernels.store_kv(k, v, kc, vc, slots)
            if i == num_layers - 1 or keep.numel() == 0:
                break  # nothing downstream needs this layer's output
            active = keep
            q, residual = q[keep].contiguous(), residual[keep]
            mask = _causal_mask(active, n_tok, q.dtype)
        else:
            kernels.store_kv(k, v, kc, vc, slots if active is None else slots[active])
            if i == num_layers - 1:
                break
        if active is None:
            o = kernels.varlen_prefill_attention(q, k, v, cu, no_prefix, None, None, None,
                                                 model.scale)
        else:
            o = _attend(q, flat[i, 0, slots], flat[i, 1, slots], mask, model.scale)
        x = model._reduce(F.linear(o.view(-1, nq), lw["wo"]))
        h, residual = kernels.add_rmsnorm(x, residual, lw["ln2"], cfg.rms_norm_eps)
        gu = F.linear(h, lw["w_gate_up"])
        g, u = gu.chunk(2, dim=-1)
        x = model._reduce(F.linear(F.silu(g) * u, lw["w_down"]))
    return BlendStats(n_tok, int(reuse.sum()), n_recomputed)


def _causal_mask(positions: torch.Tensor, n_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[A, n_keys]``: a query at ``positions[a]`` sees every key at or before
    its own position (0), none after (-inf). Additive, not boolean: torch's CPU attention is
    ~1.6x faster with it."""
    later = torch.arange(n_keys, device=positions.device)[None, :] > positions[:, None]
    return torch.zeros(later.shape, dtype=dtype, device=positions.device).masked_fill(
        later, float("-inf"))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            scale: float) -> torch.Tensor:
    """Attention of queries ``q [A, H, D]`` over keys/values ``[E, Hkv, D]`` under ``mask``."""
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return o.transpose(0, 1).contiguous()
