"""Workload specs for the simulator and planner: an arrival process and two length laws.

Three named workloads with the lengths of ``benchmarks/workloads.py`` (the goodput benchmark
that measures what the planner predicts; the product never imports benchmarks, so the numbers
are repeated here and must be kept in step with it):

    chatbot        ShareGPT (vLLM paper: mean input 161, output 338), lengths x 0.5
    code           HumanEval (~130-token prompts, ~60-token solutions), lengths x 1
    summarization  LongBench as DistServe runs it (prompts truncated to U(1900, 2048),
                   outputs ~300), lengths x 0.5

Lengths are clipped log-normals given by the mean (before clipping) and sigma, the usual shape
of prompt/answer lengths: a bulk and a long right tail (``mu = ln(mean) - sigma^2 / 2``).
Arrivals are a renewal process with gamma gaps of coefficient of variation ``arrival_cv``
(1: Poisson, as the benchmark sends; > 1: burstier).

A workload can also be a YAML/JSON file with the same fields::

    name: mine
    prompt: {kind: lognormal, mean: 300, sigma: 0.8, low: 16, high: 2048}
    output: {kind: fixed, mean: 64}
    arrival_cv: 1.0

Sampling is seeded and uses *common random numbers*: the gaps are drawn once at rate 1 and
divided by the rate, so sweeping the rate changes only the time scale, never the requests.
That keeps SLO attainment (nearly) monotone in the rate, which the goodput search relies on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("fixed", "uniform", "lognormal")


@dataclass(frozen=True)
class LengthDist:
    """Token lengths. fixed: ``mean``; uniform: integers in [low, high]; lognormal: mean (of
    the unclipped law) and sigma, clipped to [low, high]."""

    kind: str = "fixed"
    mean: float = 128
    sigma: float = 0.0
    low: int = 1
    high: int = 1 << 20

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"length kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.mean < 1 or self.low < 1 or self.high < self.low or self.sigma < 0:
            raise ValueError(f"bad length law {self}: need mean >= 1, 1 <= low <= high, "
                             "sigma >= 0")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, round(self.mean), dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high + 1, size=n)
        mu = np.log(self.mean) - self.sigma**2 / 2
        x = np.exp(mu + self.sigma * rng.standard_normal(n))
        return np.clip(np.rint(x), self.low, self.high).astype(np.int64)


@dataclass(frozen=True)
class SimRequest:
    arrival: float  # seconds since the start
    prompt_len: int
    output_len: int  # tokens generated, the first one by prefill


@dataclass(frozen=True)
class Workload:
    name: str
    prompt: LengthDist
    output: LengthDist
    arrival_cv: float = 1.0

    def __post_init__(self) -> None:
        if self.arrival_cv <= 0:
            raise ValueError(f"arrival_cv={self.arrival_cv}: must be > 0 (1 is Poisson)")

    def unit_trace(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(arrival times at rate 1, prompt lengths, output lengths) for ``n`` requests."""
        rng = np.random.default_rng(seed)
        shape = 1.0 / self.arrival_cv**2  # gamma with mean 1 and CV c: shape 1/c^2, scale c^2
        gaps = rng.gamma(shape, 1.0 / shape, size=n)
        return np.cumsum(gaps), self.prompt.sample(rng, n), self.output.sample(rng, n)

    def requests(self, rate: float, n: int, seed: int = 0) -> list[SimRequest]:
        if rate <= 0:
            raise ValueError(f"rate={rate}: must be > 0 requests/s")
        t, p, o = self.unit_trace(n, seed)
        return [SimRequest(float(a / rate), int(x), int(y)) for a, x, y in zip(t, p, o)]

    @property
    def mean_prompt(self) -> float:
        return float(self.prompt.sample(np.random.default_rng(0), 4096).mean())

    @property
    def mean_output(self) -> float:
        return float(self.output.sample(np.random.default_rng(0), 4096).mean())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        try:
            return cls(str(d.get("name", "custom")), LengthDist(**d["prompt"]),
                       LengthDist(**d["output"]), float(d.get("arrival_cv", 1.0)))
        except (KeyError, TypeError) as e:
            raise ValueError(f"workload spec {d!r}: {e}; expected name, prompt {{kind, mean, "
                             "sigma, low, high}, output {...}, arrival_cv") from None


WORKLOADS: dict[str, Workload] = {
    "chatbot": Workload("chatbot", LengthDist("lognormal", 80.5, 1.0, 4, 768),
                        LengthDist("lognormal", 169, 0.9, 4, 512)),
    "code": Workload("code", LengthDist("lognormal", 130, 0.45, 32, 512),
                     LengthDist("lognormal", 60, 0.6, 8, 256)),
    "summarization": Workload("summarization", LengthDist("uniform", 987, 0.0, 950, 1024),
                              LengthDist("lognormal", 150, 0.7, 8, 512)),
}


def load_workload(name_or_path: str) -> Workload:
    """A named workload, or a YAML/JSON file holding a spec (see the module doc)."""
    if name_or_path in WORKLOADS:
        return WORKLOADS[name_or_path]
    p = Path(name_or_path)
    if not p.exists():
        raise ValueError(f"workload {name_or_path!r}: not one of {', '.join(WORKLOADS)} and no "
                         "such file")
    text = p.read_text()
    if p.suffix == ".json":
        d = json.loads(text)
    else:
        import yaml

        d = yaml.safe_load(text)
    if not isinstance(d, dict):
        raise ValueError(f"{p}: a workload file must hold a mapping")  # noqa: TRY004 - a user error
    return Workload.from_dict(d)
