"""Fault tolerance over HTTP: a decode replica killed mid-stream, a prefill replica killed
with requests queued, a drained decode replica, and many clients disconnecting."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
from pdserve.cluster.launcher import RedisServer
from pdserve.cluster.metadata import MetadataStore
from pdserve.workers.llm import LLM
from pdserve.workers.request import SamplingParams
from serve_helpers import deploy, wait_until
from serve_helpers import stream_completion as stream

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

N = 40


@pytest.fixture(scope="module")
def ft(serve_http, cluster_model):
    redis = RedisServer().start()
    deploy("ft", cluster_model, redis_url=redis.url, router={"retries": 3},
           prefill={"replicas": 2, "num_blocks": 512}, decode={"replicas": 2, "num_blocks": 512})
    store = MetadataStore(redis.url)
    deadline = time.monotonic() + 60
    while (len(store.live_instances("decode")) < 2 or len(store.live_instances("prefill")) < 2) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    yield f"{serve_http}/ft", store
    from ray import serve

    serve.delete("ft")
    redis.stop()


@pytest.fixture(scope="module")
def ref(cluster_model):
    llm = LLM(str(cluster_model), num_blocks=1024)

    def run(prompts, n=N):
        sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return [c.text for c in llm.generate(prompts, sp)]

    return run


def prompts(k: int, seed: int = 0) -> list[list[int]]:
    return [[(seed * 17 + 7 * i + j) % 300 + 3 for j in range(6 + 5 * i)] for i in range(k)]


async def instance_stats(role: str, store: MetadataStore):
    from ray import serve

    h = serve.get_deployment_handle(role, app_name="ft")
    out = {}
    for i in store.live_instances(role):
        try:
            out[i] = await h.stats.remote(target=i)
        except Exception:  # noqa: BLE001 - a replica that just died
            pass
    return out


async def test_decode_replica_killed_mid_stream(ft, ref):
    url, store = ft
    ps = prompts(8)
    seen = {"n": 0}

    def tick():
        seen["n"] += 1

    async with httpx.AsyncClient(timeout=300) as c:
        tasks = [asyncio.create_task(stream(c, url, p, n=300, on_token=tick)) for p in ps]
        await wait_until(lambda: asyncio.sleep(0, seen["n"] >= 8 * 5))
        stats = await instance_stats("decode", store)
        victim = max(stats.values(), key=lambda s: s.running)
        assert victim.running > 0
        os.kill(victim.pid, signal.SIGKILL)  # the replica's process, for real
        got = await asyncio.wait_for(asyncio.gather(*tasks), 240)
    assert got == ref(ps, 300)


async def test_prefill_replica_killed_with_requests_queued(ft, ref):
    url, store = ft
    ps = prompts(8, seed=1)
    async with httpx.AsyncClient(timeout=300) as c:
        tasks = [asyncio.create_task(stream(c, url, p, n=8)) for p in ps]
        await asyncio.sleep(0.05)
        stats = await instance_stats("prefill", store)
        victim = max(stats.values(), key=lambda s: s.waiting + s.running)
        os.kill(victim.pid, signal.SIGKILL)
        got = await asyncio.wait_for(asyncio.gather(*tasks), 240)
    assert got == ref(ps, 8)


async def test_drain_moves_requests_and_empties_the_instance(ft, ref):
    from ray import serve

    url, store = ft
    await wait_until(lambda: asyncio.sleep(0, len(store.live_instances("decode")) >= 2), 60)
    ps = prompts(6, seed=2)
    seen = {"n": 0}
    decode = serve.get_deployment_handle("decode", app_name="ft")
    async with httpx.AsyncClient(timeout=300) as c:
        tasks = [asyncio.create_task(stream(c, url, p, n=400, on_token=lambda: seen.__setitem__(
            "n", seen["n"] + 1))) for p in ps]
        await wait_until(lambda: asyncio.sleep(0, seen["n"] >= 6 * 4))
        stats = await instance_stats("decode", store)
        busiest = max(stats, key=lambda i: stats[i].running)
        assert await decode.drain.remote(target=busiest) > 0
        got = await asyncio.wait_for(asyncio.gather(*tasks), 240)
        after = await decode.stats.remote(target=busiest)
        await decode.undrain.remote(target=busiest)
    assert got == ref(ps, 400)
    assert after.running == 0 and after.free_blocks == after.total_blocks


async def test_twenty_disconnecting_clients_free_every_block(ft):
    url, store = ft

    async def hang_up(p):
        async with httpx.AsyncClient(timeout=60) as c:
            async with c.stream("POST", f"{url}/v1/completions",
                                json={"prompt": p, "max_tokens": 500, "temperature": 0,
                                      "ignore_eos": True, "stream": True}) as r:
                n = 0
                async for line in r.aiter_lines():
                    n += line.startswith("data: ")
                    if n >= 2:
                        return

    await asyncio.gather(*(hang_up(p) for p in prompts(20, seed=3)))

    async def baseline():
        s = list((await instance_stats("decode", store)).values()) + \
            list((await instance_stats("prefill", store)).values())
        return s and all(x.free_blocks == x.total_blocks and x.running == 0 for x in s)

    await wait_until(baseline, 30)
