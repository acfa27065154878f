"""The load generator: one asyncio process sending streaming OpenAI completions on a schedule
and timing each token as it arrives.

Every system gets the same body: a token-id prompt, greedy sampling, ``ignore_eos`` so the
output length is the workload's, ``stream_options.include_usage`` so the token count comes
from the server (a chunk can carry no text, or several tokens, when bytes of one character
span tokens). TTFT is measured from the request's scheduled arrival time, so a client that
falls behind counts against the system, never for it.

A request still running at its deadline (``SLO.deadline``: past it, it cannot meet its SLOs) is
cancelled; closing the stream makes the server abort it, so an overloaded rate does not
spill queued work into the next one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
from slo import Outcome
from workloads import RequestSpec

GRACE_S = 1.0  # slack on a deadline before cancelling (the client's own timing noise)


@dataclass(frozen=True)
class Target:
    base_url: str  # e.g. http://127.0.0.1:8000
    model: str  # the name the server lists under /v1/models


def request_body(target: Target, spec: RequestSpec) -> dict:
    return {"model": target.model, "prompt": list(spec.prompt_ids), "max_tokens": spec.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


def parse_event(line: str) -> dict | None:
    """One SSE line → its JSON payload; None for blank/comment lines and ``[DONE]``."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    return json.loads(data)


async def send(client: httpx.AsyncClient, target: Target, spec: RequestSpec, t_arrival: float,
               deadline_s: float | None) -> Outcome:
    """Send one request now; times are relative to ``t_arrival`` (loop time)."""
    loop = asyncio.get_running_loop()
    first = last = None
    events = 0
    usage_tokens = None
    error = None
    try:
        async with asyncio.timeout_at(None if deadline_s is None else t_arrival + deadline_s):
            async with client.stream("POST", f"{target.base_url}/v1/completions",
                                     json=request_body(target, spec)) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")[:200]
                    return Outcome(None, None, 0, f"HTTP {resp.status_code}: {body}")
                async for line in resp.aiter_lines():
                    ev = parse_event(line)
                    if ev is None:
                        continue
                    if "error" in ev:
                        error = str(ev["error"].get("message", ev["error"]))[:200]
                        break
                    if ev.get("choices"):
                        now = loop.time()
                        first = now if first is None else first
                        last = now
                        events += 1
                    if ev.get("usage"):
                        usage_tokens = ev["usage"].get("completion_tokens")
    except TimeoutError:
        error = "timeout"
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"[:200]
    n = usage_tokens if usage_tokens is not None else events
    ttft = None if first is None else first - t_arrival
    tpot = (last - first) / (n - 1) if first is not None and n > 1 else None
    if error is None and n < spec.max_tokens:
        error = f"short output: {n} of {spec.max_tokens} tokens"
    return Outcome(ttft, tpot, n, error)


async def run_schedule(target: Target, specs: Sequence[RequestSpec], arrivals: Sequence[float],
                       deadline: Callable[[RequestSpec], float | None],
                       on_done: Callable[[Outcome], None] | None = None,
                       transport: httpx.AsyncBaseTransport | None = None) -> list[Outcome]:
    """Send ``specs[i]`` at ``arrivals[i]`` seconds from now (Poisson offsets); return the
    outcomes in request order once every request finished or passed its deadline.
    (``transport``: for tests.)"""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits,
                                 transport=transport) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def one(spec: RequestSpec, at: float) -> Outcome:
            await asyncio.sleep(max(0.0, t0 + at - loop.time()))
            d = deadline(spec)
            out = await send(client, target, spec, t0 + at,
                             None if d is None else d + GRACE_S)
            if on_done is not None:
                on_done(out)
            return out

        return list(await asyncio.gather(*(one(s, a) for s, a in zip(specs, arrivals))))


async def run_sequential(target: Target, specs: Sequence[RequestSpec],
                         timeout_s: float = 300.0) -> list[Outcome]:
    """One request at a time (warm-up and unloaded probes)."""
    outs = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(None)) as client:
        loop = asyncio.get_running_loop()
        for spec in specs:
            outs.append(await send(client, target, spec, loop.time(), timeout_s))
    return outs


async def served_model(base_url: str, timeout_s: float = 10.0) -> str:
    """The first model id the server lists (pdserve names the folder, vLLM its
    --served-model-name)."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        r = await client.get(f"{base_url}/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]
