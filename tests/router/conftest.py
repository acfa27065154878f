"""Two pdserve apps on the session's Ray Serve (fixtures from tests/conftest.py), deployed
once and deleted at the end, each with its gRPC API on a free loopback port:

  * ``api``   disaggregated, the 8192-token tiny model, API keys and an admin token;
  * ``small`` disaggregated, a 128-token-context tiny model (every generation is short, so
    validation, fuzzing and overload stay fast), no API keys (an admin token), 2 sequences
    per pool and a queue of 2 per pool, 2 s Retry-After.
"""

from __future__ import annotations

import pytest
from router_apps import ADMIN_TOKEN, API_KEYS, SMALL_ADMIN, App
from serve_helpers import deploy
from tiny_models import make_model


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("small_ctx_llama"), "llama", max_positions=128)


def _deploy(name: str, model, serve_http: str, key: str | None, router: dict, **cfg) -> App:
    from pdserve.cluster.launcher import free_port

    port = free_port()
    deploy(name, model, router={**router, "grpc_port": port}, **cfg)
    return App(name, f"{serve_http}/{name}", f"127.0.0.1:{port}", model.name, key)


@pytest.fixture(scope="session")
def api_app(serve_http, cluster_model):
    from ray import serve

    yield _deploy("api", cluster_model, serve_http, API_KEYS[0],
                  {"api_keys": list(API_KEYS), "admin_token": ADMIN_TOKEN})
    serve.delete("api")


@pytest.fixture(scope="session")
def small_app(serve_http, small_model):
    from ray import serve

    pool = {"max_num_seqs": 2, "num_blocks": 64}
    yield _deploy("small", small_model, serve_http, None,
                  {"max_queue": 2, "retry_after_s": 2, "admin_token": SMALL_ADMIN},
                  prefill=pool, decode=pool)
    serve.delete("small")
