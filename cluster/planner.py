"""The goodput planner: which TP degree and how many replicas per pool, for a device budget.

DistServe's search, on our simulator (``goodput.py``):

1. For every instance shape (TP degree x CPUs per rank; measured profiles, plus degrees
   extrapolated from the smallest measured one), simulate **one** instance of each phase and
   find its goodput against that phase's SLO: ``r_p(shape)`` (TTFT) and ``r_d(shape)`` (TPOT),
   and ``r_c(shape)`` for a colocated instance (both SLOs).
2. Combine under the budget ``N`` devices (an instance of shape s uses ``tp * cpus`` of them)::

       disaggregated: estimate = min(n_p * r_p(s_p), n_d * r_d(s_d)),
                      n_p * dev(s_p) + n_d * dev(s_d) <= N
       colocated:     estimate = n * r_c(s),  n * dev(s) <= N

   Replicating an instance multiplies its rate (the router spreads load): DistServe's
   "replicate the best per-device configuration" step.
3. Per mode, the ``verify`` best estimates (among plans no plan with fewer devices beats) and
   the best estimate of every shape combination are simulated whole (prefill pool, transfers,
   decode pool) against *both* SLOs; that joint goodput is the prediction, and the ranking.
   (The estimate is optimistic where two 90% per-phase attainments multiply, and pessimistic
   where replicas pool their queues; the joint simulation models both.)

Ranking: without a target rate, highest goodput within the budget, then fewest devices (so
goodput per device is as high as the budget allows). With ``target_rate``: plans reaching it,
fewest devices first (DistServe's "meet the traffic at the lowest cost").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .config import AppConfig, PoolConfig
from .goodput import SLO, GoodputSearch
from .latency_model import LatencyModel, TransferModel, extrapolate_tp
from .simulator import PoolSpec
from .workload import Workload

MODES = ("disaggregated", "colocated")


@dataclass(frozen=True)
class PoolPlan:
    shape: LatencyModel
    replicas: int

    @property
    def devices(self) -> float:
        return self.replicas * self.shape.devices

    def describe(self) -> str:
        est = "" if self.shape.measured else " (extrapolated)"
        return f"{self.replicas} x tp{self.shape.tp}@{self.shape.cpus_per_rank:g}cpu{est}"


@dataclass(frozen=True)
class Plan:
    mode: str
    pools: dict[str, PoolPlan]  # prefill + decode, or colocated
    estimate: float  # req/s from the per-phase rates (step 2)
    goodput: float | None = None  # req/s from the joint simulation (step 3)

    @property
    def devices(self) -> float:
        return sum(p.devices for p in self.pools.values())

    @property
    def rate(self) -> float:
        return self.goodput if self.goodput is not None else self.estimate

    @property
    def per_device(self) -> float:
        return self.rate / self.devices

    @property
    def measured(self) -> bool:
        return all(p.shape.measured for p in self.pools.values())

    def describe(self) -> str:
        return "; ".join(f"{k} {p.describe()}" for k, p in self.pools.items())

    def config(self, model: str | None, dtype: str, slo: SLO) -> dict:
        """The ``AppConfig`` mapping (only what the plan decides; the rest stays default)."""
        d: dict = {"model": model, "dtype": dtype, "mode": self.mode,
                   "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}}
        for name, p in self.pools.items():
            d[name] = {"replicas": p.replicas, "tp": p.shape.tp, "cpus": p.shape.cpus_per_rank}
        return d


def pool_spec(shape: LatencyModel, pool: PoolConfig, replicas: int = 1,
              block_size: int = 16) -> PoolSpec:
    """The simulator's view of a pool: the batch limits ``pdserve up`` would run it with."""
    return PoolSpec(shape, replicas, pool.max_num_batched_tokens, pool.max_num_seqs, block_size)


def candidate_shapes(measured: Iterable[LatencyModel], tp_degrees: Iterable[int],
                     budget: float) -> list[LatencyModel]:
    """Measured shapes, plus ``tp_degrees`` extrapolated from the smallest measured TP degree
    where no profile of that degree exists; only shapes that fit the budget."""
    measured = list(measured)
    if not measured:
        raise ValueError("no latency profile given: run `pdserve profile --model M --out F` "
                         "and pass --profile F")
    shapes = {(m.tp, m.cpus_per_rank): m for m in measured}
    base = min(measured, key=lambda m: (m.tp, -m.cpus_per_rank))
    for tp in tp_degrees:
        shapes.setdefault((tp, base.cpus_per_rank), extrapolate_tp(base, tp))
    out = [s for s in shapes.values() if s.devices <= budget]
    if not out:
        raise ValueError(f"no instance shape fits in {budget:g} devices (the smallest needs "
                         f"{min(s.devices for s in shapes.values()):g}); raise --cpus")
    return sorted(out, key=lambda s: (s.tp, s.cpus_per_rank))


def _rank_key(target_rate: float | None) -> Callable[[Plan], tuple]:
    if target_rate is None:
        return lambda p: (-round(p.rate, 9), p.devices)
    return lambda p: ((False, p.devices, -p.rate) if p.rate >= target_rate
                      else (True, -p.rate, p.devices))


@dataclass
class Planner:
    workload: Workload
    slo: SLO
    budget: float  # devices (CPUs)
    shapes: list[LatencyModel]
    transfer: TransferModel = field(default_factory=TransferModel)
    modes: tuple[str, ...] = MODES
    requests: int = 400
    seed: int = 0
    verify: int = 4  # joint simulations per mode
    target_rate: float | None = None
    base: AppConfig = field(default_factory=AppConfig)  # batch limits of each pool
    progress: Callable[[str], None] = lambda _msg: None

    def __post_init__(self) -> None:
        bad = set(self.modes) - set(MODES)
        if bad or not self.modes:
            raise ValueError(f"modes {sorted(bad)}: choose from {', '.join(MODES)}")
        self.search = GoodputSearch(self.workload, self.slo, self.transfer, self.requests,
                                    self.seed)

    def phase_rates(self) -> dict[str, dict[LatencyModel, float]]:
        """Step 1: one instance per shape and phase."""
        b, out = self.base, {m: {} for m in ("prefill", "decode", "colocated")}
        for s in self.shapes:
            name = f"tp{s.tp}@{s.cpus_per_rank:g}cpu"
            if "disaggregated" in self.modes:
                out["prefill"][s] = self.search.prefill_rate(pool_spec(s, b.prefill))
                out["decode"][s] = self.search.decode_rate(pool_spec(s, b.decode))
                self.progress(f"{name}: one prefill instance {out['prefill'][s]:.3g} req/s "
                              f"(TTFT), one decode instance {out['decode'][s]:.3g} req/s (TPOT)")
            if "colocated" in self.modes:
                out["colocated"][s] = self.search.colocated_rate(pool_spec(s, b.colocated))
                self.progress(f"{name}: one colocated instance {out['colocated'][s]:.3g} req/s")
        return out

    def estimates(self, rates: dict[str, dict[LatencyModel, float]]) -> list[Plan]:
        """Step 2: every pool combination within the budget, rated by the per-phase rates."""
        plans = []
        for sp, rp in rates["prefill"].items():
            for sd, rd in rates["decode"].items():
                for n_p in range(1, int(self.budget // sp.devices) + 1):
                    left = self.budget - n_p * sp.devices
                    for n_d in range(1, int(left // sd.devices + 1e-9) + 1):
                        est = min(n_p * rp, n_d * rd)
                        if est > 0:
                            plans.append(Plan("disaggregated", {"prefill": PoolPlan(sp, n_p),
                                                                "decode": PoolPlan(sd, n_d)}, est))
        for s, r in rates["colocated"].items():
            for n in range(1, int(self.budget // s.devices) + 1):
                if r > 0:
                    plans.append(Plan("colocated", {"colocated": PoolPlan(s, n)}, n * r))
        return sorted(plans, key=_rank_key(self.target_rate))

    def to_verify(self, est: list[Plan]) -> list[Plan]:
        """Per mode: the ``verify`` best estimates among plans no other plan beats with as few
        devices, plus the best estimate of every shape combination (a one-instance rate
        undervalues pooled replicas, so a shape that looks worse may simulate better)."""
        key = _rank_key(self.target_rate)
        chosen: dict[str, Plan] = {}
        for mode in self.modes:
            mine = [p for p in est if p.mode == mode]
            for p in sorted(pareto(mine), key=key)[: self.verify]:
                chosen.setdefault(p.describe(), p)
            seen: set[tuple] = set()
            for p in mine:  # already best first
                shapes = tuple((k, v.shape.tp, v.shape.cpus_per_rank) for k, v in p.pools.items())
                if shapes not in seen:
                    seen.add(shapes)
                    chosen.setdefault(p.describe(), p)
        return sorted(chosen.values(), key=key)

    def joint(self, plan: Plan) -> Plan:
        """Step 3: the whole deployment against both SLOs."""
        b = self.base
        if plan.mode == "colocated":
            c = plan.pools["colocated"]
            g = self.search.colocated_rate(pool_spec(c.shape, b.colocated, c.replicas))
        else:
            p, d = plan.pools["prefill"], plan.pools["decode"]
            g = self.search.disaggregated_rate(pool_spec(p.shape, b.prefill, p.replicas),
                                               pool_spec(d.shape, b.decode, d.replicas))
        return Plan(plan.mode, plan.pools, plan.estimate, g)

    def run(self) -> list[Plan]:
        """Verified plans, best first. Raises ``ValueError`` when no shape meets the SLOs."""
        est = self.estimates(self.phase_rates())
        if not est:
            raise ValueError(f"no configuration meets TTFT <= {self.slo.ttft_s:g} s and TPOT <= "
                             f"{self.slo.tpot_s:g} s for 90% of {self.workload.name!r} requests, "
                             "even at a tiny rate: relax the SLOs or profile a faster shape")
        chosen = self.to_verify(est)
        out = []
        for i, p in enumerate(chosen):
            out.append(self.joint(p))
            self.progress(f"[{i + 1}/{len(chosen)}] {p.mode} {p.describe()}: estimate "
                          f"{p.estimate:.3g}, simulated {out[-1].goodput:.3g} req/s")
        return sorted(out, key=_rank_key(self.target_rate))


def pareto(plans: list[Plan]) -> list[Plan]:
    """Per mode, the plans whose estimate beats every plan of that mode using fewer devices
    (e.g. more decode replicas than the prefill pool can feed add devices, not goodput)."""
    out = []
    for mode in MODES:
        best = 0.0
        for p in sorted((p for p in plans if p.mode == mode), key=lambda p: (p.devices, -p.estimate)):
            if p.estimate > best * (1 + 1e-9):
                out.append(p)
                best = p.estimate
    return out


def valid_shapes(shapes: list[LatencyModel], num_heads: int, num_kv_heads: int) -> list[LatencyModel]:
    """Drop TP degrees the model's heads cannot be split over (``AppConfig.check_model``)."""
    from .config import valid_tp_degrees

    ok = set(valid_tp_degrees(num_heads, num_kv_heads, limit=max(s.tp for s in shapes)))
    return [s for s in shapes if s.tp in ok]


def fmt_rate(r: float) -> str:
    return "0" if r == 0 else f"{r:.3g}" if math.isfinite(r) else "inf"
