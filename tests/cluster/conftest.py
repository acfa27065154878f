"""A session-scoped local Ray Serve with pdserve apps on a tiny model (loopback only)."""

from __future__ import annotations

import pytest
from tiny_models import make_model


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from pdserve.cluster.launcher import loopback_ray_env

    loopback_ray_env()
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=8, include_dashboard=False, logging_level="WARNING")
    yield ray
    if started:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def serve_http(ray_session):
    from ray import serve

    from pdserve.cluster.launcher import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def cluster_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("cluster_llama"), "llama")
