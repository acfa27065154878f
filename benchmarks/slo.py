"""SLO attainment and goodput, the way DistServe defines them.

- A request meets its SLOs when it finished without error, its TTFT is within the TTFT SLO and
  its TPOT (mean time per output token after the first) is within the TPOT SLO.
- Attainment at a rate = the share of the requests sent at that rate that met both.
- Goodput = the highest rate whose attainment is >= 90%, interpolated linearly towards the
  next measured rate (whose attainment is below 90%); divided by the CPUs a system used.

The SLOs are k1 x and k2 x a reference unloaded latency. The reference is the same for every
system in a run — the lowest unloaded TTFT and TPOT that any system under test achieved — so a
slow system is not judged against looser SLOs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TARGET = 0.9  # DistServe's attainment target


@dataclass(frozen=True)
class Latency:
    ttft_s: float
    tpot_s: float


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float

    @classmethod
    def relative(cls, ref: Latency, k1: float, k2: float, scale: float = 1.0) -> SLO:
        """``scale`` tightens (< 1) or loosens (> 1) both, like DistServe's "SLO scale"."""
        return cls(ref.ttft_s * k1 * scale, ref.tpot_s * k2 * scale)

    def deadline(self, num_tokens: int) -> float:
        """Seconds after arrival by which a request generating ``num_tokens`` must finish to
        have a chance: TTFT <= a and (e2e - TTFT) / (n - 1) <= b imply e2e <= a + (n - 1) b."""
        return self.ttft_s + max(0, num_tokens - 1) * self.tpot_s


@dataclass(frozen=True)
class Outcome:
    """What the client measured for one request (times in seconds from its arrival)."""

    ttft_s: float | None  # None: no token arrived
    tpot_s: float | None  # None: fewer than 2 tokens, or no token
    num_tokens: int
    error: str | None = None  # an HTTP or in-band error, or "timeout"

    def meets(self, slo: SLO) -> bool:
        if self.error is not None or self.ttft_s is None:
            return False
        return self.ttft_s <= slo.ttft_s and (self.tpot_s or 0.0) <= slo.tpot_s


def attainment(outcomes: Sequence[Outcome], slo: SLO) -> float:
    if not outcomes:
        return 0.0
    return sum(o.meets(slo) for o in outcomes) / len(outcomes)


@dataclass(frozen=True)
class Goodput:
    rate: float  # req/s for the whole system
    # None: the 90% crossing lies between two measured rates. "lower": every measured rate met
    # the target, so the true goodput is at least ``rate``. "upper": none did, so the true
    # goodput is below the lowest measured rate and ``rate`` is interpolated towards an idle
    # system.
    bound: str | None = None


def goodput(points: Iterable[tuple[float, float]], target: float = TARGET) -> Goodput:
    """``points``: (rate, attainment) pairs. Attainment at rate 0 is taken as 1 (an idle
    system meets SLOs set above its unloaded latency), so a system below the target at every
    measured rate still gets an interpolated goodput between 0 and the lowest rate."""
    pts = [(0.0, 1.0), *sorted((r, a) for r, a in points if r > 0)]
    best = max(i for i, (_, a) in enumerate(pts) if a >= target)
    if best == len(pts) - 1:
        return Goodput(pts[best][0], "lower" if len(pts) > 1 else None)
    (r0, a0), (r1, a1) = pts[best], pts[best + 1]
    return Goodput(r0 + (a0 - target) * (r1 - r0) / (a0 - a1), "upper" if best == 0 else None)


def reference(unloaded: dict[str, Latency]) -> tuple[Latency, dict[str, str]]:
    """The lowest unloaded TTFT and TPOT among systems, and which system each came from."""
    if not unloaded:
        raise ValueError("no unloaded latency was measured")
    ttft_sys = min(unloaded, key=lambda s: unloaded[s].ttft_s)
    tpot_sys = min(unloaded, key=lambda s: unloaded[s].tpot_s)
    return (Latency(unloaded[ttft_sys].ttft_s, unloaded[tpot_sys].tpot_s),
            {"ttft": ttft_sys, "tpot": tpot_sys})


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1), interpolating linearly between order statistics; None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    i = int(pos)
    if i + 1 >= len(xs):
        return float(xs[-1])
    return xs[i] + (pos - i) * (xs[i + 1] - xs[i])
