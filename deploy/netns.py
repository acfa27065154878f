"""A multi-node Ray cluster on one machine: each "host" is a Linux network namespace.

    sudo .venv/bin/python deploy/netns.py up --hosts 3     # build, start Ray, wait for Ctrl-C

Topology (addresses are private; no namespace has a default route, so nothing leaves them):

    this namespace                                 namespace <prefix>-h0  (Ray head)
    bridge <br> 10.R.S.1/24 ── veth ───────────────── eth0 10.R.S.10
                            ── veth ───────────────── eth0 10.R.S.11     <prefix>-h1 (worker)
                            ── veth ───────────────── eth0 10.R.S.12     <prefix>-h2 (worker)

The bridge lives in the caller's namespace (under ``make test`` that is the suite's private
``unshare -n`` namespace), so the caller reaches every host over it, e.g. the router's HTTP port
on h0. Ray's processes run inside the namespaces (``ip netns exec``) with the namespace address
as their node address; each node gets its own custom resources (``--resources``), which
``PoolConfig.resources`` asks for to place a pool on a host.

Lifetimes: every name carries the creating process's pid (``pdn<pid>``), so concurrent runs never
collide and leftovers of a dead run can be recognised and removed (``sweep_stale``). ``close()``
kills every process inside our namespaces (``ip netns pids``: never by name, other Ray clusters
on the machine are untouched), deletes the namespaces and the bridge; it runs from ``atexit``
too. Killing a host (``kill_host``) is the same SIGKILL of everything in its namespace: a node
lost at once, raylet and workers together; ``start_host`` brings a fresh Ray node back.

``tc netem`` shaping (``shape``) goes on both ends of a host's veth, so the host's traffic is
delayed and rate-limited in each direction.

Root only (``ip netns add``); ``why_unavailable()`` says why not otherwise.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY_PORT = 6379  # GCS port inside the head's namespace: a fresh namespace has nothing else on it
BIN = Path(sys.executable).parent


def _run(*cmd: str, check: bool = True, ns: str | None = None, **kw) -> subprocess.CompletedProcess:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    return subprocess.run(full, check=check, capture_output=True, text=True, **kw)


def why_unavailable() -> str | None:
    """None when this process can build namespace hosts; otherwise the reason, for a skip."""
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"pdnprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def netem_available() -> bool:
    """Whether the kernel has ``sch_netem`` (some VM kernels ship without it; see
    ``netns_delay.py`` for the user-space stand-in)."""
    probe = f"pdnprobe{os.getpid()}"
    if _run("ip", "netns", "add", probe, check=False).returncode != 0:
        return False
    try:
        return _run("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                    check=False, ns=probe).returncode == 0
    finally:
        _run("ip", "netns", "del", probe, check=False)


def sweep_stale() -> list[str]:
    """Delete namespaces and bridges left by a run whose process is gone (names carry the pid)."""
    removed = []
    out = _run("ip", "netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        pid = name[3:].split("-")[0] if name.startswith("pdn") else ""
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _kill_ns(name)
            _run("ip", "netns", "del", name, check=False)
            removed.append(name)
    for d in Path(tempfile.gettempdir()).glob("pdn*-*"):  # their work dirs (Ray temp dirs)
        pid = d.name[3:].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    for line in _run("ip", "-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        pid = name[4:] if name.startswith("pdbr") else ""
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _run("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed


def _ns_pids(ns: str) -> list[int]:
    """Live (non-zombie) processes in ``ns``."""
    out = _run("ip", "netns", "pids", ns, check=False).stdout
    pids = []
    for p in out.split():
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            pids.append(int(p))
    return pids


def _kill_ns(ns: str, timeout_s: float = 10.0) -> None:
    """SIGKILL every process in ``ns`` until none is left (Ray daemons may still be forking)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = _ns_pids(ns)
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


@dataclass
class Host:
    name: str  # h0, h1, ...
    ns: str  # the network namespace
    addr: str  # its address on the bridge
    veth: str  # the veth end on the bridge (the namespace's end is eth0)
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources
    num_cpus: int = 1


class NetnsCluster:
    """Hosts as network namespaces on a bridge, and a Ray cluster across them.

    ``resources[i]`` are host i's Ray custom resources; host 0 runs the Ray head.
    """

    def __init__(self, resources: list[dict[str, float]], num_cpus: list[int] | None = None,
                 subnet: str | None = None, env: dict[str, str] | None = None) -> None:
        pid = os.getpid()
        self.prefix = f"pdn{pid}"
        self.bridge = f"pdbr{pid}"
        # 10.R.S.0/24 from the pid: distinct across concurrent runs in one namespace
        self.subnet = subnet or f"10.{200 + (pid >> 8) % 50}.{pid % 256}"
        self.gateway = f"{self.subnet}.1"
        self.dir = Path(tempfile.mkdtemp(prefix=f"pdn{pid}-"))
        self.env = dict(env or {})
        self.token = secrets.token_hex(32)
        cpus = num_cpus or [1] * len(resources)
        self.hosts = [Host(f"h{i}", f"{self.prefix}-h{i}", f"{self.subnet}.{10 + i}",
                           f"{self.prefix}v{i}", dict(r), cpus[i])
                      for i, r in enumerate(resources)]
        self._built = False
        self._closed = False
        self._procs: list[subprocess.Popen] = []

    # ---- network ---------------------------------------------------------------------------
    def build(self) -> NetnsCluster:
        atexit.register(self.close)
        self._built = True
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for h in self.hosts:
            _run("ip", "netns", "add", h.ns)
            _run("ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
            _run("ip", "link", "set", h.veth, "master", self.bridge, "up")
            _run("ip", "link", "set", "lo", "up", ns=h.ns)
            _run("ip", "addr", "add", f"{h.addr}/24", "dev", "eth0", ns=h.ns)
            _run("ip", "link", "set", "eth0", "up", ns=h.ns)
        return self

    def shape(self, host: Host, delay_ms: float | None = None, rate: str | None = None) -> None:
        """netem on both ends of ``host``'s link (None, None: remove it). rate e.g. '1gbit'.
        Needs ``sch_netem`` (``netem_available()``); without it use ``netns_delay.DelayLine``."""
        for dev, ns in ((host.veth, None), ("eth0", host.ns)):
            _run("tc", "qdisc", "del", "dev", dev, "root", check=False, ns=ns)
            if delay_ms is None and rate is None:
                continue
            args = ["tc", "qdisc", "add", "dev", dev, "root", "netem"]
            if delay_ms is not None:
                args += ["delay", f"{delay_ms}ms"]
            if rate is not None:
                # a queue deep enough that a rate-limited burst is delayed, never dropped
                args += ["rate", rate, "limit", "100000"]
            _run(*args, ns=ns)

    def link(self, host: Host, up: bool) -> None:
        _run("ip", "link", "set", host.veth, "up" if up else "down")

    def exec(self, host: Host, cmd: list[str], **kw) -> subprocess.Popen:
        """Start ``cmd`` inside ``host``'s namespace with the cluster's environment."""
        p = subprocess.Popen(["ip", "netns", "exec", host.ns, *cmd], env=self.proc_env(), **kw)
        self._procs.append(p)
        return p

    def run(self, host: Host, cmd: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", host.ns, *cmd], env=self.proc_env(),
                              capture_output=True, text=True, timeout=timeout_s, check=False)

    def proc_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        # Multi-node Ray needs "cluster mode" on (a loopback-only local Ray turns it off).
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Token authentication with a token of this cluster's own (Ray turns token mode on by
        # itself when ~/.ray/auth_token exists; every process must then agree on the token).
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = self.token
        env.setdefault("OMP_NUM_THREADS", "1")
        # Find a lost node within ~3 s rather than Ray's default ~15 s.
        env.setdefault("RAY_health_check_period_ms", "1000")
        env.setdefault("RAY_health_check_timeout_ms", "1000")
        env.setdefault("RAY_health_check_failure_threshold", "3")
        return env

    # ---- Ray -------------------------------------------------------------------------------
    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def ray_address(self) -> str:
        return f"{self.head.addr}:{RAY_PORT}"

    def start_host(self, host: Host, timeout_s: float = 180) -> None:
        """``ray start`` on ``host`` (the head for host 0; a worker joining it otherwise)."""
        args = [str(BIN / "ray"), "start", "--node-ip-address", host.addr,
                "--num-cpus", str(int(host.num_cpus)), "--resources", json.dumps(host.resources),
                "--object-store-memory", str(100 << 20), "--disable-usage-stats",
                # a temp dir per node of ours: the machine's /tmp/ray (other clusters'
                # session_latest) is never touched
                "--temp-dir", str(self.dir / f"ray-{host.name}")]
        if host is self.head:
            args += ["--head", "--port", str(RAY_PORT), "--include-dashboard", "false"]
        else:
            args += ["--address", self.ray_address]
        r = self.run(host, args, timeout_s)
        if r.returncode != 0:
            raise RuntimeError(f"ray start on {host.name} failed:\n{r.stdout}\n{r.stderr}")

    def start(self, timeout_s: float = 240) -> NetnsCluster:
        for h in self.hosts:
            self.start_host(h, timeout_s)
        self.wait_nodes(len(self.hosts), timeout_s)
        return self

    def alive_nodes(self) -> list[str]:
        """Node addresses of the live Ray nodes, asked from the GCS over the bridge."""
        code = ("import json;from ray._raylet import GcsClient;"
                f"g=GcsClient(address='{self.ray_address}');"
                "print(json.dumps(sorted(n.node_manager_address for n in "
                "g.get_all_node_info(timeout=10).values() if n.state == 0)))")
        r = self.run(self.head, [str(BIN / "python"), "-c", code], 60)
        if r.returncode != 0:
            return []
        return json.loads(r.stdout.strip().splitlines()[-1])

    def wait_nodes(self, n: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.alive_nodes()) != n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray did not reach {n} live nodes in {timeout_s:.0f} s")
            time.sleep(1)

    def kill_host(self, host: Host) -> None:
        """Lose ``host`` at once: SIGKILL everything in its namespace (raylet, workers)."""
        _kill_ns(host.ns)

    def host_of(self, addr: str) -> Host | None:
        return next((h for h in self.hosts if h.addr == addr), None)

    # ---- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        for h in self.hosts:
            _kill_ns(h.ns)
        for h in self.hosts:
            _run("ip", "netns", "del", h.ns, check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        for p in self._procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.build()

    def __exit__(self, *_) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="A multi-node Ray cluster in network namespaces")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build the hosts, start Ray, wait for Ctrl-C, tear down")
    up.add_argument("--hosts", type=int, default=3)
    up.add_argument("--cpus", type=int, default=1, help="Ray CPUs per host")
    up.add_argument("--delay-ms", type=float, default=None, help="netem delay on every link")
    up.add_argument("--rate", default=None, help="netem rate on every link, e.g. 1gbit")
    sub.add_parser("sweep", help="remove namespaces/bridges of runs that are gone")
    args = ap.parse_args(argv)
    if args.cmd == "sweep":
        print("\n".join(sweep_stale()) or "nothing stale")
        return 0
    reason = why_unavailable()
    if reason:
        print(f"netns: {reason}", file=sys.stderr)
        return 2
    # Ctrl-C or a plain kill, even while starting, tears down (a background job may have
    # SIGINT ignored)
    def stop(*_):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    # as deploy/netns-cluster.yaml expects: prefill on the head, a decode slot on each worker
    res = [{"node_head": 1, "node_prefill": 1}] + [{"node_decode": 1}] * (args.hosts - 1)
    with NetnsCluster(res, [args.cpus] * args.hosts) as c:
        try:
            c.start()
        except KeyboardInterrupt:
            return 1
        if args.delay_ms is not None or args.rate is not None:
            for h in c.hosts:
                c.shape(h, args.delay_ms, args.rate)
        for h in c.hosts:
            print(f"{h.name}: netns {h.ns}  addr {h.addr}  resources {h.resources}")
        print(f"Ray: {c.ray_address}\nrun inside the head, e.g.:\n  ip netns exec {c.head.ns} "
              f"env RAY_AUTH_MODE=token RAY_AUTH_TOKEN={c.token} PDSERVE_API_KEYS=sk-local "
              f"{BIN}/pdserve up --address {c.ray_address} --config deploy/netns-cluster.yaml\n"
              f"  curl -H 'Authorization: Bearer sk-local' http://{c.head.addr}:8000/v1/models\n"
              "Ctrl-C tears everything down.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
