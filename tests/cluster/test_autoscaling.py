"""Autoscaling for real: a decode pool with a small KV cache under a burst of long streams
scales out (Serve really starts a second replica), and back in once the burst is over
(draining the replica it removes); every client stream completes exactly; the decisions are
in the console's JSON and in /metrics."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from pdserve.workers.llm import LLM
from pdserve.workers.request import SamplingParams
from serve_helpers import deploy

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

ADMIN = "scale-admin"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
N_OUT = 60


@pytest.fixture(scope="module")
def app(serve_http, cluster_model):
    # decode KV: 96 blocks of 16 tokens; 6 clients streaming ~150-token prompts + 60 outputs
    # one after the other hold ~80 blocks, so KV use stays above kv_high (0.5) while they run
    deploy("autoscale", cluster_model,
           router={"admin_token": ADMIN},
           decode={"num_blocks": 96, "max_num_seqs": 16},
           slo={"ttft_s": 30.0, "tpot_s": 10.0},  # only KV use drives this test's decisions
           autoscaling={"enabled": True, "interval_s": 0.5,
                        "prefill": {"min_replicas": 1, "max_replicas": 1},
                        "decode": {"min_replicas": 1, "max_replicas": 2},
                        "policy": {"kv_high": 0.5, "kv_target": 0.3, "smoothing_s": 0.5,
                                   "out_after_s": 1.0, "in_after_s": 3.0,
                                   "out_cooldown_s": 2.0, "in_cooldown_s": 4.0,
                                   "warmup_s": 0.0}})
    yield f"{serve_http}/autoscale"
    from ray import serve

    serve.delete("autoscale")


@pytest.fixture(scope="module")
def ref(cluster_model):
    llm = LLM(str(cluster_model), num_blocks=1024)

    def run(prompts):
        sp = SamplingParams(max_tokens=N_OUT, temperature=0, ignore_eos=True)
        return [c.text for c in llm.generate(prompts, sp)]

    return run


def prompts(k: int) -> list[list[int]]:
    return [[(11 * i + 3 * j) % 300 + 3 for j in range(140 + 5 * i)] for i in range(k)]


async def stream(c: httpx.AsyncClient, url: str, prompt: list[int]) -> str:
    out = []
    async with c.stream("POST", f"{url}/v1/completions",
                        json={"prompt": prompt, "max_tokens": N_OUT, "temperature": 0,
                              "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                d = json.loads(line[6:])
                assert "error" not in d, d
                out.append(d["choices"][0]["text"])
    return "".join(out)


async def decode_pool(c: httpx.AsyncClient, url: str) -> dict:
    r = await c.get(f"{url}/console/api/state")
    assert r.status_code == 200, r.text
    LAST.update(r.json())
    return r.json()


def serve_target(pool: str) -> int:
    import ray
    from ray.serve.context import _get_global_client

    ctl = _get_global_client()._controller
    return ray.get(ctl.get_deployment_details.remote("autoscale", pool)).target_num_replicas


LAST: dict = {}


async def until(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        got = await cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}: " + json.dumps(
            {k: LAST.get(k) for k in ("pools", "autoscaling")})[:4000]
        await asyncio.sleep(0.5)


async def test_decode_pool_scales_out_under_load_and_back_in(app, ref):
    url = app
    ps = prompts(6)
    stop = asyncio.Event()
    got: list[tuple[int, str]] = []

    async def client(c: httpx.AsyncClient, i: int) -> None:
        # closed loop: the decode pool's KV stays busy until ``stop``
        while not stop.is_set():
            got.append((i, await stream(c, url, ps[i])))

    async with httpx.AsyncClient(timeout=300) as c:
        s = await until(lambda: decode_pool(c, url), 30, "the console state")
        assert s["autoscaling"]["enabled"] and serve_target("decode") == 1
        tasks = [asyncio.create_task(client(c, i)) for i in range(len(ps))]

        async def two_running():
            s = await decode_pool(c, url)
            reps = s["pools"]["decode"]["replicas"]
            return s if sum(r["state"] == "RUNNING" for r in reps) == 2 else None

        try:
            s = await until(two_running, 120, "a second decode replica")
            await asyncio.sleep(3)  # load on both replicas
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 300)
        assert serve_target("decode") == 2
        outs = [d for d in s["autoscaling"]["decisions"]
                if d["pool"] == "decode" and d["action"] == "out"]
        assert outs and outs[0]["source"] == "autoscaler" and outs[0]["applied"], outs
        assert "KV use" in outs[0]["reason"], outs[0]

        async def back_to_one():
            s = await decode_pool(c, url)
            return s if s["pools"]["decode"]["target"] == 1 else None

        s = await until(back_to_one, 120, "the decode pool to scale back in")
        ins = [d for d in s["autoscaling"]["decisions"]
               if d["pool"] == "decode" and d["action"] == "in"]
        assert ins and ins[-1]["applied"], ins
        assert "drained" in ins[-1], ins[-1]  # the replica was drained before it went
        assert serve_target("decode") == 1
        assert s["pools"]["prefill"]["target"] == 1  # prefill: min = max = 1

        metrics = (await c.get(f"{url}/metrics")).text
    want = ref(ps)
    assert len(got) >= len(ps)
    assert [t for _, t in got] == [want[i] for i, _ in got]
    line = 'pdserve_autoscaler_decisions_total{action="out",pool="decode",source="autoscaler"}'
    assert line in metrics, metrics[-3000:]
    assert 'pdserve_autoscaler_decisions_total{action="in",pool="decode"' in metrics


async def test_scale_by_hand_needs_the_admin_token(app):
    url = app
    async with httpx.AsyncClient(timeout=120) as c:
        r = await c.post(f"{url}/admin/scale", json={"pool": "decode", "replicas": 2})
        assert r.status_code == 401
        r = await c.post(f"{url}/admin/scale", json={"pool": "nope", "replicas": 2},
                         headers=HEADERS)
        assert r.status_code == 400 and "pools are" in r.json()["error"]["message"]
        r = await c.post(f"{url}/admin/autoscaling", headers=HEADERS,
                         json={"pool": "decode", "min_replicas": 3, "max_replicas": 2})
        assert r.status_code == 400
