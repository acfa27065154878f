"""The fitted step-latency model of one instance shape (model, dtype, TP degree, CPUs per rank).

Three step kinds, each a small linear model over features the scheduler knows before the step
runs. Time is seconds per engine step.

Prefill (a packed varlen batch of prompt chunks; chunk i has ``n_i`` new tokens after a cached
prefix of ``p_i`` tokens)::

    t = a + b * T + c * P        T = sum n_i                      (tokens computed)
                                 P = sum n_i * p_i + n_i (n_i + 1) / 2   (attended pairs)

``a`` is the per-step cost that does not grow with the batch (scheduling, launching every
layer, reading the weights once); ``b`` is the per-token cost of the linear layers (QKV, MLP;
the LM head runs only on sampled rows, folded into ``a``/``b``); ``c`` is causal attention,
whose work is the number of (query, key) pairs. For one whole prompt of ``l`` tokens
``P = l(l+1)/2``, so this is the familiar ``a + b*l + c'*l^2``; for a packed batch the
quadratic term is the *sum of squares* of the lengths, not the square of the total, because
each prompt attends only to itself (DistServe's prefill model has the same form).

Decode (``B`` running requests, one new token each, request j attends to ``ctx_j`` tokens)::

    t = a + b * B + c * C        C = sum ctx_j                    (context tokens read)

``a`` again is the fixed per-step cost (on memory-bound hardware: streaming the weights), ``b``
the per-request cost (one row through every linear layer, sampling), ``c`` the attention
cost of reading the KV cache, linear in the total context. ``B * mean_context`` is ``C``.

Mixed (colocated chunked prefill: decodes and prefill chunks in one step): the decode model
plus the prefill model's variable terms, the fixed cost paid once::

    t = a_d + b_d * B + c_d * C + b_p * T + c_p * P

Fitting minimises the *relative* squared error (each row divided by its measured time) so
small steps, which dominate TPOT, weigh as much as large ones; coefficients are constrained
to be >= 0 (a negative cost extrapolates to negative step times) by solving every subset of
the three features and keeping the best non-negative solution (exact NNLS for 3 unknowns).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PREFILL_FORM = "t = a + b*tokens + c*pairs; pairs = sum n*prefix + n*(n+1)/2"
DECODE_FORM = "t = a + b*batch + c*context_tokens; context_tokens = sum over the batch"
PROFILE_VERSION = 1


def chunk_pairs(n: int, prefix: int = 0) -> int:
    """(query, key) pairs of causal attention for ``n`` new tokens after ``prefix`` cached."""
    return n * prefix + n * (n + 1) // 2


@dataclass(frozen=True)
class LinearFit:
    """``t = a + b*x1 + c*x2`` with the fit quality on the points it came from."""

    a: float
    b: float
    c: float
    mean_rel_error: float = 0.0  # mean |pred - meas| / meas over the fitted points
    max_rel_error: float = 0.0

    def __call__(self, x1: float, x2: float) -> float:
        return self.a + self.b * x1 + self.c * x2

    @classmethod
    def fit(cls, x1: Sequence[float], x2: Sequence[float], t: Sequence[float]) -> LinearFit:
        """Non-negative relative least squares of ``t ~ a + b*x1 + c*x2`` (see module doc)."""
        import numpy as np

        if len(t) < 3:
            raise ValueError(f"need at least 3 measured points to fit 3 coefficients, got {len(t)}")
        y = np.asarray(t, dtype=float)
        if (y <= 0).any():
            raise ValueError("measured step times must be positive")
        cols = np.stack([np.ones_like(y), np.asarray(x1, float), np.asarray(x2, float)], axis=1)
        w = cols / y[:, None]  # relative error: (X beta - y) / y = (X/y) beta - 1
        best: tuple[float, np.ndarray] | None = None
        for k in (3, 2, 1):
            for subset in itertools.combinations(range(3), k):
                beta_s, *_ = np.linalg.lstsq(w[:, subset], np.ones_like(y), rcond=None)
                if (beta_s < 0).any():
                    continue
                beta = np.zeros(3)
                beta[list(subset)] = beta_s
                err = float(np.sum((w @ beta - 1.0) ** 2))
                if best is None or err < best[0] - 1e-15:
                    best = (err, beta)
        assert best is not None  # a single positive column always gives a >= 0 solution
        beta = best[1]
        rel = np.abs(cols @ beta - y) / y
        return cls(float(beta[0]), float(beta[1]), float(beta[2]),
                   float(rel.mean()), float(rel.max()))


@dataclass(frozen=True)
class TransferModel:
    """KV transfer: ``t = latency + bytes / bandwidth`` over one pair channel."""

    bandwidth_bytes_per_s: float = 2e9
    latency_s: float = 1e-3

    def __post_init__(self) -> None:
        if self.bandwidth_bytes_per_s <= 0 or self.latency_s < 0:
            raise ValueError("transfer bandwidth must be > 0 and latency >= 0")

    def seconds(self, nbytes: float, channels: int = 1) -> float:
        # TP ranks move their own head slices over their own channels, in parallel
        return self.latency_s + nbytes / (self.bandwidth_bytes_per_s * max(1, channels))


@dataclass(frozen=True)
class LatencyModel:
    """Step latencies of one instance shape, plus what the simulator needs about its KV."""

    prefill: LinearFit
    decode: LinearFit
    tp: int = 1
    cpus_per_rank: float = 1.0
    kv_bytes_per_token: int = 0  # all layers, K and V, all KV heads (summed over TP ranks)
    num_layers: int = 1
    kv_capacity_tokens: int | None = None  # per instance; None: unbounded
    measured: bool = True  # False: extrapolated from another TP degree (see ``extrapolate_tp``)

    @property
    def devices(self) -> float:
        """CPUs (or GPUs, at one per rank) one instance of this shape occupies."""
        return self.tp * self.cpus_per_rank

    def prefill_time(self, chunks: Iterable[tuple[int, int]]) -> float:
        """``chunks``: (new tokens, cached prefix) per request in the packed batch."""
        tokens = pairs = 0
        for n, p in chunks:
            tokens += n
            pairs += chunk_pairs(n, p)
        return self.prefill(tokens, pairs)

    def decode_time(self, batch: int, context_tokens: int) -> float:
        return self.decode(batch, context_tokens)

    def mixed_time(self, batch: int, context_tokens: int, tokens: int, pairs: int) -> float:
        """A colocated step: ``batch`` decodes plus prefill chunks of ``tokens``/``pairs``."""
        if batch == 0:
            return self.prefill(tokens, pairs)
        p = self.prefill
        return self.decode(batch, context_tokens) + p.b * tokens + p.c * pairs


def extrapolate_tp(base: LatencyModel, tp: int, efficiency: float = 0.85,
                   comm_s_per_layer: float = 1e-4) -> LatencyModel:
    """An *estimate* of ``base`` run at ``tp`` ranks (``base.tp`` ranks measured).

    Work that TP splits (the per-token and per-pair terms, and the weight-streaming part of the
    fixed term) shrinks by ``tp / base.tp`` at ``efficiency``; every step pays two all-reduces
    per layer, ``comm_s_per_layer`` in all. Measure with ``pdserve profile --tp N`` to replace
    the guess: measured profiles always win over extrapolated ones in the planner.
    """
    if tp < 1 or not 0 < efficiency <= 1:
        raise ValueError("tp must be >= 1 and efficiency in (0, 1]")
    k = tp / base.tp
    speed = 1.0 if k == 1 else k * efficiency
    comm = comm_s_per_layer * base.num_layers * (1 if tp > 1 else 0)

    def scale(f: LinearFit) -> LinearFit:
        return LinearFit(f.a / speed + comm, f.b / speed, f.c / speed)

    cap = None if base.kv_capacity_tokens is None else int(base.kv_capacity_tokens * k)
    return LatencyModel(scale(base.prefill), scale(base.decode), tp, base.cpus_per_rank,
                        base.kv_bytes_per_token, base.num_layers, cap, measured=tp == base.tp)


@dataclass(frozen=True)
class Profile:
    """What ``pdserve profile`` writes: the fitted model, the raw points, and the context."""

    model: str  # as given (a path or the default model's name)
    dtype: str
    latency: LatencyModel
    transfer: TransferModel = field(default_factory=TransferModel)
    num_heads: int = 1
    num_kv_heads: int = 1
    max_model_len: int = 2048
    prefill_points: list[dict[str, Any]] = field(default_factory=list)
    decode_points: list[dict[str, Any]] = field(default_factory=list)
    transfer_points: list[dict[str, Any]] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        lat = self.latency
        return {
            "version": PROFILE_VERSION, "model": self.model, "dtype": self.dtype, "tp": lat.tp,
            "cpus_per_rank": lat.cpus_per_rank, "machine": self.machine,
            "model_shape": {"num_layers": lat.num_layers, "num_heads": self.num_heads,
                            "num_kv_heads": self.num_kv_heads, "max_model_len": self.max_model_len,
                            "kv_bytes_per_token": lat.kv_bytes_per_token},
            "kv_capacity_tokens": lat.kv_capacity_tokens,
            "prefill": {"form": PREFILL_FORM, "coef": asdict(lat.prefill),
                        "points": self.prefill_points},
            "decode": {"form": DECODE_FORM, "coef": asdict(lat.decode),
                       "points": self.decode_points},
            "transfer": {"form": "t = latency + bytes/bandwidth", **asdict(self.transfer),
                         "points": self.transfer_points},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        if d.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile version {d.get('version')!r} is not {PROFILE_VERSION}; "
                             "re-run `pdserve profile`")
        shape = d["model_shape"]
        lat = LatencyModel(
            LinearFit(**d["prefill"]["coef"]), LinearFit(**d["decode"]["coef"]), int(d["tp"]),
            float(d["cpus_per_rank"]), int(shape["kv_bytes_per_token"]),
            int(shape["num_layers"]), d.get("kv_capacity_tokens"))
        t = d.get("transfer") or {}
        transfer = TransferModel(float(t.get("bandwidth_bytes_per_s", 2e9)),
                                 float(t.get("latency_s", 1e-3)))
        return cls(d["model"], d["dtype"], lat, transfer, int(shape["num_heads"]),
                   int(shape["num_kv_heads"]), int(shape["max_model_len"]),
                   d["prefill"].get("points", []), d["decode"].get("points", []),
                   t.get("points", []), d.get("machine", {}))

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1))
        return p

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"profile {p} does not exist; make one with "
                                    "`pdserve profile --model M --out FILE.json`")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p} is not a pdserve profile ({e}); re-run `pdserve profile`") \
                from None
