"""HTTP auth (API keys, the admin token), per-request time limits, and the body size limit,
against the ``api`` app (keys configured)."""

from __future__ import annotations

import json

import httpx
import pytest
from router_apps import ADMIN_TOKEN, API_KEYS, idle, wait_idle

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

LONG = {"prompt": "x", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}


async def test_api_keys(api_app):
    body = {"prompt": "x", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=api_app.url, timeout=60) as c:
        r = await c.post("/v1/completions", json=body)
        assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
        assert r.headers["www-authenticate"] == "Bearer"
        for bad in ("Bearer nope", "Basic a2V5LWFscGhh", f"Bearer {API_KEYS[0]}x", "Bearer"):
            r = await c.post("/v1/completions", json=body, headers={"Authorization": bad})
            assert r.status_code == 401, bad
            assert r.json()["error"]["type"] == "authentication_error"
        # auth comes before parsing: a bad body without a key reveals nothing about the schema
        r = await c.post("/v1/completions", content=b"{not json")
        assert r.status_code == 401
        for key in API_KEYS:
            r = await c.post("/v1/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        assert (await c.get("/health")).status_code == 200  # probes need no key
        assert (await c.get("/v1/models")).status_code == 401


async def test_admin_endpoints_need_the_admin_token(api_app):
    async with httpx.AsyncClient(base_url=api_app.url, timeout=60) as c:
        assert (await c.get("/admin/stats")).status_code == 401
        r = await c.get("/admin/stats", headers=api_app.headers)  # an API key is not enough
        assert r.status_code == 401 and "admin token" in r.json()["error"]["message"]
        r = await c.get("/admin/stats", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status_code == 200
        gates = r.json()["admission"]
        assert set(gates) == {"decode", "prefill"} and gates["decode"]["capacity"] == 128


async def test_request_time_limit_non_stream_and_stream(api_app):
    h = {**api_app.headers, "X-Request-Timeout": "0.7"}
    async with httpx.AsyncClient(base_url=api_app.url, timeout=60) as c:
        r = await c.post("/v1/completions", json=LONG, headers=h)
        assert r.status_code == 408, r.text  # the client's own limit: 408 (the server's: 504)
        err = r.json()["error"]
        assert err["type"] == "timeout_error" and "time limit of 0.7 s" in err["message"]
        assert idle(await wait_idle(api_app.name))
        events = []
        async with c.stream("POST", "/v1/completions", json={**LONG, "stream": True},
                            headers=h) as s:
            assert s.status_code == 200
            async for line in s.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert len(events) > 2, events[:3]
        last = json.loads(events[-1])
        assert "time limit of 0.7 s" in last["error"]["message"] and events[-1] != "[DONE]"
        assert idle(await wait_idle(api_app.name))
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                         headers={**api_app.headers, "X-Request-Timeout": "-1"})
        assert r.status_code == 400 and "x-request-timeout" in r.json()["error"]["message"]


async def test_body_size_limit(api_app):
    big = {"prompt": "a" * (5 << 20)}  # over the 4 MiB default
    async with httpx.AsyncClient(base_url=api_app.url, timeout=60) as c:
        r = await c.post("/v1/completions", json=big, headers=api_app.headers)
        assert r.status_code == 413 and "4194304" in r.json()["error"]["message"]

        async def chunks():  # no Content-Length: counted while it streams in
            for _ in range(6):
                yield b"x" * (1 << 20)

        r = await c.post("/v1/completions", content=chunks(),
                         headers={**api_app.headers, "Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        assert "exceeds the limit" in r.json()["error"]["message"]
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                         headers=api_app.headers)
        assert r.status_code == 200
