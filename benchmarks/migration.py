"""Live-migration benchmark: pause and total migration time vs context length, and the TPOT a
client sees around the switch.

    python benchmarks/migration.py --quick

A real Serve app on SmolLM2 (bf16, one torch thread per replica): 1 prefill + 2 decode
replicas, automatic migration off. For each context length, one streamed request (greedy,
64 new tokens) is moved mid-stream from its decode replica to the other by a targeted
``migrate`` call (what the router's controller and ``/admin/drain`` do). The source reports
how long the request was paused (detach → the destination took it: the last blocks' transfer
and two control calls) and the whole migration (stages included); the client's token
timestamps give the TPOT before the switch and the largest gap across it. A pause is measured
in decode steps as pause / median TPOT before the switch.

Last stdout line: one JSON object with ``pause_ms_by_context`` and
``pause_in_decode_steps_max`` (goal <= 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

from common import machine, progress, write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


async def one(url: str, decode, store_ids, ctx: int, vocab: int, new: int, at: int) -> dict:
    rnd = random.Random(ctx)
    prompt = [rnd.randrange(100, vocab - 100) for _ in range(ctx)]
    import httpx

    times: list[float] = []
    moved: dict = {}

    async def mover():
        while len(times) < at:
            await asyncio.sleep(0.005)
        stats = {i: await decode.stats.remote(target=i) for i in store_ids}
        src = max(stats, key=lambda i: stats[i].running)
        dst = next(i for i in stats if i != src)
        moved["t"] = time.time()
        moved["rec"] = await decode.migrate.remote(None, dst, "benchmark", target=src)

    async with httpx.AsyncClient(timeout=600) as c:
        task = asyncio.create_task(mover())
        async with c.stream("POST", f"{url}/v1/completions",
                            json={"prompt": prompt, "max_tokens": new, "temperature": 0,
                                  "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    d = json.loads(line[6:])
                    if d.get("choices") and d["choices"][0].get("text") is not None:
                        times.append(time.time())  # wall clock: comparable with the replica's
        await task
    rec = moved["rec"]
    gaps = [b - a for a, b in zip(times[1:], times[2:])]  # skip TTFT → 2nd token
    before = gaps[: at - 2]
    t_start, t_done = moved["t"], rec["t"]  # migrate call issued; hand-over done (replica)
    tpot = statistics.median(before)
    # the client's inter-token gap across the hand-over (pause + the router switching streams)
    switch = next((b - a for a, b in zip(times, times[1:]) if b >= t_done), None)
    during = [b - a for a, b in zip(times, times[1:]) if t_start <= a and b <= t_done]
    after = [b - a for a, b in zip(times, times[1:]) if a > t_done]
    return {"context": ctx, "pause_ms": rec["pause_s"] * 1e3, "total_ms": rec["total_s"] * 1e3,
            "pause_send_ms": rec["pause_send_s"] * 1e3,
            "stages": rec["stages"], "bytes": rec["bytes"], "tpot_ms": tpot * 1e3,
            "tpot_during_stages_ms": statistics.mean(during) * 1e3 if during else None,
            "tpot_after_ms": statistics.median(after) * 1e3 if after else None,
            "client_gap_at_switch_ms": switch * 1e3 if switch else None,
            "pause_in_decode_steps": rec["pause_s"] / tpot}


async def run(contexts: list[int], new: int) -> list[dict]:
    from pdserve.cluster.launcher import free_port, loopback_ray_env

    loopback_ray_env()
    import ray
    from ray import serve
    from serve_helpers import deploy

    from pdserve.workers.config import ModelConfig
    from pdserve.workers.model_store import resolve_model

    model = resolve_model(None)
    vocab = ModelConfig.from_path(model).vocab_size
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    blocks = (max(contexts) + new) // 16 + 64
    progress(f"deploying SmolLM2: 1 prefill + 2 decode replicas ({blocks} KV blocks each)")
    deploy("migbench", model, dtype="bfloat16", migration={"enabled": False},
           prefill={"cpus": 1, "num_blocks": blocks, "max_num_batched_tokens": 8192},
           decode={"replicas": 2, "cpus": 1, "num_blocks": blocks})
    url = f"http://127.0.0.1:{port}/migbench"
    decode = serve.get_deployment_handle("decode", app_name="migbench")
    ids: set[str] = set()
    deadline = time.monotonic() + 120
    while len(ids) < 2 and time.monotonic() < deadline:
        ids.add((await decode.stats.remote()).instance_id)
    out = []
    try:
        await one(url, decode, sorted(ids), 64, vocab, 24, 8)  # warm-up (channels, allocations)
        for ctx in contexts:
            r = await one(url, decode, sorted(ids), ctx, vocab, new, 16)
            progress(f"context {ctx}: pause {r['pause_ms']:.1f} ms (last blocks sent after "
                     f"{r['pause_send_ms']:.1f} ms) "
                     f"({r['pause_in_decode_steps']:.2f} decode steps), total "
                     f"{r['total_ms']:.0f} ms in {r['stages']} stages; TPOT before "
                     f"{r['tpot_ms']:.1f} ms, during the stages {r['tpot_during_stages_ms'] or 0:.1f}"
                     f" ms, after {r['tpot_after_ms'] or 0:.1f} ms; client gap at the switch "
                     f"{r['client_gap_at_switch_ms'] or 0:.1f} ms")
            out.append(r)
    finally:
        serve.delete("migbench")
        serve.shutdown()
        ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 context lengths instead of 5")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    contexts = [256, 1024, 4096] if args.quick else [256, 512, 1024, 2048, 4096]
    rows = asyncio.run(run(contexts, args.new_tokens))
    result = {
        "benchmark": "migration", "machine": machine(), "rows": rows,
        "pause_ms_by_context": {str(r["context"]): round(r["pause_ms"], 2) for r in rows},
        "total_ms_by_context": {str(r["context"]): round(r["total_ms"], 1) for r in rows},
        "tpot_ms_by_context": {str(r["context"]): round(r["tpot_ms"], 2) for r in rows},
        "client_gap_at_switch_ms_by_context": {
            str(r["context"]): round(r["client_gap_at_switch_ms"] or 0, 1) for r in rows},
        "pause_in_decode_steps_max": round(max(r["pause_in_decode_steps"] for r in rows), 3),
    }
    write_result("migration", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "machine")}))


if __name__ == "__main__":
    main()
