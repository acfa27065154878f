"""Engine configuration: frozen dataclasses grouped by concern, validated on construction.

These live in ``workers`` (not ``cluster``) because the engine must import no Ray and no
cluster code; ``cluster.config`` composes them into the application config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ROLES = ("colocated", "prefill", "decode")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers the engine needs, read from a HF ``config.json``."""

    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections (Qwen2)
    eos_token_ids: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_path(cls, path: str | os.PathLike, dtype: str = "float32") -> ModelConfig:
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(
                f"model path {str(p)!r} is not a folder; pass a local Hugging Face model folder "
                "(config.json + *.safetensors + tokenizer files)"
            )
        cfg_file = p / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{cfg_file} not found: {p} is not a Hugging Face model folder")
        c = json.loads(cfg_file.read_text())
        archs = c.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or c.get('model_type')!r} in {cfg_file}; "
                f"pdserve supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = c["num_attention_heads"]
        # transformers 5 nests rope settings under rope_parameters; 4.x used rope_theta/rope_scaling
        rope = c.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
        scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos = c.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        tie = c.get("tie_word_embeddings", arch != "MistralForCausalLM")
        return cls(
            path=str(p),
            architecture=arch,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(tie),
            attention_bias=bool(c.get("attention_bias", arch == "Qwen2ForCausalLM")),
            eos_token_ids=eos_ids,
            dtype=dtype,
        )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    memory_bytes: int | None = None  # KV pool budget per rank; None: derived from free RAM
    num_blocks: int | None = None  # overrides memory_bytes (tests use tiny pools)
    prefix_caching: bool = True  # keep finished requests' full blocks for reuse (LRU)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size}: must be a positive power of two")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks={self.num_blocks}: need at least 2 blocks")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError("kv cache memory must be positive (e.g. --kv-cache-memory 2GiB)")


@dataclass(frozen=True)
class SchedulerConfig:
    role: str = "colocated"  # colocated | prefill | decode
    max_num_seqs: int = 64  # running requests per step
    max_num_batched_tokens: int = 2048  # token budget per step
    chunked_prefill: bool = True  # split prompts across steps (colocated: Sarathi-style)
    packed_prefill: bool = True  # several prompts in one varlen batch (else one per step)
    max_waiting: int = 1024  # bounded waiting queue; add_request raises QueueFull beyond
    max_model_len: int | None = None  # prompt + output cap; None: the model's max positions

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r}: choose one of {', '.join(ROLES)}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_waiting < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_waiting must be >= 1")


@dataclass(frozen=True)
class ChunkConfig:
    """RAG chunk caches (CacheBlend): where chunk KV is kept and how much of it is recomputed.

    A chunk's KV lives in the first tier with room: ``memory_bytes`` (the instance's device),
    then ``host_bytes`` (CPU RAM), then ``disk_bytes`` under ``disk_dir``; least recently used
    chunks move down a tier, and out of the last one."""

    enabled: bool = True
    recompute_ratio: float = 0.15  # default fraction of chunk tokens recomputed (README: why)
    select_layer: int = 1  # layer whose KV deviation picks the tokens to recompute
    memory_bytes: int = 256 << 20
    host_bytes: int = 1 << 30
    disk_bytes: int = 0  # 0: no disk tier
    disk_dir: str | None = None  # None with disk_bytes > 0: a temporary folder

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"chunks.recompute_ratio={self.recompute_ratio}: must be in [0, 1]")
        if self.select_layer < 1:
            raise ValueError(f"chunks.select_layer={self.select_layer}: must be >= 1 (layer 0's "
                             "KV does not depend on other tokens, so it cannot show deviation)")
        if min(self.memory_bytes, self.host_bytes, self.disk_bytes) < 0:
            raise ValueError("chunk cache sizes must be >= 0 bytes")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    seed: int = 0  # for requests without their own seed
    chunks: ChunkConfig = field(default_factory=ChunkConfig)
