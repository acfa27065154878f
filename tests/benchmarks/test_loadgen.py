"""The streaming client: TTFT/TPOT from SSE timing, token counts from usage, deadlines."""

from __future__ import annotations

import asyncio
import json

import benchpath  # noqa: F401 - makes benchmarks/ modules importable
import httpx
import pytest
from loadgen import Target, parse_event, request_body, run_schedule
from workloads import RequestSpec

TARGET = Target("http://bench.invalid", "m")


def _spec(i: int, max_tokens: int = 4) -> RequestSpec:
    return RequestSpec(i, (101, 102, 103), max_tokens)


def _chunk(text: str) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "text": text}]}) + "\n\n"


def _transport(first_delay: float, gap: float, tokens: int, usage: int | None = None,
               status: int = 200, seen: list | None = None) -> httpx.MockTransport:
    async def body():
        await asyncio.sleep(first_delay)
        for i in range(tokens):
            if i:
                await asyncio.sleep(gap)
            yield _chunk(f"t{i}").encode()
        if usage is not None:
            yield ("data: " + json.dumps({"choices": [], "usage": {
                "completion_tokens": usage}}) + "\n\n").encode()
        yield b"data: [DONE]\n\n"

    async def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(json.loads(request.content))
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "nope"}})
        return httpx.Response(200, content=body(),
                              headers={"content-type": "text/event-stream"})

    return httpx.MockTransport(handler)


def test_request_body_is_identical_for_every_system():
    b = request_body(TARGET, RequestSpec(0, (5, 6, 7), 9))
    assert b == {"model": "m", "prompt": [5, 6, 7], "max_tokens": 9, "temperature": 0,
                 "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def test_parse_event():
    assert parse_event("") is None
    assert parse_event(": keep-alive") is None
    assert parse_event("data: [DONE]") is None
    assert parse_event('data: {"a": 1}') == {"a": 1}


def test_ttft_and_tpot_from_stream_timing():
    seen: list = []
    outs = asyncio.run(run_schedule(TARGET, [_spec(0, 4)], [0.0], lambda s: None,
                                    transport=_transport(0.2, 0.05, 4, usage=4, seen=seen)))
    o = outs[0]
    assert o.error is None and o.num_tokens == 4
    assert o.ttft_s == pytest.approx(0.2, abs=0.05)
    assert o.tpot_s == pytest.approx(0.05, abs=0.02)
    assert seen[0]["prompt"] == [101, 102, 103] and seen[0]["ignore_eos"] is True


def test_usage_counts_tokens_that_carried_no_chunk():
    # 3 chunks, but the server says 5 tokens (two chunks each carried two tokens).
    o = asyncio.run(run_schedule(TARGET, [_spec(0, 5)], [0.0], lambda s: None,
                                 transport=_transport(0.0, 0.04, 3, usage=5)))[0]
    assert o.error is None and o.num_tokens == 5
    assert o.tpot_s == pytest.approx(2 * 0.04 / 4, abs=0.01)


def test_short_output_and_http_errors_are_failures():
    o = asyncio.run(run_schedule(TARGET, [_spec(0, 8)], [0.0], lambda s: None,
                                 transport=_transport(0.0, 0.0, 3, usage=3)))[0]
    assert o.error and "short output" in o.error
    o = asyncio.run(run_schedule(TARGET, [_spec(0)], [0.0], lambda s: None,
                                 transport=_transport(0.0, 0.0, 0, status=503)))[0]
    assert o.error.startswith("HTTP 503") and o.ttft_s is None


def test_deadline_cancels_a_request_that_can_no_longer_meet_its_slos():
    o = asyncio.run(run_schedule(TARGET, [_spec(0, 50)], [0.0], lambda s: -0.9,
                                 transport=_transport(0.0, 0.05, 50)))[0]
    assert o.error == "timeout"
    assert 0 < o.num_tokens < 50


def test_requests_leave_on_schedule_and_report_in_order():
    arrivals = [0.0, 0.3, 0.1]
    sent: list[float] = []
    loop_t0: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(asyncio.get_running_loop().time() - loop_t0[0])
        return httpx.Response(200, content=_chunk("x") + "data: [DONE]\n\n")

    async def go():
        loop_t0.append(asyncio.get_running_loop().time())
        return await run_schedule(TARGET, [_spec(i, 1) for i in range(3)], arrivals,
                                  lambda s: None, transport=httpx.MockTransport(handler))

    outs = asyncio.run(go())
    assert [o.num_tokens for o in outs] == [1, 1, 1]
    assert sorted(sent) == pytest.approx(sorted(arrivals), abs=0.05)
