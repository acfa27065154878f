"""The ops console in headless Chromium (Debian's ``chromium``, driven by Playwright; no
browser is downloaded): the page loads without console errors, its charts fill with live
data while requests run, and the "+ replica" button really adds a decode replica (then
"− replica" drains one and takes it away). A screenshot is saved under the test's tmp_path
and copied to tests/artifacts/ (ignored by git)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import pytest
from serve_helpers import deploy

pytestmark = [pytest.mark.browser, pytest.mark.cluster, pytest.mark.timeout(600)]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ADMIN = "console-admin"
APP = "consoleb"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture(scope="module")
def app(serve_http, cluster_model):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (make setup installs Debian's chromium)")
    pytest.importorskip("playwright", reason="playwright is a dev dependency (pip install -e .[dev])")
    deploy(APP, cluster_model, router={"admin_token": ADMIN},
           autoscaling={"interval_s": 0.5})
    yield f"{serve_http}/{APP}"
    from ray import serve

    serve.delete(APP)


def serve_target(pool: str) -> int:
    import ray
    from ray.serve.context import _get_global_client

    ctl = _get_global_client()._controller
    return ray.get(ctl.get_deployment_details.remote(APP, pool)).target_num_replicas


async def load(url: str, stop: asyncio.Event) -> int:
    """Requests one after another (two at a time) until ``stop``; returns how many ran."""
    n = 0
    body = {"prompt": [7 + i % 300 for i in range(120)], "max_tokens": 40, "temperature": 0,
            "ignore_eos": True}
    async with httpx.AsyncClient(timeout=120) as c:
        async def one():
            nonlocal n
            while not stop.is_set():
                r = await c.post(f"{url}/v1/completions", json=body)
                assert r.status_code == 200, r.text
                n += 1
        await asyncio.gather(one(), one())
    return n


async def wait(page, expr: str, timeout_s: float, errors: list[str]) -> None:
    """``page.wait_for_function`` that, on timeout, says what the page showed."""
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    try:
        await page.wait_for_function(expr, timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        status = await page.text_content("#status")
        message = await page.text_content("#message")
        raise AssertionError(f"page never satisfied {expr!r}; status {status!r}, message "
                             f"{message!r}, errors {errors}") from None


async def test_console_renders_live_charts_and_scales_a_pool(app, tmp_path):
    from playwright.async_api import async_playwright

    url = app
    stop = asyncio.Event()
    traffic = asyncio.create_task(load(url, stop))
    errors: list[str] = []
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                               args=["--no-sandbox", "--disable-gpu"])
            page = await browser.new_page(viewport={"width": 1400, "height": 1700})
            page.on("console", lambda m: errors.append(f"console: {m.text}")
                    if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            await page.goto(f"{url}/console")
            await wait(page, "document.getElementById('status').textContent"
                       ".startsWith('live')", 30, errors)
            # live data: the latency charts hold measured points, the decode pool has a batch
            await wait(
                page, "() => ['ch-ttft', 'ch-tpot', 'ch-rate'].every(id => state.charts[id] &&"
                " state.charts[id].data[1].filter(v => v != null).length >= 3)", 60, errors)
            assert await page.locator("#charts canvas").count() >= 6  # uPlot drew every chart
            assert await page.locator('.pool[data-pool="decode"] tr[data-replica]').count() == 1
            assert serve_target("decode") == 1

            await page.fill("#token", ADMIN)
            await page.press("#token", "Tab")  # "change": the page keeps the token
            await page.click('.pool[data-pool="decode"] button.scale[data-delta="1"]')
            await wait(
                page, "document.querySelectorAll('.pool[data-pool=\"decode\"] td.state.RUNNING')"
                ".length === 2", 120, errors)
            assert serve_target("decode") == 2
            await wait(
                page, "[...document.querySelectorAll('#decisions tbody tr')].some(r => "
                "r.textContent.includes('operator') && r.textContent.includes('1 → 2'))",
                10, errors)
            await asyncio.sleep(3)  # a few samples with two replicas on the charts
            shot = tmp_path / "console.png"
            await page.screenshot(path=str(shot), full_page=True)
            ARTIFACTS.mkdir(exist_ok=True)
            shutil.copy(shot, ARTIFACTS / "console.png")

            await page.click('.pool[data-pool="decode"] button.scale[data-delta="-1"]')
            await wait(
                page, "document.querySelectorAll('.pool[data-pool=\"decode\"] "
                "tr[data-replica]').length === 1", 120, errors)
            assert serve_target("decode") == 1
            msg = await page.text_content("#message")
            assert msg.endswith("done"), msg
            await browser.close()
    finally:
        stop.set()
    assert await asyncio.wait_for(traffic, 120) > 0
    assert shot.stat().st_size > 20_000
    assert not errors, errors
