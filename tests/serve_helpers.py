"""Deploying pdserve apps into the test session's Ray Serve, and talking to them."""

from __future__ import annotations

import asyncio
import json
import time


def deploy(name: str, model, **cfg) -> None:
    from pdserve.cluster.app import build_app
    from ray import serve

    base = {"model": str(model), "dtype": "float32",
            "prefill": {"cpus": 0.5, "num_blocks": 512, "max_num_batched_tokens": 4096},
            "decode": {"cpus": 0.5, "num_blocks": 512},
            "colocated": {"cpus": 0.5, "num_blocks": 512}}
    for k, v in cfg.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    # external scaling: pdserve's scaling controller (and the console) change replica counts
    serve.run(build_app(base), name=name, route_prefix=f"/{name}", external_scaler_enabled=True)


async def stream_completion(c, url: str, prompt, n: int, on_token=None) -> str:
    """A streamed greedy completion (``ignore_eos``) over SSE; ``on_token()`` per chunk."""
    out = []
    async with c.stream("POST", f"{url}/v1/completions",
                        json={"prompt": prompt, "max_tokens": n, "temperature": 0,
                              "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                d = json.loads(line[6:])
                assert "error" not in d, d
                out.append(d["choices"][0]["text"])
                if on_token:
                    on_token()
    return "".join(out)


async def wait_until(cond, timeout: float = 30.0) -> None:
    """Poll the coroutine function ``cond`` until it returns true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)
