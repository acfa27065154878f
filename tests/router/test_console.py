"""The console's page, files and JSON, its admin controls, and the pool/instance/SLO metrics
moving under load (the ``api`` app of tests/router/conftest.py; nothing here changes its
replica counts)."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest
from router_apps import ADMIN_TOKEN

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def metric(text: str, name: str, **labels: str) -> list[float]:
    """Values of ``name`` whose labels include ``labels``."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            out.append(float(m.group(2)))
    return out


async def test_page_and_files_are_served_without_external_links(api_app):
    async with httpx.AsyncClient(base_url=api_app.url, timeout=30) as c:
        r = await c.get("/console")
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        page = r.text
        srcs = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert "console/static/uPlot.iife.min.js" in srcs and "console/static/console.js" in srcs
        assert not [s for s in srcs if "//" in s], srcs  # no CDN: everything from pdserve
        for s in srcs:
            if s.startswith("console/static/"):
                f = await c.get("/" + s)
                assert f.status_code == 200 and len(f.content) > 100, s
        assert "uPlot" in (await c.get("/console/static/uPlot.iife.min.js")).text[:200]
        assert (await c.get("/console/static/secrets.txt")).status_code == 404
        assert (await c.get("/console/static/..%2Fconsole.py")).status_code == 404


async def test_state_json_describes_the_pools(api_app):
    async with httpx.AsyncClient(base_url=api_app.url, timeout=30) as c:
        for _ in range(50):
            s = (await c.get("/console/api/state")).json()
            if s["pools"]:
                break
            await asyncio.sleep(0.5)
    assert set(s["pools"]) == {"prefill", "decode"}
    d = s["pools"]["decode"]
    assert d["target"] == 1 and d["tp"] == 1 and len(d["replicas"]) == 1
    rep = d["replicas"][0]
    assert rep["state"] == "RUNNING" and rep["kv_blocks_total"] > 0
    assert s["autoscaling"]["enabled"] is False and s["admin_enabled"] is True
    assert s["autoscaling"]["slo"] == {"ttft_s": 1.0, "tpot_s": 0.1}
    assert s["migration"] is None or "migrations" in s["migration"]


async def test_controls_need_the_admin_token_and_take_effect(api_app):
    async with httpx.AsyncClient(base_url=api_app.url, timeout=30) as c:
        for path, body in [("/admin/slo", {"ttft_s": 2.0}), ("/admin/scale",
                           {"pool": "decode", "replicas": 1}),
                           ("/admin/autoscaling", {"enabled": False})]:
            r = await c.post(path, json=body)
            assert r.status_code == 401, (path, r.text)
            r = await c.post(path, json=body, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401, (path, r.text)
        try:
            r = await c.post("/admin/slo", json={"ttft_s": 2.5, "tpot_s": 0.2}, headers=ADMIN)
            assert r.status_code == 200 and r.json() == {"ttft_s": 2.5, "tpot_s": 0.2}
            s = (await c.get("/console/api/state")).json()
            assert s["autoscaling"]["slo"] == {"ttft_s": 2.5, "tpot_s": 0.2}
            assert s["window"]["slo"] == {"ttft_s": 2.5, "tpot_s": 0.2}
            text = (await c.get("/metrics")).text
            assert metric(text, "pdserve_slo_target_seconds", slo="ttft") == [2.5]
            r = await c.post("/admin/slo", json={"ttft_s": -1}, headers=ADMIN)
            assert r.status_code == 400
            r = await c.post("/admin/autoscaling", headers=ADMIN,
                             json={"pool": "decode", "min_replicas": 1, "max_replicas": 3})
            assert r.json()["limits"]["decode"] == {"min_replicas": 1, "max_replicas": 3}
            r = await c.post("/admin/autoscaling", headers=ADMIN,
                             json={"pool": "decode", "min_replicas": 4, "max_replicas": 3})
            assert r.status_code == 400 and "min_replicas" in r.json()["error"]["message"]
            r = await c.post("/admin/autoscaling", headers=ADMIN, json={"max_replicas": 3})
            assert r.status_code == 400  # which pool?
            r = await c.post("/admin/scale", headers=ADMIN, json={"pool": "router",
                                                                 "replicas": 2})
            assert r.status_code == 400
        finally:
            await c.post("/admin/slo", json={"ttft_s": 1.0, "tpot_s": 0.1}, headers=ADMIN)
            await c.post("/admin/autoscaling", headers=ADMIN,
                         json={"pool": "decode", "min_replicas": 1, "max_replicas": 4})


async def test_pool_and_instance_metrics_move_under_load(api_app):
    """Batch size, KV blocks and queued work rise while requests run; the SLO window counts
    the finished ones."""
    url = api_app.url
    body = {"model": api_app.model, "prompt": [5 + i % 370 for i in range(395)], "max_tokens": 800,
            "temperature": 0, "ignore_eos": True}
    peak = {"batch": 0.0, "kv": 0.0}
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=api_app.headers) as c:
        before = (await c.get("/metrics")).text
        n_before = sum(metric(before, "pdserve_requests_total", outcome="ok"))
        tasks = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(6)]
        while not all(t.done() for t in tasks):
            text = (await c.get("/metrics")).text
            peak["batch"] = max([peak["batch"], *metric(text, "pdserve_instance_batch_size",
                                                        pool="decode")])
            peak["kv"] = max([peak["kv"], *metric(text, "pdserve_instance_kv_blocks_used",
                                                  pool="decode")])
            await asyncio.sleep(0.3)
        assert all(t.result().status_code == 200 for t in tasks), [t.result().text for t in tasks]
        await asyncio.sleep(2.5)  # one more controller round: the pools are idle again
        after = (await c.get("/metrics")).text
        state = (await c.get("/console/api/state")).json()
    assert peak["batch"] >= 2 and peak["kv"] >= 2 * 25, peak  # 395-token prompts: 25 blocks
    assert metric(after, "pdserve_instance_batch_size", pool="decode") == [0.0]
    total = metric(after, "pdserve_instance_kv_blocks_total", pool="decode")
    assert len(total) == 1 and total[0] > 0
    assert metric(after, "pdserve_pool_target_replicas", pool="decode") == [1.0]
    assert metric(after, "pdserve_pool_replicas", pool="prefill", state="RUNNING") == [1.0]
    assert metric(after, "pdserve_pool_queue_requests", pool="decode") == [0.0]
    assert metric(after, "pdserve_pool_queued_prompt_tokens", pool="prefill") == [0.0]
    assert sum(metric(after, "pdserve_requests_total", outcome="ok")) >= n_before + 6
    both = metric(after, "pdserve_slo_attainment", slo="both")
    assert len(both) == 1 and 0.0 <= both[0] <= 1.0
    assert metric(after, "pdserve_kv_transfer_received_bytes")[0] > 0
    assert metric(after, "pdserve_kv_transfer_seconds", phase="transfer")[0] > 0
    w = state["window"]
    assert w["requests"] >= 6 and w["ttft"]["p50"] > 0 and w["tpot"]["p99"] > 0
    hist = state["history"]
    assert len(hist) >= 3 and max(h["pools"]["decode"]["batch"] for h in hist) >= 1
    assert any(h["transfer_bytes_per_s"] for h in hist[1:])
