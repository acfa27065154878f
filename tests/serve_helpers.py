"""Deploying pdserve apps into the test session's Ray Serve."""

from __future__ import annotations


def deploy(name: str, model, **cfg) -> None:
    from ray import serve

    from pdserve.cluster.app import build_app

    base = {"model": str(model), "dtype": "float32",
            "prefill": {"cpus": 0.5, "num_blocks": 512, "max_num_batched_tokens": 4096},
            "decode": {"cpus": 0.5, "num_blocks": 512},
            "colocated": {"cpus": 0.5, "num_blocks": 512}}
    for k, v in cfg.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    # external scaling: pdserve's scaling controller (and the console) change replica counts
    serve.run(build_app(base), name=name, route_prefix=f"/{name}", external_scaler_enabled=True)
