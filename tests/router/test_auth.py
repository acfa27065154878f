"""API keys, the admin token, and the config's refusal to expose an unauthenticated server."""

from __future__ import annotations

import pytest
from pdserve.cluster.config import AppConfig, ConfigError
from pdserve.router.auth import Auth, bearer
from pdserve.router.errors import Forbidden, Unauthenticated


def test_bearer_parsing():
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer   abc  ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer("Bearer") is None
    assert bearer(None) is None and bearer("") is None


def test_keys_checked():
    a = Auth(["k1", "k2"])
    a.check_key("Bearer k1")
    a.check_key("Bearer k2")
    with pytest.raises(Unauthenticated, match="missing API key"):
        a.check_key(None)
    for bad in ("Bearer k3", "Bearer k1 ", "Bearer k", "Token k1"):
        with pytest.raises(Unauthenticated):
            a.check_key(bad + "x" if bad.endswith(" ") else bad)
    assert not a.open and Auth([]).open
    Auth([]).check_key(None)  # no keys: open


def test_admin_token_is_separate_from_api_keys():
    a = Auth(["k1"], admin_token="adm")
    a.check_admin("Bearer adm")
    with pytest.raises(Unauthenticated, match="admin token"):
        a.check_admin("Bearer k1")
    with pytest.raises(Forbidden, match="disabled"):
        Auth(["k1"]).check_admin("Bearer k1")
    assert Forbidden.status == 403 and Unauthenticated.status == 401


def test_keys_and_token_from_environment(monkeypatch):
    monkeypatch.setenv("PDSERVE_API_KEYS", " e1, ,e2 ")
    monkeypatch.setenv("PDSERVE_ADMIN_TOKEN", "envadm")
    a = Auth.from_config({"api_keys": ("c1",), "admin_token": None})
    for k in ("c1", "e1", "e2"):
        a.check_key(f"Bearer {k}")
    a.check_admin("Bearer envadm")
    assert Auth.from_config({"api_keys": (), "admin_token": "cfg"})._admin is not None


def test_no_keys_means_loopback_only(monkeypatch):
    monkeypatch.delenv("PDSERVE_API_KEYS", raising=False)
    AppConfig.from_dict({"router": {"host": "127.0.0.1"}})
    AppConfig.from_dict({"router": {"host": "localhost"}})
    AppConfig.from_dict({"router": {"grpc_port": 9000}})  # gRPC binds router.host too
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        with pytest.raises(ConfigError, match="not a loopback address and no API keys"):
            AppConfig.from_dict({"router": {"host": host, "grpc_port": 9000}})
    # explicitly allowed, or with keys (config or environment): fine
    AppConfig.from_dict({"router": {"host": "0.0.0.0", "allow_public_without_keys": True}})
    AppConfig.from_dict({"router": {"host": "0.0.0.0", "grpc_port": 9000, "api_keys": ["k"]}})
    monkeypatch.setenv("PDSERVE_API_KEYS", "k")
    AppConfig.from_dict({"router": {"host": "0.0.0.0", "grpc_port": 9000}})


def test_router_config_values(monkeypatch):
    monkeypatch.delenv("PDSERVE_API_KEYS", raising=False)
    r = AppConfig.from_dict({"router": {"api_keys": "a, b"}}).router
    assert r.api_keys == ("a", "b")
    for bad, fragment in [({"max_queue": -1}, "max_queue"), ({"retry_after_s": 0}, "retry_after_s"),
                          ({"max_body_bytes": 10}, "max_body_bytes"),
                          ({"request_timeout_s": 0}, "request_timeout_s"),
                          ({"grpc_port": 70000, "api_keys": ["k"]}, "grpc_port")]:
        with pytest.raises(ConfigError, match=fragment):
            AppConfig.from_dict({"router": bad})
