"""What the tests in tests/router share (a plain module: ``from conftest import`` would be
ambiguous between the conftest.py files): the apps' description, their secrets, and waiting
for the pools to be idle."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

API_KEYS = ("key-alpha", "key-beta")
ADMIN_TOKEN = "admin-secret"
SMALL_ADMIN = "small-admin"


@dataclass(frozen=True)
class App:
    name: str
    url: str  # HTTP base, e.g. http://127.0.0.1:PORT/api
    grpc: str  # host:port of the app's gRPC API (served by its router replica)
    model: str  # the served model's name
    key: str | None  # an API key that works

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    @property
    def grpc_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.key}")] if self.key else []


async def pool_stats(app: str) -> list:
    from ray import serve

    return [await serve.get_deployment_handle(r, app_name=app).stats.remote()
            for r in ("prefill", "decode")]


def idle(stats) -> bool:
    return all(s.free_blocks == s.total_blocks and s.running == 0 for s in stats)


async def wait_idle(app: str, timeout_s: float = 15.0) -> list:
    """Pool stats once every KV block is free and nothing runs or waits (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await pool_stats(app)
        if (idle(stats) and all(s.waiting == 0 for s in stats)) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.2)
