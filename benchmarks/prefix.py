"""Prefix-cache benchmark: TTFT with shared prefixes vs the cache disabled, and the cache hit
rate of prefix-aware vs round-robin routing over two prefill instances.

    python benchmarks/prefix.py --quick

Part 1 (one engine, bf16, one thread): 1,024-token prompts whose first 0%, 50% or 90% is a
prefix shared with an earlier request; TTFT = time until the first token, cache on vs off.
Part 2 (two prefill engines in one process): a stream of multi-turn conversations (each turn
extends its conversation's history) routed by ``PrefixAware`` and by ``RoundRobin`` — the
production policy objects — fed with each engine's real cached-block index (what Redis holds
in a cluster); hit rate = prompt tokens served from cache / prompt tokens.
RAG chunk reuse (CacheBlend) is not implemented: its fields are null.
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from common import machine, progress, write_result

from pdserve.router.policy import Candidate, PrefixAware, RoundRobin, RoutingHint
from pdserve.workers.block_manager import prefix_hashes
from pdserve.workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.workers.engine import Engine
from pdserve.workers.model_store import ensure_default_model
from pdserve.workers.request import SamplingParams

SP = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def engine(mc: ModelConfig, caching: bool, role: str = "colocated") -> Engine:
    return Engine(EngineConfig(mc, CacheConfig(num_blocks=2048, prefix_caching=caching),
                               SchedulerConfig(role=role, max_num_batched_tokens=8192)))


def ttft(e: Engine, ids: list[int]) -> float:
    t0 = time.perf_counter()
    r = e.add_request(ids, SP)
    while not r.output_ids:
        e.step()
    dt = time.perf_counter() - t0
    if r.request_id in e.requests:
        e.release(r.request_id)
    return dt


def ttft_part(mc: ModelConfig, rng: random.Random, n: int, reps: int) -> dict:
    out = {}
    for share in (0.0, 0.5, 0.9):
        res = {}
        for caching in (False, True):
            e = engine(mc, caching)
            times = []
            for _ in range(reps):
                base = [rng.randrange(100, mc.vocab_size) for _ in range(n)]
                k = int(n * share)
                ttft(e, base)  # the earlier request that leaves its prefix behind
                times.append(ttft(e, base[:k] + [rng.randrange(100, mc.vocab_size)
                                                 for _ in range(n - k)]))
            res["cache_on" if caching else "cache_off"] = statistics.median(times)
        res["speedup"] = res["cache_off"] / res["cache_on"]
        out[f"{int(share * 100)}pct"] = res
        progress(f"TTFT {int(share*100)}% shared: off {res['cache_off']*1e3:.0f} ms, "
                 f"on {res['cache_on']*1e3:.0f} ms ({res['speedup']:.2f}x)")
    return out


def routing_part(mc: ModelConfig, rng: random.Random, convs: int, turns: int) -> dict:
    out = {}
    for name, policy in (("prefix_aware", PrefixAware()), ("round_robin", RoundRobin())):
        es = {f"P{i}": engine(mc, True, "prefill") for i in range(2)}
        root = es["P0"].blocks.root
        hist = {c: [rng.randrange(100, mc.vocab_size) for _ in range(200)] for c in range(convs)}
        asked = hit = 0
        order = list(range(convs))
        for _t in range(turns):
            random.Random(_t).shuffle(order)  # conversations come back in any order
            for c in order:
                hist[c] = hist[c] + [rng.randrange(100, mc.vocab_size) for _ in range(40)]
                ids = hist[c]
                hs = prefix_hashes(root, ids[:-1], 16)
                cached = {}
                for iid, e in es.items():  # what the Redis index would answer
                    have = set(e.blocks.cached_hashes())
                    k = next((i for i, h in enumerate(hs) if h not in have), len(hs))
                    cached[iid] = k * 16
                cands = [Candidate(i, {"queued_prefill_tokens": 0}, 0) for i in es]
                best = policy.rank("prefill", cands, RoutingHint(len(ids), cached))[0]
                e = es[best.instance_id]
                before = e.blocks.hits
                ttft(e, ids)
                hit += e.blocks.hits - before
                asked += len(ids)
        out[name] = hit / asked
        progress(f"routing {name}: hit rate {out[name]:.2f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    mc = ModelConfig.from_path(ensure_default_model(progress), "bfloat16")
    rng = random.Random(0)
    tt = ttft_part(mc, rng, 1024, 2 if args.quick else 5)
    rt = routing_part(mc, rng, 5 if args.quick else 9, 3 if args.quick else 5)
    res = {"machine": machine(), "ttft": tt, "routing_hit_rate": rt,
           "ttft_speedup_90pct_shared": tt["90pct"]["speedup"],
           "ttft_speedup_50pct_shared": tt["50pct"]["speedup"],
           "routing_hit_rate_prefix_aware": rt["prefix_aware"],
           "routing_hit_rate_round_robin": rt["round_robin"],
           "chunk_ttft_speedup": None, "chunk_kl": None}
    write_result("prefix", res)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()
                      if k not in ("machine", "ttft", "routing_hit_rate")}))


if __name__ == "__main__":
    main()
