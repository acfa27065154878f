"""Systems under test: generated configs, the vLLM command line, and that stop() leaves no
process of a started server's group behind."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from dataclasses import dataclass

import benchpath  # noqa: F401 - makes benchmarks/ modules importable
import pytest
import vllm_cpu
from servers import (
    NOT_WIRED,
    System,
    SystemUnavailable,
    core_list,
    make_system,
    server_cores,
)


def _make(name, tmp_path, **kw):
    base = {"cpus": 2, "log_dir": tmp_path, "model": None, "model_dir": "/m",
            "dtype": "bfloat16", "max_model_len": 2048, "bench_dir": tmp_path / ".bench",
            "vllm_setup": False, "vllm_eager": False}
    return make_system(name, **{**base, **kw})


def test_pdserve_configs_give_every_layout_the_same_cores(tmp_path):
    d = _make("disagg", tmp_path).config(8123)
    assert d["mode"] == "disaggregated"
    assert d["prefill"]["cpus"] == 1 and d["decode"]["cpus"] == 1
    assert d["prefill"]["replicas"] == 1 and d["decode"]["replicas"] == 1
    assert d["router"] == {"host": "127.0.0.1", "port": 8123}
    c = _make("colocated", tmp_path).config(8123)
    assert c["mode"] == "colocated" and c["colocated"]["replicas"] * c["colocated"]["cpus"] == 2
    assert c["colocated"]["chunked_prefill"] is True
    one = _make("colocated-1x2", tmp_path).config(8123)["colocated"]
    assert (one["replicas"], one["cpus"]) == (1, 2)
    # the same KV memory in all: 2 instances x 1 GiB, or 1 x 2 GiB
    assert d["prefill"]["kv_cache_memory"] + d["decode"]["kv_cache_memory"] == 2 << 30
    assert one["kv_cache_memory"] == 2 << 30


def test_pdserve_config_is_valid_for_pdserve(tmp_path):
    from pdserve.cluster.config import AppConfig

    for name in ("disagg", "colocated", "colocated-1x2"):
        cfg = AppConfig.from_dict(_make(name, tmp_path, model="/some/model").config(9000))
        assert sum(p.cpus * p.replicas for p in cfg.pools.values()) == 2
        assert cfg.dtype == "bfloat16" and cfg.model == "/some/model"


def test_pdserve_command_writes_its_config(tmp_path):
    s = _make("disagg", tmp_path)
    cmd, env = s.command(8555)
    assert cmd[1:4] == ["-m", "pdserve.cluster.cli", "up"]
    assert cmd[cmd.index("--port") + 1] == "8555"
    assert (tmp_path / "disagg-config.yaml").exists()
    assert "PDSERVE_API_KEYS" not in env


def test_vllm_command_follows_the_recipe(tmp_path):
    cmd, env = vllm_cpu.serve_command(tmp_path, "/models/smol", 8001, "0-1", 4096)
    assert cmd[0] == str(vllm_cpu.venv_python(tmp_path))
    assert cmd[1].endswith("benchmarks/vllm_cpu.py") and cmd[2:4] == ["serve", "/models/smol"]
    for flag, value in (("--dtype", "bfloat16"), ("--max-model-len", "4096"),
                        ("--port", "8001"), ("--host", "127.0.0.1")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--no-enable-prefix-caching" in cmd and "--enforce-eager" not in cmd
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["HF_HUB_OFFLINE"] == "1"
    assert "--enforce-eager" in vllm_cpu.serve_command(tmp_path, "/m", 1, "0-3", 2048, True)[0]


def test_vllm_is_skipped_not_installed_when_setup_is_off(tmp_path):
    s = _make("vllm", tmp_path)
    with pytest.raises(vllm_cpu.SetupFailed, match="not set up"):
        s.prepare()
    assert not vllm_cpu.venv_dir(tmp_path / ".bench").exists()


def test_version_patch_maps_vllm_to_vllm_cpu(monkeypatch):
    import importlib.metadata as md

    calls = []
    monkeypatch.setattr(md, "version", lambda name: calls.append(name) or "0.32.0")
    vllm_cpu._patch_version_lookup()
    assert md.version("vllm") == "0.32.0+cpu"
    assert md.version("torch") == "0.32.0"
    assert calls == ["vllm-cpu", "torch"]


def test_unwired_and_unknown_systems(tmp_path):
    for name in NOT_WIRED:
        with pytest.raises(SystemUnavailable):
            _make(name, tmp_path)
    with pytest.raises(ValueError, match="unknown system"):
        _make("sglang", tmp_path)
    with pytest.raises(SystemUnavailable):
        _make("disagg", tmp_path, cpus=1)


def test_server_cores():
    avail = sorted(os.sched_getaffinity(0))
    assert server_cores(len(avail)) is None
    if len(avail) > 1:
        assert server_cores(1) == {avail[0]}
    assert core_list(None, 2) == "0-1"
    assert core_list({2, 3, 4}, 3) == "2-4"
    assert core_list({0, 2}, 2) == "0,2"


# A stand-in server: prints a ready line, answers /v1/models, and starts a grandchild that
# would outlive it if stop() only signalled the leader.
_FAKE = textwrap.dedent("""
    import http.server, subprocess, sys, json
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print("child", child.pid, flush=True)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "fake"}]}).encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    srv = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
    print("fake ready", flush=True)
    srv.serve_forever()
""")


@dataclass
class FakeSystem(System):
    ready_line: str | None = "fake ready"
    start_timeout_s: float = 30.0

    @property
    def label(self) -> str:
        return "fake"

    def command(self, port):
        return [sys.executable, "-c", _FAKE, str(port)], dict(os.environ)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_start_waits_for_ready_and_stop_ends_the_whole_group(tmp_path):
    s = FakeSystem("fake", 2, tmp_path)
    base = s.start()
    assert base.startswith("http://127.0.0.1:")
    leader = s.proc.pid
    child = int(next(line.split()[1] for line in s.log_text().splitlines()
                     if line.startswith("child")))
    assert _alive(child)
    # SIGTERM ends the leader at once; its child lives on until stop() signals the group.
    s.stop(timeout_s=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(leader) and not _alive(child)
    assert s.proc is None
    s.stop()  # idempotent


def test_a_server_that_dies_while_starting_is_reported(tmp_path):
    @dataclass
    class Dying(FakeSystem):
        def command(self, port):
            return [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], dict(os.environ)

    s = Dying("dying", 2, tmp_path)
    with pytest.raises(SystemUnavailable, match="exited with 3"):
        s.start()
    assert s.proc is None
