"""deploy/serve*.yaml pass Ray Serve's own schema and build into pdserve's app; the example
cluster configs (deploy/cluster-*.yaml) load as pdserve configs and build too."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from deploy_paths import DEPLOY
from pdserve.cluster.config import AppConfig, ConfigError
from pdserve.router.proto import SERVICER_FUNCTION
from ray._common.utils import import_attr
from serve_build import build_from_config, check_built

SERVE_CONFIGS = sorted(DEPLOY.glob("serve*.yaml"))
CLUSTER_CONFIGS = sorted(DEPLOY.glob("cluster-*.yaml"))
# Head counts of the models the examples name by path (from their Hugging Face config.json),
# so the TP degrees in the examples are checked against the real model, not the tiny one.
KNOWN_HEADS = {"Qwen2.5-7B-Instruct": (28, 4)}


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


@pytest.fixture(autouse=True)
def api_keys(monkeypatch):
    """The examples that serve beyond loopback need keys, as their nodes would have."""
    monkeypatch.setenv("PDSERVE_API_KEYS", "sk-test")


def _args(raw: dict) -> dict:
    return raw["applications"][0]["args"] if "applications" in raw else raw


@pytest.mark.parametrize("path", SERVE_CONFIGS + CLUSTER_CONFIGS,
                         ids=_ids(SERVE_CONFIGS + CLUSTER_CONFIGS))
def test_exposure_is_declared_to_pdserve(path: Path, monkeypatch):
    """Where the proxy listens beyond loopback, the args say so too (router.host), so that
    pdserve refuses to start such a config without API keys."""
    from pdserve.cluster.config import is_loopback

    raw = yaml.safe_load(path.read_text())
    args = _args(raw)
    proxy_host = raw.get("http_options", {}).get("host", args.get("router", {}).get("host"))
    public = proxy_host is not None and not is_loopback(proxy_host)
    if "applications" in raw:
        assert public == (not is_loopback(args.get("router", {}).get("host", "127.0.0.1")))
    monkeypatch.delenv("PDSERVE_API_KEYS")
    if public:
        with pytest.raises(ConfigError, match="API keys"):
            AppConfig.from_dict(args)
    else:
        AppConfig.from_dict(args)


def test_the_examples_exist():
    assert {p.name for p in SERVE_CONFIGS} == {"serve.yaml", "serve-gpu.yaml"}
    assert {"cluster-default.yaml", "cluster-colocated.yaml", "cluster-gpu.yaml"} <= \
        {p.name for p in CLUSTER_CONFIGS}


def _unknown_keys(model_cls, data: dict, where: str = "") -> list[str]:
    """Keys Serve's (forward-compatible, extra-ignoring) schemas would silently drop."""
    from pydantic import BaseModel

    out = []
    for k, v in data.items():
        f = model_cls.model_fields.get(k)
        if f is None:
            out.append(f"{where}{k}")
            continue
        ann = f.annotation
        if isinstance(v, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _unknown_keys(ann, v, f"{where}{k}.")
    return out


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=_ids(SERVE_CONFIGS))
def test_serve_config_schema(path: Path):
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert _unknown_keys(ServeDeploySchema, raw) == []
    for app_raw in raw["applications"]:
        assert _unknown_keys(ServeApplicationSchema, app_raw) == []
    (app,) = schema.applications
    assert app.import_path == "pdserve.cluster.app:build_app"
    cfg = AppConfig.from_dict(app.args)
    # The proxy's port is what clients reach; a router port in args would only mislead.
    if "router" in app.args and "port" in app.args["router"]:
        assert cfg.router.port == schema.http_options.port
    # A gRPC proxy runs pdserve's servicer, and pdserve knows of it (it binds every
    # interface, which pdserve guards with API keys).
    servicers = schema.grpc_options.grpc_servicer_functions
    assert servicers in ([], [SERVICER_FUNCTION])
    for s in servicers:
        assert callable(import_attr(s))
    assert cfg.router.grpc_port == (schema.grpc_options.port if servicers else None)


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=_ids(SERVE_CONFIGS))
def test_serve_config_builds(path: Path, model_for):
    raw = yaml.safe_load(path.read_text())
    (app,) = raw["applications"]
    cfg = AppConfig.from_dict(app["args"])
    built = build_from_config(app, model_for(cfg.model))
    check_built(built, cfg, app.get("deployments"))


def test_gpu_variant_is_tp2_prefill_tp1_decode():
    raw = yaml.safe_load((DEPLOY / "serve-gpu.yaml").read_text())
    cfg = AppConfig.from_dict(raw["applications"][0]["args"])
    assert (cfg.mode, cfg.prefill.tp, cfg.decode.tp, cfg.dtype) == \
        ("disaggregated", 2, 1, "bfloat16")


@pytest.mark.parametrize("path", SERVE_CONFIGS + CLUSTER_CONFIGS,
                         ids=_ids(SERVE_CONFIGS + CLUSTER_CONFIGS))
def test_tp_degrees_fit_the_named_model(path: Path, model_for):
    from pdserve.workers.config import ModelConfig

    cfg = AppConfig.from_dict(_args(yaml.safe_load(path.read_text())))
    name = Path(cfg.model or "").name
    heads = KNOWN_HEADS.get(name)
    if heads is None:
        mc = ModelConfig.from_path(model_for(cfg.model))
        heads = (mc.num_heads, mc.num_kv_heads)
    cfg.check_model(*heads)


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=_ids(CLUSTER_CONFIGS))
def test_cluster_config_loads_and_builds(path: Path, model_for):
    cfg = AppConfig.from_yaml(path)
    entry = {"name": "pdserve", "import_path": "pdserve.cluster.app:build_app",
             "args": cfg.to_dict()}
    check_built(build_from_config(entry, model_for(cfg.model)), cfg)


def test_a_wrong_cluster_config_is_refused(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((DEPLOY / "cluster-default.yaml").read_text().replace("prefill:", "prefil:"))
    with pytest.raises(ConfigError, match="prefil"):
        AppConfig.from_yaml(bad)
