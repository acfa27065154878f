"""``pdserve up``: start (or join) Ray, a Redis child, the Serve app; stop all of it on exit.

Local mode keeps every socket on 127.0.0.1: Ray's node address, the Serve HTTP proxy, the KV
channels and Redis. (``ss -tnp`` while it runs shows no non-loopback address.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    """A ``redis-server`` child on a free port, no persistence: on loopback by default; on a
    multi-node cluster on this node's cluster address, with a password."""

    port: int = 0
    proc: subprocess.Popen | None = None
    dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="pdserve-redis-"))
    host: str = LOOPBACK
    password: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (make setup installs it with apt); "
                               "or pass --redis-url")
        self.port = self.port or free_port(self.host)
        auth = ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen(
            [exe, "--bind", self.host, "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "yes", *auth],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def address_towards(address: str) -> str:
    """This machine's address on the network that reaches ``address`` ("host:port" of a Ray
    head): what other nodes of that cluster reach us at. No packet is sent."""
    host = address.split("://")[-1].rsplit(":", 1)[0]
    if host in ("auto", "localhost") or host.startswith("127."):
        return LOOPBACK
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return probe.getsockname()[0]


def loopback_ray_env() -> None:
    """Make a local Ray keep to 127.0.0.1. Must run before ``ray`` is first imported.

    ``ray.init(_node_ip_address="127.0.0.1")`` is not enough: Ray turns a loopback node address
    into the machine's external one unless "cluster mode" is off, and with an external node
    address its gRPC servers listen on every interface. With cluster mode off the node address
    is 127.0.0.1 and every Ray server binds there (checked with ``ss -tlnp``)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def start_ray(address: str | None, num_cpus: int | None = None) -> None:
    if not address:
        loopback_ray_env()
    import ray

    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 _node_ip_address=LOOPBACK, logging_level="WARNING")


def start_serve(http_host: str, http_port: int, grpc_port: int | None = None) -> None:
    from ray import serve

    kw = {}
    if grpc_port:
        kw["grpc_options"] = {"port": grpc_port, "grpc_servicer_functions": []}
    serve.start(http_options={"host": http_host, "port": http_port, "location": "HeadOnly"}, **kw)


def wait_forever() -> None:
    stop = {"flag": False}

    def _sig(*_):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _sig)
    try:
        while not stop["flag"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
