"""The disaggregated app over HTTP: outputs equal the single engine, under concurrency, with
long and short prompts, colocated mode, client disconnects and a stalled KV transfer."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from serve_helpers import deploy
from transformers import AutoTokenizer

from pdserve.workers.llm import LLM
from pdserve.workers.request import SamplingParams

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

N = 10


@pytest.fixture(scope="module")
def apps(serve_http, cluster_model):
    deploy("disagg", cluster_model, kv_transfer={"timeout_s": 4.0}, testing_faults=True)
    deploy("colo", cluster_model, mode="colocated")
    yield {"disagg": f"{serve_http}/disagg", "colo": f"{serve_http}/colo"}
    from ray import serve

    serve.delete("disagg")  # free the session's CPUs for the next module's apps
    serve.delete("colo")


@pytest.fixture(scope="module")
def reference(cluster_model):
    llm = LLM(str(cluster_model), num_blocks=1024)
    tok = AutoTokenizer.from_pretrained(str(cluster_model))

    def ref(prompt_ids: list[int], n: int = N) -> str:
        sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return llm.generate([prompt_ids], sp)[0].text

    ref.tok = tok
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


def ids(ref, text):
    return ref.tok(text)["input_ids"]


async def pool_stats(app: str) -> list:
    from ray import serve

    roles = ["colocated"] if app == "colo" else ["prefill", "decode"]
    return [await serve.get_deployment_handle(r, app_name=app).stats.remote() for r in roles]


async def wait_blocks_free(app: str, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        stats = await pool_stats(app)
        if all(s.free_blocks == s.total_blocks and s.running == 0 for s in stats) or \
                time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.2)


async def test_stream_and_nonstream_equal_single_engine(apps, reference):
    async with httpx.AsyncClient(timeout=120) as c:
        for text in ["The quick brown fox", "Un café crème", "x"]:
            expect = reference(ids(reference, text))
            assert await complete(c, apps["disagg"], text) == expect
            assert await stream_text(c, apps["disagg"], text) == expect
            assert await complete(c, apps["colo"], text) == expect


async def test_sixteen_concurrent_requests_all_exact(apps, reference):
    prompts = [[(7 * i + j) % 300 + 3 for j in range(5 + 9 * i)] for i in range(16)]
    async with httpx.AsyncClient(timeout=300) as c:
        got = await asyncio.gather(*(complete(c, apps["disagg"], p) for p in prompts))
    assert got == [reference(p) for p in prompts]
    stats = await wait_blocks_free("disagg")
    assert all(s.free_blocks == s.total_blocks for s in stats), stats


async def test_one_block_and_257_block_prompts(apps, reference):
    short = [11] * 16
    long = [(13 * j) % 350 + 3 for j in range(257 * 16)]
    async with httpx.AsyncClient(timeout=300) as c:
        for p in (short, long):
            expect = reference(p, 6)
            assert await complete(c, apps["disagg"], p, 6) == expect
            assert await complete(c, apps["colo"], p, 6) == expect


async def test_client_disconnect_frees_blocks(apps):
    async with httpx.AsyncClient(timeout=60) as c:
        for app in ("disagg", "colo"):
            for _ in range(3):
                async with c.stream("POST", f"{apps[app]}/v1/completions",
                                    json=body([5, 6, 7], 2000, True)) as r:
                    seen = 0
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            seen += 1
                        if seen >= 3:
                            break  # leaving the block closes the connection mid-stream
            stats = await wait_blocks_free(app)
            assert all(s.free_blocks == s.total_blocks and s.running == 0 for s in stats), stats


async def test_stalled_transfer_is_retried_and_blocks_return(apps, reference):
    from ray import serve

    prefill = serve.get_deployment_handle("prefill", app_name="disagg")
    await prefill.inject_fault.remote("stall_transfer", 1)
    text = "The quick brown fox"
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=120) as c:
        got = await complete(c, apps["disagg"], text)
    assert got == reference(ids(reference, text))
    assert time.monotonic() - t0 < 4.0 * 3 + 10  # one timeout, then the retry
    stats = await wait_blocks_free("disagg")
    assert all(s.free_blocks == s.total_blocks for s in stats), stats
    transfers = await serve.get_deployment_handle("decode", app_name="disagg").transfers.remote()
    assert transfers, "the decode instance recorded its transfers"


async def test_models_health_and_bad_requests(apps):
    async with httpx.AsyncClient(timeout=30) as c:
        url = apps["disagg"]
        assert (await c.get(f"{url}/health")).json()["status"] == "ok"
        models = (await c.get(f"{url}/v1/models")).json()
        assert models["data"][0]["id"]
        r = await c.post(f"{url}/v1/completions", json={"prompt": "x", "temperature": 5})
        assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
        r = await c.post(f"{url}/v1/completions", json={"prompt": [1] * 9000})
        assert r.status_code == 400 and "context" in r.json()["error"]["message"]
        r = await c.post(f"{url}/v1/chat/completions", json={"messages": []})
        assert r.status_code == 400
        assert await complete(c, url, "x", 2)  # still healthy


async def test_colocated_tp2_pool_matches_single_engine(serve_http, cluster_model, reference):
    from ray import serve

    deploy("tp2", cluster_model, mode="colocated",
           colocated={"tp": 2, "cpus": 0.5, "num_blocks": 256})
    try:
        async with httpx.AsyncClient(timeout=120) as c:
            for p in ([5, 6, 7, 8], [(7 * j) % 300 + 3 for j in range(40)]):
                assert await complete(c, f"{serve_http}/tp2", p) == reference(p)
    finally:
        serve.delete("tp2")


async def test_metrics_appear_and_move_under_load(apps):
    async with httpx.AsyncClient(timeout=60) as c:
        def value(text: str, name: str) -> float:
            for line in text.splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
            return 0.0

        before = (await c.get(f"{apps['disagg']}/metrics")).text
        for p in ([3, 4, 5], [6, 7, 8, 9]):
            await complete(c, apps["disagg"], p)
        after = (await c.get(f"{apps['disagg']}/metrics")).text
    assert value(after, "pdserve_ttft_seconds_count") >= value(before, "pdserve_ttft_seconds_count") + 2
    assert value(after, "pdserve_output_tokens_total") >= value(before, "pdserve_output_tokens_total") + 2 * N
    assert 'pdserve_requests_total{outcome="ok"}' in after
    assert "pdserve_tpot_seconds_bucket" in after and 'event="requests"' in after
