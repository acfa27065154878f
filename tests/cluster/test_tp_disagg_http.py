"""Disaggregated apps whose pools use different TP degrees, over HTTP: prefill TP=2 → decode
TP=1 and prefill TP=1 → decode TP=2 give the single engine's greedy output token for token
(each prefill rank pushes its KV heads to the decode ranks that own them), under concurrency,
and a stalled transfer is retried with the blocks of every rank returned."""

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

N = 8
APPS = {"tp21": (2, 1), "tp12": (1, 2)}


@pytest.fixture(scope="module")
def apps(serve_http, cluster_model):
    for name, (p, d) in APPS.items():
        deploy(name, cluster_model, kv_transfer={"timeout_s": 4.0}, testing_faults=True,
               prefill={"tp": p, "num_blocks": 256}, decode={"tp": d, "num_blocks": 256})
    yield {name: f"{serve_http}/{name}" for name in APPS}
    from ray import serve

    for name in APPS:
        serve.delete(name)


@pytest.fixture(scope="module")
def reference(cluster_model):
    llm = LLM(str(cluster_model), num_blocks=1024)

    def ref(prompt_ids: list[int], n: int = N) -> str:
        sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return llm.generate([prompt_ids], sp)[0].text

    return ref


def body(prompt, n=N, stream=False):
    return {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": stream}


async def complete(client, url, prompt, n=N) -> str:
    r = await client.post(f"{url}/v1/completions", json=body(prompt, n))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


async def stream_text(client, url, prompt, n=N) -> str:
    out = []
    async with client.stream("POST", f"{url}/v1/completions", json=body(prompt, n, True)) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                d = json.loads(line[6:])
                assert "error" not in d, d
                out.append(d["choices"][0]["text"])
    return "".join(out)


async def pools(app: str) -> list:
    from ray import serve

    return [await serve.get_deployment_handle(r, app_name=app).stats.remote()
            for r in ("prefill", "decode")]


async def wait_blocks_free(app: str, timeout=15.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        stats = await pools(app)
        if all(s.free_blocks == s.total_blocks and s.running == 0 for s in stats) or \
                time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("app", list(APPS))
async def test_tp_pools_exact_streaming_and_concurrent(apps, reference, app):
    from ray import serve

    info = await serve.get_deployment_handle("decode", app_name=app).info.remote()
    assert info.layout.tp_size == APPS[app][1]
    prompts = [[(7 * i + j) % 300 + 3 for j in range(3 + 11 * i)] for i in range(6)]
    async with httpx.AsyncClient(timeout=300) as c:
        assert await stream_text(c, apps[app], prompts[2]) == reference(prompts[2])
        got = await asyncio.gather(*(complete(c, apps[app], p) for p in prompts))
    assert got == [reference(p) for p in prompts]
    stats = await wait_blocks_free(app)
    assert all(s.free_blocks == s.total_blocks for s in stats), stats
    transfers = await serve.get_deployment_handle("decode", app_name=app).transfers.remote()
    assert len([t for t in transfers if t["side"] == "recv" and t["bytes"] > 0]) >= len(prompts)


@pytest.mark.parametrize("app", list(APPS))
async def test_tp_stalled_transfer_is_retried_and_blocks_return(apps, reference, app):
    from ray import serve

    prefill = serve.get_deployment_handle("prefill", app_name=app)
    await prefill.inject_fault.remote("stall_transfer", 1)
    prompt = [(5 * j) % 300 + 3 for j in range(40)]
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=120) as c:
        assert await complete(c, apps[app], prompt) == reference(prompt)
        took = time.monotonic() - t0
        assert took < 4.0 * 3 + 10, took  # one timeout, then the retry
        # the pair's channels (on every rank) were rebuilt: the next request is exact too
        assert await complete(c, apps[app], prompt[:9]) == reference(prompt[:9])
    stats = await wait_blocks_free(app)
    assert all(s.free_blocks == s.total_blocks for s in stats), stats
