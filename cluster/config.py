"""The application config: frozen dataclasses grouped by concern, mapped from YAML and flags.

    model: SmolLM2-135M-Instruct      # or a local HF folder
    dtype: bfloat16
    mode: disaggregated               # or colocated
    prefill: {replicas: 1, tp: 1, cpus: 1}
    decode:  {replicas: 1, tp: 1, cpus: 1}
    kv_transfer: {timeout_s: 30, compress: null}
    router: {host: 127.0.0.1, port: 8000, policy: least_loaded}
    slo: {ttft_s: 1.0, tpot_s: 0.1}

Validation happens twice: shape and ranges on construction (``__post_init__``), and against
the model (heads vs TP degree, context length) in ``AppConfig.check_model``; both raise
``ConfigError`` with a message that says what to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODES = ("disaggregated", "colocated")
POLICIES = ("prefix_aware", "least_loaded", "round_robin")


class ConfigError(ValueError):
    pass


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class PoolConfig:
    replicas: int = 1
    tp: int = 1
    cpus: float = 1.0  # CPUs per TP rank; torch threads per rank = max(1, int(cpus))
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    chunked_prefill: bool = True
    kv_cache_memory: int | None = None  # bytes per rank; None: derived from free RAM
    num_blocks: int | None = None  # overrides kv_cache_memory (tests)
    max_waiting: int = 256
    prefix_caching: bool = True
    # Placement on a multi-node Ray cluster (see deploy/README.md, "Multi-node"): Ray custom
    # resources each replica needs (e.g. {node_prefill: 1}, with `ray start --resources` on
    # the nodes meant for this pool) and/or node labels it must match (`ray start --labels`).
    resources: dict[str, float] = field(default_factory=dict)
    node_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _need(self.replicas >= 1, f"replicas={self.replicas}: need at least 1")
        _need(self.tp >= 1, f"tp={self.tp}: need at least 1")
        _need(self.cpus > 0, f"cpus={self.cpus}: must be positive")
        _check_placement("pool", self.resources, self.node_labels)


@dataclass(frozen=True)
class KVTransferConfig:
    timeout_s: float = 30.0  # a transfer (or an unclaimed reservation) fails after this
    compress: str | None = None  # None or "int8"

    def __post_init__(self) -> None:
        _need(self.timeout_s > 0, "kv_transfer.timeout_s must be positive")
        _need(self.compress in (None, "int8"), f"kv_transfer.compress={self.compress!r}: "
              "use null (exact) or int8")


@dataclass(frozen=True)
class MigrationConfig:
    """Live migration of decoding requests between decode instances (router/migration.py).
    Load is the share of a decode instance's KV blocks in use."""

    enabled: bool = True  # automatic triggers (drain migrates whatever this says)
    interval_s: float = 1.0  # how often the router looks at the decode pool
    imbalance_high: float = 0.3  # start when load(most) - load(least) exceeds this ...
    imbalance_low: float = 0.1  # ... and keep going until it falls below this (hysteresis)
    batch_gap: int = 8  # or when their running batches differ by at least this many
    pressure_free: float = 0.1  # memory pressure: a source with less free KV than this share
    min_running: int = 2  # a source needs this many decoding requests (imbalance trigger)
    cooldown_s: float = 2.0  # between two automatic migrations from the same instance
    # The source announces the destination on the stream before the switch and the router
    # connects to it then (saves a round trip at the switch). Off by default: with Ray Serve
    # 2.60, a handle that had opened such early streams stopped delivering targeted calls in
    # a drain-after-migrations test (under investigation).
    connect_early: bool = False

    def __post_init__(self) -> None:
        _need(self.interval_s > 0, "migration.interval_s must be positive")
        _need(0 <= self.imbalance_low <= self.imbalance_high <= 1,
              f"migration: need 0 <= imbalance_low ({self.imbalance_low}) <= imbalance_high "
              f"({self.imbalance_high}) <= 1")
        _need(0 <= self.pressure_free < 1, "migration.pressure_free must be in [0, 1)")
        _need(self.batch_gap >= 1 and self.min_running >= 1,
              "migration.batch_gap and migration.min_running must be >= 1")
        _need(self.cooldown_s >= 0, "migration.cooldown_s must be >= 0")


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = None  # the gRPC API, served by the router replica on host:grpc_port
    policy: str = "prefix_aware"
    prefix_weight: float = 1.0  # prefix_aware: tokens of queue one cached token is worth
    retries: int = 1  # re-route a request whose prefill or transfer failed
    request_timeout_s: float = 600.0  # per request, queueing included; clients may ask for less
    api_keys: tuple[str, ...] = ()  # plus PDSERVE_API_KEYS; none: the API is open
    admin_token: str | None = None  # or PDSERVE_ADMIN_TOKEN; none: admin endpoints disabled
    allow_public_without_keys: bool = False  # serve beyond loopback with no keys (explicit only)
    max_queue: int = 64  # per pool: requests waiting beyond what it runs; more get 429
    queue_timeout_s: float = 30.0  # longest wait in a pool's queue before a 429
    retry_after_s: int = 1  # the Retry-After that 429s carry
    max_body_bytes: int = 4 << 20  # HTTP request bodies larger than this get 413
    # Where the router replica runs on a multi-node cluster (as PoolConfig.resources /
    # node_labels); keep it on the head, beside Serve's HTTP proxy, so losing a worker node
    # never takes the router with it.
    resources: dict[str, float] = field(default_factory=dict)
    node_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _need(self.policy in POLICIES, f"router.policy={self.policy!r}: choose one of "
              f"{', '.join(POLICIES)}")
        _need(0 <= self.port < 65536, f"router.port={self.port} is not a port")
        _need(self.grpc_port is None or 0 < self.grpc_port < 65536,
              f"router.grpc_port={self.grpc_port} is not a port")
        keys = self.api_keys
        if isinstance(keys, str):  # YAML "a,b" or one key
            keys = keys.split(",")
        object.__setattr__(self, "api_keys", tuple(k.strip() for k in keys if k and k.strip()))
        _need(self.request_timeout_s > 0 and self.queue_timeout_s > 0,
              "router.request_timeout_s and router.queue_timeout_s must be positive")
        _need(self.max_queue >= 0, f"router.max_queue={self.max_queue}: must be >= 0")
        _need(self.retry_after_s >= 1, f"router.retry_after_s={self.retry_after_s}: must be >= 1")
        _need(self.max_body_bytes >= 1024,
              f"router.max_body_bytes={self.max_body_bytes}: must be at least 1024")
        _check_placement("router", self.resources, self.node_labels)
        self._check_exposure()

    def _check_exposure(self) -> None:
        """With no API keys, serve (HTTP and gRPC) on loopback only unless explicitly allowed."""
        from pdserve import envs

        if self.api_keys or envs.api_keys() or self.allow_public_without_keys:
            return
        hint = ("set router.api_keys (or PDSERVE_API_KEYS), or router.allow_public_without_keys: "
                "true to serve without authentication")
        _need(is_loopback(self.host), f"router.host={self.host} is not a loopback address and no "
              f"API keys are configured; {hint}")


@dataclass(frozen=True)
class SLOConfig:
    ttft_s: float = 1.0
    tpot_s: float = 0.1


POOLS = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class PoolScaling:
    min_replicas: int = 1
    max_replicas: int = 4

    def __post_init__(self) -> None:
        _need(1 <= self.min_replicas <= self.max_replicas,
              f"autoscaling: need 1 <= min_replicas ({self.min_replicas}) <= max_replicas "
              f"({self.max_replicas})")


@dataclass(frozen=True)
class AutoscalingConfig:
    """SLO-driven replica counts per pool (``cluster/scaling.py`` applies
    ``cluster/autoscaler.py``'s policy). ``policy`` overrides ``ScalingPolicy`` knobs
    (thresholds, ``out_after_s``, cooldowns, ``warmup_s``, ``prior_prefill_tokens_per_s``)."""

    enabled: bool = False
    interval_s: float = 2.0  # how often pools are measured and decided on
    drain_timeout_s: float = 30.0  # scale-in goes on after this even if a drain has not ended
    prefill: PoolScaling = field(default_factory=PoolScaling)
    decode: PoolScaling = field(default_factory=PoolScaling)
    colocated: PoolScaling = field(default_factory=PoolScaling)
    policy: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in POOLS:
            v = getattr(self, name)
            if isinstance(v, dict):
                bad = set(v) - {"min_replicas", "max_replicas"}
                _need(not bad, f"autoscaling.{name}: unknown keys {', '.join(sorted(bad))}; "
                      "known: min_replicas, max_replicas")
                object.__setattr__(self, name, PoolScaling(**v))
        _need(self.interval_s > 0 and self.drain_timeout_s > 0, "autoscaling.interval_s and "
              "autoscaling.drain_timeout_s must be positive")
        from .autoscaler import ScalingPolicy

        known = set(ScalingPolicy.__dataclass_fields__) - {
            "min_replicas", "max_replicas", "ttft_slo_s", "tpot_slo_s"}
        bad = set(self.policy) - known
        _need(not bad, f"autoscaling.policy: unknown keys {', '.join(sorted(bad))}; known: "
              f"{', '.join(sorted(known))}")
        try:
            ScalingPolicy(**self.policy)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"autoscaling.policy: {e}") from None


@dataclass(frozen=True)
class ChunksConfig:
    """RAG chunk caches (CacheBlend, README "Chunk caches"), per instance: the default
    fraction of chunk tokens recomputed and the chunk store's tiers (bytes; a chunk moves
    down device → host → disk when a tier is full). Maps onto ``workers.config.ChunkConfig``."""

    enabled: bool = True
    recompute_ratio: float = 0.15
    memory_bytes: int = 256 << 20
    host_bytes: int = 1 << 30
    disk_bytes: int = 0  # 0: no disk tier
    disk_dir: str | None = None  # None: a temporary folder (when disk_bytes > 0)

    def __post_init__(self) -> None:
        _need(0.0 <= self.recompute_ratio <= 1.0,
              f"chunks.recompute_ratio={self.recompute_ratio}: must be in [0, 1] (1 = full "
              "prefill)")
        _need(min(self.memory_bytes, self.host_bytes, self.disk_bytes) >= 0,
              "chunks.memory_bytes, host_bytes and disk_bytes must be >= 0")


@dataclass(frozen=True)
class AppConfig:
    model: str | None = None  # None: the default model
    dtype: str = "bfloat16"
    mode: str = "disaggregated"
    block_size: int = 16
    prefill: PoolConfig = field(default_factory=lambda: PoolConfig(max_num_batched_tokens=4096))
    decode: PoolConfig = field(default_factory=lambda: PoolConfig(max_num_seqs=128))
    colocated: PoolConfig = field(default_factory=lambda: PoolConfig(max_num_batched_tokens=512))
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    chunks: ChunksConfig = field(default_factory=ChunksConfig)
    redis_url: str | None = None
    testing_faults: bool = False  # allow the fault-injection hook (tests only)

    def __post_init__(self) -> None:
        _need(self.mode in MODES, f"mode={self.mode!r}: choose one of {', '.join(MODES)}")
        _need(self.dtype in ("float32", "bfloat16"), f"dtype={self.dtype!r}: float32 or bfloat16")

    @property
    def pools(self) -> dict[str, PoolConfig]:
        if self.mode == "colocated":
            return {"colocated": self.colocated}
        return {"prefill": self.prefill, "decode": self.decode}

    def check_model(self, num_heads: int, num_kv_heads: int) -> None:
        """Refuse TP degrees the model's heads cannot be split over."""
        valid = valid_tp_degrees(num_heads, num_kv_heads)
        for name, pool in self.pools.items():
            _need(pool.tp in valid, f"{name}.tp={pool.tp} but the model has {num_heads} attention "
                  f"heads and {num_kv_heads} KV heads; valid: {', '.join(map(str, valid))}")

    # ---- mapping ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AppConfig:
        d = dict(d or {})
        nested = {"prefill": PoolConfig, "decode": PoolConfig, "colocated": PoolConfig,
                  "kv_transfer": KVTransferConfig, "router": RouterConfig, "slo": SLOConfig,
                  "autoscaling": AutoscalingConfig, "migration": MigrationConfig,
                  "chunks": ChunksConfig}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        _need(not unknown, f"unknown config keys: {', '.join(sorted(unknown))}; known: "
              f"{', '.join(sorted(known))}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k in nested and isinstance(v, dict):
                sub = nested[k]
                if k in ("prefill", "decode", "colocated"):
                    base = dataclasses.asdict(getattr(cls(), k))
                    v = {**base, **v}
                fields = {f.name for f in dataclasses.fields(sub)}
                bad = set(v) - fields
                _need(not bad, f"unknown keys in {k}: {', '.join(sorted(bad))}; known: "
                      f"{', '.join(sorted(fields))}")
                try:
                    kw[k] = sub(**v)
                except TypeError as e:
                    raise ConfigError(f"{k}: {e}") from None
            else:
                kw[k] = v
        return cls(**kw)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> AppConfig:
        p = Path(path)
        _need(p.exists(), f"config file {p} does not exist")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        _need(isinstance(d, dict), f"{p}: the top level must be a mapping")
        return cls.from_dict(merge(d, overrides or {}))


def _check_placement(what: str, resources: dict, labels: dict) -> None:
    _need(isinstance(resources, dict) and isinstance(labels, dict),
          f"{what}: resources and node_labels are mappings, e.g. {{node_decode: 1}}")
    for k, v in resources.items():
        _need(k not in ("CPU", "GPU", "memory"), f"{what}.resources: {k} is set by cpus/tp, "
              "not here; name a custom resource given to nodes with `ray start --resources`")
        _need(isinstance(v, (int, float)) and v > 0,
              f"{what}.resources.{k}={v!r}: must be a positive number")
    for k, v in labels.items():
        _need(isinstance(v, str), f"{what}.node_labels.{k}={v!r}: label values are strings")


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def valid_tp_degrees(num_heads: int, num_kv_heads: int, limit: int = 16) -> list[int]:
    """TP degrees the engine can split this model's heads over (see workers/tp_layout.py:
    uneven contiguous KV-head groups when tp <= KV heads, replicated KV heads beyond)."""
    from pdserve.workers.tp_layout import supports_tp

    return [tp for tp in range(1, limit + 1) if supports_tp(num_heads, num_kv_heads, tp)]
