"""Read a Hugging Face Llama-family folder's safetensors into pdserve's fused weight layout.

Names map as follows (per layer ``i``); q/k/v and gate/up are fused so each projection is one
matmul:

    model.layers.i.self_attn.{q,k,v}_proj.{weight,bias} -> layers[i].wqkv / bqkv
    model.layers.i.self_attn.o_proj.weight               -> layers[i].wo
    model.layers.i.mlp.{gate,up}_proj.weight             -> layers[i].w_gate_up
    model.layers.i.mlp.down_proj.weight                  -> layers[i].w_down
    model.layers.i.{input,post_attention}_layernorm      -> layers[i].ln1 / ln2
    model.embed_tokens / model.norm / lm_head            -> embed / norm / lm_head (tied: embed)

``Shard`` says which slice a tensor-parallel rank loads, so a rank reads only its part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .tp_layout import head_ranges, split


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``size``; heads split contiguously (KV heads replicated when the TP
    degree exceeds their count: rank r then holds KV head ``r * num_kv_heads // size``).
    Loading uses ``attention_heads``, which also allows uneven splits of whole GQA groups."""

    rank: int = 0
    size: int = 1

    def heads(self, n: int) -> tuple[int, int]:
        if n % self.size == 0:
            per = n // self.size
            return self.rank * per, (self.rank + 1) * per
        if self.size % n == 0:  # replicate: size/n ranks share one head
            h = self.rank * n // self.size
            return h, h + 1
        raise ValueError(f"{n} heads cannot be split over tp={self.size}")

    def attention_heads(
        self, num_heads: int, num_kv_heads: int
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """(query-head range, KV-head range) of this rank: whole GQA groups, uneven when tp
        does not divide the KV heads (see ``tp_layout``)."""
        return head_ranges(num_heads, num_kv_heads, self.rank, self.size)

    def range(self, n: int) -> tuple[int, int]:
        """This rank's columns of a dimension split ``n`` ways (floor split; may be uneven)."""
        return split(n, self.rank, self.size)


class _Files:
    def __init__(self, folder: Path) -> None:
        idx = folder / "model.safetensors.index.json"
        if idx.exists():
            files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {folder}")
        self._handles = [safe_open(str(folder / f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None):
        if name not in self._where:
            raise KeyError(f"weight {name!r} missing from the checkpoint")
        sl = self._where[name].get_slice(name)
        if rows is None and cols is None:
            return sl[:]
        r = slice(*rows) if rows else slice(None)
        if cols is None:
            return sl[r]
        return sl[r, slice(*cols)]


def load_weights(cfg: ModelConfig, shard: Shard = Shard()) -> dict:
    """Return the (sharded, fused) weights in ``cfg.torch_dtype``."""
    f = _Files(Path(cfg.path))
    dt = cfg.torch_dtype
    d = cfg.head_dim
    (h0, h1), (k0, k1) = shard.attention_heads(cfg.num_heads, cfg.num_kv_heads)
    i0, i1 = shard.range(cfg.intermediate_size)

    def cvt(t: torch.Tensor) -> torch.Tensor:
        return t.to(dt).contiguous()

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        q = f.get(p + "self_attn.q_proj.weight", (h0 * d, h1 * d))
        k = f.get(p + "self_attn.k_proj.weight", (k0 * d, k1 * d))
        v = f.get(p + "self_attn.v_proj.weight", (k0 * d, k1 * d))
        layer = {
            "ln1": cvt(f.get(p + "input_layernorm.weight")),
            "ln2": cvt(f.get(p + "post_attention_layernorm.weight")),
            "wqkv": cvt(torch.cat([q, k, v])),
            "wo": cvt(f.get(p + "self_attn.o_proj.weight", None, (h0 * d, h1 * d))),
            "w_gate_up": cvt(torch.cat([
                f.get(p + "mlp.gate_proj.weight", (i0, i1)),
                f.get(p + "mlp.up_proj.weight", (i0, i1)),
            ])),
            "w_down": cvt(f.get(p + "mlp.down_proj.weight", None, (i0, i1))),
            "bqkv": None,
        }
        if cfg.attention_bias and f.has(p + "self_attn.q_proj.bias"):
            layer["bqkv"] = cvt(torch.cat([
                f.get(p + "self_attn.q_proj.bias", (h0 * d, h1 * d)),
                f.get(p + "self_attn.k_proj.bias", (k0 * d, k1 * d)),
                f.get(p + "self_attn.v_proj.bias", (k0 * d, k1 * d)),
            ]))
        layers.append(layer)
    embed = cvt(f.get("model.embed_tokens.weight"))
    if cfg.tie_word_embeddings or not f.has("lm_head.weight"):
        lm_head = embed
    else:
        lm_head = cvt(f.get("lm_head.weight"))
    return {"embed": embed, "norm": cvt(f.get("model.norm.weight")), "lm_head": lm_head, "layers": layers}
