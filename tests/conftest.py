"""Shared fixtures: tiny random-weight HF model folders, HF greedy references."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton kernels are tested under the interpreter, which must be chosen
# before anything imports triton (tests/kernels relies on it; nothing else is affected:
# the engine uses the torch references unless PDSERVE_KERNELS=triton).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Local Ray on loopback only (see pdserve.cluster.launcher.loopback_ray_env); set before any
# test module imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from helpers import PROMPTS, hf_greedy, smollm2_path  # noqa: E402,F401
from tiny_models import make_model  # noqa: E402

@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama, 4 heads / 2 KV heads (GQA), tied embeddings."""
    return make_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache: dict = {}

    def make(arch: str = "llama", **kw) -> Path:
        key = (arch, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in cache:
            cache[key] = make_model(tmp_path_factory.mktemp(arch), arch, **kw)
        return cache[key]

    return make

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
def serve_http(ray_session) -> str:
    """Serve's HTTP proxy on a free loopback port. (pdserve's gRPC API is served by each
    app's router replica on its own ``router.grpc_port``, not by Serve's gRPC proxy.)"""
    from ray import serve

    from pdserve.cluster.launcher import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def cluster_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("cluster_llama"), "llama")
