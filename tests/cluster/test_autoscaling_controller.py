"""The scaling controller against a fake Serve (no Ray): it scales out on high KV use, drains
the replica Serve will stop before a scale-in, takes a drained replica back when Serve stopped
another one, records operator actions, and only measures while autoscaling is off."""

from __future__ import annotations

import asyncio
import itertools

from pdserve.cluster.scaling import ScalingController
from pdserve.cluster.serve_pools import PoolInfo, ReplicaInfo
from pdserve.workers.messages import InstanceStats

POLICY = {"kv_high": 0.5, "kv_target": 0.3, "smoothing_s": 0.01, "out_after_s": 0.0,
          "in_after_s": 0.0, "out_cooldown_s": 0.0, "in_cooldown_s": 0.0, "warmup_s": 0.0}


class Call:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *a, **kw):
        async def run():
            return self.fn(*a, **kw)
        return run()


class FakeServe:
    """Pools of replicas; ``set_target`` starts replicas at once or stops ``stop_rule``'s."""

    def __init__(self, pools: dict[str, int], blocks: int = 100) -> None:
        self.ids = itertools.count()
        self.t = itertools.count(1000)
        self.reps: dict[str, list[ReplicaInfo]] = {p: [] for p in pools}
        self.used: dict[str, int] = {}  # replica -> KV blocks in use
        self.draining: set[str] = set()
        self.blocks = blocks
        self.stop_rule = "newest"
        self.pools = list(pools)
        for p, n in pools.items():
            for _ in range(n):
                self._start(p)
        self.handles = {p: self._handle(p) for p in pools}
        self.targets = dict(pools)
        self.drained: list[str] = []
        self.undrained: list[str] = []

    def _start(self, pool: str) -> None:
        rid = f"{pool[0]}{next(self.ids)}"
        self.reps[pool].append(ReplicaInfo(rid, "RUNNING", float(next(self.t))))
        self.used[rid] = 0

    def _handle(self, pool: str):
        serve = self

        class H:
            stats = Call(lambda target: InstanceStats(
                target, pool, 1 if serve.used[target] else 0, 0, serve.blocks - serve.used[target],
                serve.blocks, 0, draining=target in serve.draining))
            transfers = Call(lambda target: [])
            drain = Call(lambda target: (serve.drained.append(target),
                                         serve.draining.add(target), 3)[-1])
            undrain = Call(lambda target: (serve.undrained.append(target),
                                           serve.draining.discard(target))[-1])
        return H()

    # the ServePools interface
    async def info(self, pool: str) -> PoolInfo:
        return PoolInfo(pool, self.targets[pool], tuple(self.reps[pool]))

    async def all(self) -> dict[str, PoolInfo]:
        return {p: await self.info(p) for p in self.pools}

    async def set_target(self, pool: str, n: int) -> None:
        self.targets[pool] = n
        while len(self.reps[pool]) < n:
            self._start(pool)
        while len(self.reps[pool]) > n:
            reps = sorted(self.reps[pool], key=lambda r: r.start_time_s)
            self.reps[pool].remove(reps[-1] if self.stop_rule == "newest" else reps[0])


def controller(serve: FakeServe, enabled: bool = True, decisions: list | None = None):
    cfg = {"autoscaling": {"enabled": enabled, "interval_s": 1.0, "drain_timeout_s": 0.2,
                           "decode": {"min_replicas": 1, "max_replicas": 3},
                           "prefill": {"min_replicas": 1, "max_replicas": 1}, "policy": POLICY},
           "slo": {"ttft_s": 1.0, "tpot_s": 0.1},
           "prefill": {"tp": 1}, "decode": {"tp": 1}}
    clock = itertools.count(0.0, 1.0)
    return ScalingController(serve, serve.handles, cfg,
                             on_decision=(decisions.append if decisions is not None else None),
                             clock=lambda: next(clock))


async def test_scales_out_when_kv_use_is_high():
    serve = FakeServe({"prefill": 1, "decode": 1})
    seen: list[dict] = []
    c = controller(serve, decisions=seen)
    serve.used["d1"] = 90
    await c.tick()
    await c.tick()
    # ceil(1 replica x KV use 0.9 / kv_target 0.3) = 3, then steady at 90/300 blocks
    assert serve.targets["decode"] == 3 and len(serve.reps["decode"]) == 3
    assert serve.targets["prefill"] == 1 and len(c.decisions) == 1
    d = c.decisions[-1]
    assert d["action"] == "out" and d["applied"] and "KV use" in d["reason"]
    assert any(r["action"] == "out" for r in seen)  # exported (metrics)
    assert c.snapshot["decode"]["replicas"][0]["kv_blocks_used"] == 90


async def test_scale_in_drains_the_replica_serve_stops():
    serve = FakeServe({"prefill": 1, "decode": 3})
    c = controller(serve)
    order = [r.replica_id for r in sorted(serve.reps["decode"], key=lambda r: r.start_time_s)]
    await c.tick()
    assert serve.drained == [order[-1]]  # the newest: the one Serve stops on one node
    assert serve.targets["decode"] == 2
    assert order[-1] not in {r.replica_id for r in serve.reps["decode"]}
    d = c.decisions[-1]
    assert d["action"] == "in" and d["drained"] == {"instance_id": order[-1], "requests": 3}
    await c.tick()  # one replica per decision (no cooldown here): the next newest
    assert serve.drained == order[:0:-1] and serve.targets["decode"] == 1
    await c.tick()
    assert serve.targets["decode"] == 1 and c._drained == {}  # min_replicas


async def test_a_drained_replica_serve_kept_serves_again():
    serve = FakeServe({"prefill": 1, "decode": 2})
    serve.stop_rule = "oldest"  # e.g. multi-node: Serve stops another replica
    c = controller(serve)
    await c.tick()
    drained = serve.drained[0]
    assert drained in {r.replica_id for r in serve.reps["decode"]}
    await c.tick()
    assert serve.undrained == [drained] and drained not in serve.draining


async def test_operator_scaling_is_recorded_and_autoscaling_off_only_measures():
    serve = FakeServe({"prefill": 1, "decode": 1})
    c = controller(serve, enabled=False)
    serve.used["d1"] = 99
    for _ in range(3):
        await c.tick()
    assert serve.targets["decode"] == 1 and not c.decisions and not c.last
    assert c.snapshot["decode"]["replicas"][0]["kv_blocks_used"] == 99
    rec = await c.scale("decode", 3)
    assert serve.targets["decode"] == 3 and rec["source"] == "operator"
    await c.scale("decode", 1)  # one at a time, each drained first
    assert serve.targets["decode"] == 1 and len(serve.drained) == 2
    assert [d["target"] for d in c.decisions] == [3, 2, 1]
    c.set_limits("decode", 2, 2)
    c.enabled = True
    await c.tick()
    await c.tick()
    assert serve.targets["decode"] == 2  # brought within [min, max]


async def test_a_drain_that_hangs_does_not_block_the_scale_in():
    serve = FakeServe({"prefill": 1, "decode": 2})

    async def hang(target):
        await asyncio.sleep(60)

    serve.handles["decode"].drain = type("C", (), {"remote": staticmethod(
        lambda target: hang(target))})()
    c = controller(serve)
    await asyncio.wait_for(c.tick(), 5)
    d = c.decisions[-1]
    assert d["action"] == "in" and d["applied"] and serve.targets["decode"] == 1
    assert "TimeoutError" in d["drained"]["error"]


async def test_a_failed_scale_in_puts_the_drained_replica_back():
    serve = FakeServe({"prefill": 1, "decode": 2})

    async def refuse(pool, n):
        raise RuntimeError("Serve said no")

    serve.set_target = refuse
    c = controller(serve)
    await c.tick()
    d = c.decisions[-1]
    assert d["action"] == "in" and d["applied"] is False and "Serve said no" in d["error"]
    assert serve.drained and serve.undrained == serve.drained and not serve.draining
