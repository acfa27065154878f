"""Tensor parallelism: TP=1 vs TP=2 step latency on SmolLM2-135M, one torch thread per rank.

    python benchmarks/tp.py [--model PATH] [--quick]

Measured through the engine API (``Engine.step``: schedule, per-rank forward, all-reduces,
logit gather, sampling). All configurations are alive at once and measured round-robin, a few
steps each per round, so load from other jobs on a shared machine hits them alike; the result
records how much CPU other jobs used meanwhile (``other_jobs_cpu_fraction``).

- decode step latency at batch 1 and 16 (every request past its prompt of ``--context`` tokens)
- prefill latency of one 512-token prompt, and of 16 prompts of ``--b16-prompt`` tokens in one
  packed step (fresh random prompts each repetition)
- for TP=2, the design alternatives: gloo all-reduces instead of the shared-memory ones, step
  messages over Ray actor calls instead of the gloo broadcast, and a replicated LM head
  instead of the vocab-parallel one
- the latency of one 2-rank all-reduce of a decode-sized tensor, gloo vs shared memory

Ratios are ``tp1_latency / tp2_latency`` (> 1: TP=2 is faster). Last stdout line: one JSON
object with ``tp2_vs_tp1_decode_b16`` and ``tp2_vs_tp1_prefill_512`` and the raw figures;
also written to benchmarks/results/tp.json (for the default model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import time
from pathlib import Path

import psutil
import torch
from common import machine, progress, write_result
from pdserve.workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.workers.engine import Engine
from pdserve.workers.parallel import ParallelConfig
from pdserve.workers.request import SamplingParams
from pdserve.workers.tp_engine import make_engine

DEFAULT_MODEL = Path.home() / ".cache/pdserve/models/SmolLM2-135M-Instruct"


def prompts(n: int, length: int, vocab: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


class Decoding:
    """``batch`` requests of ``context`` prompt tokens, prefilled, kept decoding while timed."""

    def __init__(self, e: Engine, batch: int, context: int, max_steps: int, rng) -> None:
        self.e = e
        sp = SamplingParams(max_tokens=max_steps + 4, temperature=0, ignore_eos=True)
        vocab = e.config.model.vocab_size
        self.reqs = [e.add_request(p, sp) for p in prompts(batch, context, vocab, rng)]
        while any(not r.output_ids for r in self.reqs):
            e.step()

    def time_steps(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.e.step()
            times.append(time.perf_counter() - t0)
        return times

    def finish(self) -> None:
        for r in self.reqs:
            self.e.abort(r.request_id)


def prefill_once(e: Engine, batch: int, length: int, rng) -> float:
    """Seconds of the one step that prefills ``batch`` fresh prompts of ``length``."""
    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    reqs = [e.add_request(p, sp) for p in prompts(batch, length, e.config.model.vocab_size, rng)]
    t0 = time.perf_counter()
    e.step()
    dt = time.perf_counter() - t0
    assert all(r.output_ids for r in reqs), "the prefill did not fit one step"
    while e.has_work:
        e.step()
    return dt


def label(p: ParallelConfig) -> str:
    if p.tp == 1:
        return "tp=1"
    coll = "shm" if p.shm_bytes else "gloo"
    head = "vocab-parallel" if p.vocab_parallel else "rank-0"
    return f"tp={p.tp} messages={p.transport} collectives={coll} lm_head={head}"


class ForeignCpu:
    """CPU seconds the rest of the machine used meanwhile (busy time of all CPUs minus this
    benchmark's processes): how much other jobs disturbed the figures."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.start = self._split()

    def _split(self) -> tuple[float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0)
        ours = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                c = p.cpu_times()
                ours += c.user + c.system
        return busy, ours

    def seconds(self) -> float:
        busy, ours = self._split()
        return max(0.0, (busy - self.start[0]) - (ours - self.start[1]))


def all_reduce_us(hidden: int, rows: int, shm_bytes: int, n: int = 300) -> float:
    """Median microseconds of one 2-rank all-reduce of ``[rows, hidden]`` fp32 (what every
    layer does twice), rank 1 in a Ray actor as in the engine; ``shm_bytes=0``: gloo."""
    import ray
    from pdserve.workers.parallel import TPGroup, listen_loopback

    @ray.remote(num_cpus=1)
    class Peer:
        def __init__(self, port: int) -> None:
            torch.set_num_threads(1)
            self.g = TPGroup(1, 2, port, shm_bytes=shm_bytes)

        def loop(self, rows: int, n: int) -> None:
            t = torch.ones(rows, hidden)
            for _ in range(n):
                self.g.all_reduce(t)

    listen = listen_loopback()
    peer = Peer.remote(listen.getsockname()[1])
    g = TPGroup(0, 2, listen.getsockname()[1], listen=listen, shm_bytes=shm_bytes)
    done = peer.loop.remote(rows, n)
    t, times = torch.ones(rows, hidden), []
    for _ in range(n):
        t0 = time.perf_counter()
        g.all_reduce(t)
        times.append(time.perf_counter() - t0)
    ray.get(done)
    ray.kill(peer)
    g.close()
    return 1e6 * statistics.median(times[10:])


def run_interleaved(engines: dict[str, Engine], args) -> dict[str, dict[str, float]]:
    """Every figure is measured round-robin over the engines (a few steps each per round), so a
    burst of load from other jobs hits every configuration alike instead of one of them."""
    rng = random.Random(0)
    res: dict[str, dict[str, float]] = {name: {} for name in engines}
    for e in engines.values():
        prefill_once(e, 1, 32, rng)  # warm up
    per_round = max(1, args.steps // args.rounds)
    for b in (1, 16):
        states = {
            n: Decoding(e, b, args.context, per_round * args.rounds, rng)
            for n, e in engines.items()
        }
        times: dict[str, list[float]] = {n: [] for n in engines}
        for _ in range(args.rounds):
            for n, st in states.items():
                times[n] += st.time_steps(per_round)
        for n, st in states.items():
            st.finish()
            res[n][f"decode_b{b}_ms"] = 1e3 * statistics.median(times[n])
        figures = {n: round(r[f"decode_b{b}_ms"], 1) for n, r in res.items()}
        progress(f"decode b{b} ms/step: {figures}")
    shapes = [("prefill_512_ms", 1, args.prompt)]
    if not args.quick:
        shapes.append(("prefill_b16_ms", 16, args.b16_prompt))
    for key, b, length in shapes:
        times = {n: [] for n in engines}
        for _ in range(args.reps):
            for n, e in engines.items():
                times[n].append(prefill_once(e, b, length, rng))
        for n in engines:
            res[n][key] = 1e3 * statistics.median(times[n])
        progress(f"{key}: " + str({n: round(r[key]) for n, r in res.items()}))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--context", type=int, default=128, help="prompt tokens before decoding")
    ap.add_argument("--prompt", type=int, default=512, help="prefill length at batch 1")
    ap.add_argument("--b16-prompt", type=int, default=64, help="prefill length per prompt at b16")
    ap.add_argument("--steps", type=int, default=24, help="decode steps timed per engine")
    ap.add_argument("--rounds", type=int, default=6, help="round-robin rounds over the engines")
    ap.add_argument("--reps", type=int, default=3, help="prefill repetitions")
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="skip the b16 prefill and alternatives")
    args = ap.parse_args()
    if not (args.model / "config.json").exists():
        raise SystemExit(
            f"{args.model} is not a model folder: pass --model PATH (make setup "
            "fetches SmolLM2 to the default path)"
        )
    torch.set_num_threads(1)
    from pdserve.cluster.launcher import loopback_ray_env

    loopback_ray_env()  # keep the local Ray on 127.0.0.1 (before ray is imported)
    import ray

    # logical CPUs for every engine's bundles: the engines are alive together but only one
    # steps at a time (idle ranks block, they do not spin)
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False, configure_logging=False)
    load = os.getloadavg()[0]
    progress(f"model {args.model.name}, load average {load:.2f} on {os.cpu_count()} cpus")
    runs = {"tp1": ParallelConfig(tp=1), "tp2": ParallelConfig(tp=2)}
    if not args.quick:
        runs["tp2_gloo_collectives"] = ParallelConfig(tp=2, shm_bytes=0)
        runs["tp2_ray_transport"] = ParallelConfig(tp=2, transport="ray")
        runs["tp2_replicated_lm_head"] = ParallelConfig(tp=2, vocab_parallel=False)
    cfg = EngineConfig(
        ModelConfig.from_path(args.model),
        CacheConfig(num_blocks=args.blocks),
        SchedulerConfig(
            max_num_batched_tokens=max(args.prompt, 16 * args.b16_prompt, 2048), max_num_seqs=64
        ),
        num_threads=1,
    )
    engines: dict[str, Engine] = {}
    try:
        for name, p in runs.items():
            t0 = time.perf_counter()
            engines[name] = make_engine(cfg, p)
            progress(f"{name} ({label(p)}): ready in {time.perf_counter() - t0:.1f}s")
        pids = [os.getpid()] + [pid for e in engines.values() for pid in getattr(e, "pids", [])]
        foreign = ForeignCpu(pids)
        t0 = time.perf_counter()
        res = run_interleaved(engines, args)
        wall, other = time.perf_counter() - t0, foreign.seconds()
    finally:
        for e in engines.values():
            if hasattr(e, "close"):
                e.close()
    progress(f"other jobs used {other:.0f} CPU-s of the {2 * wall:.0f} available meanwhile")
    hidden = ModelConfig.from_path(args.model).hidden_size
    comm = {
        f"all_reduce_{kind}_b{b}_us": round(all_reduce_us(hidden, b, shm), 1)
        for kind, shm in (("gloo", 0), ("shm", 4 << 20))
        for b in (1, 16)
    }
    progress(f"2-rank all-reduce of [b, {hidden}] fp32: {comm}")
    ray.shutdown()
    t1, t2 = res["tp1"], res["tp2"]
    summary = {
        "tp2_vs_tp1_decode_b16": round(t1["decode_b16_ms"] / t2["decode_b16_ms"], 3),
        "tp2_vs_tp1_prefill_512": round(t1["prefill_512_ms"] / t2["prefill_512_ms"], 3),
        "tp2_vs_tp1_decode_b1": round(t1["decode_b1_ms"] / t2["decode_b1_ms"], 3),
    }
    if "prefill_b16_ms" in t2:
        summary["tp2_vs_tp1_prefill_b16"] = round(t1["prefill_b16_ms"] / t2["prefill_b16_ms"], 3)
    result = {
        **summary,
        "ms": {k: {m: round(v, 2) for m, v in r.items()} for k, r in res.items()},
        **comm,
        "all_reduces_per_step": 2 * ModelConfig.from_path(args.model).num_layers,
        "model": args.model.name,
        "context": args.context,
        "prompt": args.prompt,
        "b16_prompt": args.b16_prompt,
        "threads_per_rank": 1,
        "load_average_at_start": round(load, 2),
        "other_jobs_cpu_fraction": round(other / (wall * (os.cpu_count() or 1)), 3),
        "configs": {n: label(p) for n, p in runs.items()},
        "machine": machine(),
    }
    if args.model.resolve() == DEFAULT_MODEL.resolve():  # other models: stdout only
        write_result("tp", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
