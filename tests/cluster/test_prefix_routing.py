"""The Redis metadata store (a real redis-server) and cache-aware routing in the app."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from serve_helpers import deploy

from pdserve.cluster.launcher import RedisServer
from pdserve.cluster.metadata import IndexPublisher, MetadataStore

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]


@pytest.fixture
def redis_server():
    srv = RedisServer().start()
    yield srv
    srv.stop()


def test_longest_prefix_one_round_trip_and_liveness(redis_server):
    st = MetadataStore(redis_server.url, ttl_s=1.0)
    st.heartbeat("A", "prefill", 1)
    st.heartbeat("B", "prefill", 1)
    st.publish("A", [1, 2, 3], [])
    st.publish("B", [1, 2], [])
    st.publish("C", [1, 2, 3], [])  # C never registered: its entries are not trusted
    assert st.longest_prefix([1, 2, 3, 4]) == {"A": 3, "B": 2}
    assert st.longest_prefix([9, 1, 2]) == {}
    st.publish("A", [], [2])  # evicted a middle block: only the head counts
    assert st.longest_prefix([1, 2, 3]) == {"A": 1, "B": 2}
    time.sleep(1.3)  # A and B stop heart-beating (dead, or restarted with a new id)
    assert st.longest_prefix([1, 2, 3]) == {}
    assert st.live_instances() == {}


def test_publisher_batches_and_republishes_after_redis_restart(redis_server):
    held = [11, 12, 13]
    pub = IndexPublisher(redis_server.url, flush_s=0.05, heartbeat_s=0.2).start(
        "P0", "prefill", 7, lambda: list(held))
    st = MetadataStore(redis_server.url)
    deadline = time.monotonic() + 5
    while st.longest_prefix([11, 12, 13]) != {"P0": 3} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert st.longest_prefix([11, 12, 13]) == {"P0": 3}
    pub.cached([14])
    pub.evicted([12])
    held[:] = [11, 13, 14]
    time.sleep(0.3)
    assert st.longest_prefix([11, 12]) == {"P0": 1}
    # Redis restarts empty on the same port: the publisher notices and republishes
    port = redis_server.port
    redis_server.stop()
    time.sleep(0.5)
    assert not pub.healthy
    again = RedisServer(port=port).start()
    try:
        deadline = time.monotonic() + 8
        while st.longest_prefix([11]) != {"P0": 1} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert st.longest_prefix([11]) == {"P0": 1}
        assert pub.healthy and pub.errors > 0
    finally:
        pub.stop()
        again.stop()


async def _complete(c, url, prompt, n=4):
    r = await c.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": n,
                                                     "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


async def _prefill_stats(app: str, store: MetadataStore):
    from ray import serve

    h = serve.get_deployment_handle("prefill", app_name=app)
    ids = list(store.live_instances("prefill"))
    return {i: await h.stats.remote(target=i) for i in ids}


async def test_prefix_aware_routing_and_redis_outage(serve_http, cluster_model, redis_server):
    deploy("prefix", cluster_model, redis_url=redis_server.url,
           prefill={"replicas": 2, "num_blocks": 512}, decode={"num_blocks": 512})
    url = f"{serve_http}/prefix"
    store = MetadataStore(redis_server.url)
    deadline = time.monotonic() + 30
    while len(store.live_instances("prefill")) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert len(store.live_instances("prefill")) == 2
    systems = [[(31 * s + j) % 350 + 3 for j in range(160)] for s in range(2)]
    async with httpx.AsyncClient(timeout=120) as c:
        for s in systems:  # warm: each long system prompt lands somewhere
            await _complete(c, url, s + [1])
        await asyncio.sleep(0.5)  # publishers flush every 100 ms
        for turn in range(3):
            for i, s in enumerate(systems):
                await _complete(c, url, s + [2 + turn, 5 + i])
        stats = await _prefill_stats("prefix", store)
        hit = sum(s.prefix_hit_tokens for s in stats.values())
        asked = sum(s.prefix_query_tokens for s in stats.values())
        # 6 follow-ups, each could reuse 160 // 16 = 10 blocks if routed to its system prompt
        assert hit >= 6 * 160 * 0.9, (hit, asked, stats)

        # Redis dies: requests still complete (load-only routing), and again once it is back
        port = redis_server.port
        redis_server.stop()
        for i, s in enumerate(systems):
            assert await _complete(c, url, s + [9, i])
        back = RedisServer(port=port).start()
        try:
            await asyncio.sleep(2.5)  # heartbeats republish the instances' caches
            assert len(store.live_instances("prefill")) == 2
            assert await _complete(c, url, systems[0] + [10])
        finally:
            back.stop()
            from ray import serve

            serve.delete("prefix")
