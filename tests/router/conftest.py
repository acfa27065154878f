"""Two pdserve apps on the session's Ray Serve (fixtures from tests/conftest.py), deployed
once and deleted at the end:

  * ``api``   disaggregated, the 8192-token tiny model, API keys and an admin token;
  * ``small`` disaggregated, a 128-token-context tiny model (every generation is short, so
    validation, fuzzing and overload stay fast), no API keys (an admin token), 2 sequences
    per pool and a queue of 2 per pool, 2 s Retry-After.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from serve_helpers import deploy
from tiny_models import make_model

API_KEYS = ("key-alpha", "key-beta")
ADMIN_TOKEN = "admin-secret"
SMALL_ADMIN = "small-admin"


@dataclass(frozen=True)
class App:
    name: str
    url: str  # HTTP base, e.g. http://127.0.0.1:PORT/api
    grpc: str  # host:port of Serve's gRPC proxy
    model: str  # the served model's name
    key: str | None  # an API key that works

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    @property
    def grpc_metadata(self) -> list[tuple[str, str]]:
        md = [("application", self.name)]
        return md + ([("authorization", f"Bearer {self.key}")] if self.key else [])


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("small_ctx_llama"), "llama", max_positions=128)


def _deploy(name, model, serve_http, serve_grpc, key, **cfg) -> App:
    deploy(name, model, **cfg)
    return App(name, f"{serve_http}/{name}", serve_grpc, model.name, key)


@pytest.fixture(scope="session")
def api_app(serve_http, serve_grpc, cluster_model):
    from ray import serve

    app = _deploy("api", cluster_model, serve_http, serve_grpc, API_KEYS[0],
                  router={"api_keys": list(API_KEYS), "admin_token": ADMIN_TOKEN})
    yield app
    serve.delete("api")


@pytest.fixture(scope="session")
def small_app(serve_http, serve_grpc, small_model):
    from ray import serve

    pool = {"max_num_seqs": 2, "num_blocks": 64}
    app = _deploy("small", small_model, serve_http, serve_grpc, None, prefill=pool, decode=pool,
                  router={"max_queue": 2, "retry_after_s": 2, "admin_token": SMALL_ADMIN})
    yield app
    serve.delete("small")


async def pool_stats(app: str) -> list:
    from ray import serve

    return [await serve.get_deployment_handle(r, app_name=app).stats.remote()
            for r in ("prefill", "decode")]


async def wait_idle(app: str, timeout_s: float = 15.0) -> list:
    """Pool stats once every KV block is free and nothing runs (or at the timeout)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        stats = await pool_stats(app)
        if all(s.free_blocks == s.total_blocks and s.running == 0 and s.waiting == 0
               for s in stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.2)


def idle(stats) -> bool:
    return all(s.free_blocks == s.total_blocks and s.running == 0 for s in stats)
