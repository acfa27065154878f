"""Live migration over HTTP in a real Serve app: requests moved between decode replicas
mid-stream (once and several times), a drained replica that ends empty, and the automatic
imbalance trigger — every stream equal to the unmigrated greedy output."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from pdserve.cluster.launcher import RedisServer
from pdserve.cluster.metadata import MetadataStore
from pdserve.workers.llm import LLM
from pdserve.workers.request import SamplingParams
from serve_helpers import deploy, stream_completion, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

ADMIN = {"Authorization": "Bearer mig-admin"}


def _mig_app(serve_http, model, name: str):
    """A disaggregated app with 2 decode replicas, a real Redis and manual migration."""
    from ray import serve

    redis = RedisServer().start()
    deploy(name, model, redis_url=redis.url,
           router={"admin_token": "mig-admin", "policy": "least_loaded"},
           migration={"enabled": False, "interval_s": 0.3, "cooldown_s": 0.2},
           prefill={"replicas": 1, "num_blocks": 512},
           decode={"replicas": 2, "num_blocks": 2048})
    store = MetadataStore(redis.url)
    deadline = time.monotonic() + 60
    while len(store.live_instances("decode")) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    yield f"{serve_http}/{name}", store
    serve.delete(name)
    redis.stop()


@pytest.fixture(scope="module")
def mig(serve_http, cluster_model):
    yield from _mig_app(serve_http, cluster_model, "mig")


@pytest.fixture
def mig_fresh(serve_http, cluster_model):
    """An app of its own (a fresh router process). Known issue: after many live migrations,
    a router process's targeted calls to a busy decode replica can stall in Ray Serve 2.60's
    routing (queue-length probes to it keep failing); the controller then skips that replica
    (its stats calls time out) instead of hanging."""
    for url, store in _mig_app(serve_http, cluster_model, "migb"):
        yield url, store, "migb"


@pytest.fixture(scope="module")
def ref(cluster_model):
    llm = LLM(str(cluster_model), num_blocks=1024)

    def run(prompts, n):
        sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return [c.text for c in llm.generate(prompts, sp)]

    return run


def prompts(k: int, seed: int) -> list[list[int]]:
    return [[(seed * 13 + 5 * i + j) % 300 + 3 for j in range(20 + 9 * i)] for i in range(k)]


def stream(c, url, prompt, n, seen: dict):
    """A streamed completion that counts its chunks in ``seen["n"]``."""
    return stream_completion(c, url, prompt, n,
                             on_token=lambda: seen.__setitem__("n", seen["n"] + 1))


async def decode_stats(store, app="mig"):
    from ray import serve

    h = serve.get_deployment_handle("decode", app_name=app)
    ids = store.live_instances("decode")
    return {i: await h.stats.remote(target=i) for i in ids}


async def admin_stats(c, url) -> dict:
    r = await c.get(f"{url}/admin/stats", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


async def test_drain_moves_every_request_live_and_leaves_replica_empty(mig, ref):
    url, store = mig
    ps, n = prompts(6, seed=2), 3000
    seen = {"n": 0}
    async with httpx.AsyncClient(timeout=300) as c:
        r = await c.post(f"{url}/admin/drain", json={"instance_id": "nope"}, headers=ADMIN)
        assert r.status_code == 404 and "no decode instance" in r.text
        before = await admin_stats(c, url)
        tasks = [asyncio.create_task(stream(c, url, p, n, seen)) for p in ps]
        await wait_until(lambda: asyncio.sleep(0, seen["n"] >= 6 * 8), 60)
        st = await decode_stats(store)
        busiest = max(st, key=lambda i: st[i].running)
        r = await c.post(f"{url}/admin/drain", json={"instance_id": busiest}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["migrated"] >= 1
        drained = (await decode_stats(store))[busiest]
        got = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        after = await admin_stats(c, url)
        from ray import serve

        await serve.get_deployment_handle("decode", app_name="mig").undrain.remote(target=busiest)
    assert got == ref(ps, n)
    assert drained.draining and drained.running == 0  # empty right after the drain call
    # live moves, not recompute: the router followed them; nothing had to be recovered
    o, o0 = after["orchestrator"], before["orchestrator"]
    assert o["migrations"] - o0["migrations"] == r.json()["migrated"], (r.json(), o)
    assert o["recoveries"] == o0["recoveries"]
    assert after["migration"]["drains"] == before["migration"]["drains"] + 1


async def test_requests_migrated_back_and_forth_mid_stream_are_exact(mig, ref):
    from ray import serve

    url, store = mig
    decode = serve.get_deployment_handle("decode", app_name="mig")
    ps, n = prompts(4, seed=1), 1500
    seen = {"n": 0}
    async with httpx.AsyncClient(timeout=300) as c:
        before = (await admin_stats(c, url))["orchestrator"]["migrations"]
        tasks = [asyncio.create_task(stream(c, url, p, n, seen)) for p in ps]
        moved = 0
        for k in range(6):  # six moves, each from the busier instance to the other
            await wait_until(lambda k=k: asyncio.sleep(0, seen["n"] >= 4 * (10 + 150 * k)), 60)
            st = await decode_stats(store)
            src = max(st, key=lambda i: st[i].running)
            dst = next(i for i in st if i != src)
            if st[src].running:
                rec = await decode.migrate.remote(None, dst, "test", target=src)
                assert rec["ok"] and rec["bytes"] > 0
                moved += 1
        got = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        after = (await admin_stats(c, url))["orchestrator"]["migrations"]
    assert got == ref(ps, n)
    assert moved >= 4 and after - before == moved

    async def idle():
        return all(s.running == 0 and s.free_blocks == s.total_blocks
                   for s in (await decode_stats(store)).values())

    await wait_until(idle, 30)


async def test_imbalance_trigger_spreads_requests(mig_fresh, ref):
    from ray import serve

    url, store, app = mig_fresh
    decode = serve.get_deployment_handle("decode", app_name=app)
    ids = sorted(store.live_instances("decode"))
    ps, n = prompts(6, seed=3), 2000
    seen = {"n": 0}
    async with httpx.AsyncClient(timeout=300) as c:
        await decode.drain.remote([], target=ids[1])  # everything lands on ids[0] ...
        tasks = [asyncio.create_task(stream(c, url, p, n, seen)) for p in ps]

        async def all_on_first():
            st = await decode_stats(store, app)
            return (st[ids[0]].running, st[ids[1]].running) == (6, 0)

        await wait_until(all_on_first, 60)
        await decode.undrain.remote(target=ids[1])  # ... then the pool is lopsided
        r = await c.post(f"{url}/admin/migration", json={"enabled": True}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["enabled"] is True

        async def balanced():
            st = await decode_stats(store, app)
            return st[ids[1]].running >= 2

        await wait_until(balanced, 60)
        got = await asyncio.wait_for(asyncio.gather(*tasks), 300)
        r = await c.post(f"{url}/admin/migration", json={"enabled": False}, headers=ADMIN)
        events = r.json()["events"]
    assert got == ref(ps, n)
    assert any(e["reason"] == "imbalance" and e["ok"] and e["src"] == ids[0] for e in events), events
