"""pdserve on a real multi-node Ray cluster: three "hosts" made of network namespaces
(``deploy/netns.py``), the prefill pool on the head, one decode replica on each of the two
worker hosts, ``pdserve up --address`` run inside the head namespace, and this test process
talking HTTP to the router over the bridge.

    h0 (head): Ray head, Serve controller + proxy, router, prefill, redis, `pdserve up`
    h1:        decode replica A            h2: decode replica B

What it proves: greedy outputs across hosts equal the single engine's; the KV really crossed
hosts (the channel's rendezvous address is a decode host's, and a TCP connection from the
prefill host to it is established inside the decode namespace); losing a whole decode host
mid-stream loses no stream, and Serve puts the replica back once the host returns; losing
both decode hosts ends every stream with a timeout error within its deadline (never a hang),
and service resumes when they return. Needs root and iproute2; skips with the reason
otherwise (the placement-config test needs neither).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from pdserve.workers.llm import LLM
from pdserve.workers.request import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy"))
import netns

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

KEY = "sk-multinode"
ADMIN = "adm-multinode"
HTTP_PORT = 8000  # inside the head's fresh namespace nothing else listens

# A Ray driver inside the head namespace (this process belongs to the suite's local Ray, not
# this cluster): for each line on stdin it asks every live replica for its address, pid, load
# and transfer log, and prints one JSON line. Long-lived, so a probe takes milliseconds.
_PROBE = """
import json, sys, ray
from ray import serve
from pdserve.cluster.metadata import MetadataStore
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
store = MetadataStore(sys.argv[2])
for _ in sys.stdin:
    out = {}
    for role in ("prefill", "decode"):
        h = serve.get_deployment_handle(role, app_name="pdserve")
        for i in store.live_instances(role):
            try:
                info = h.info.remote(target=i).result(timeout_s=30)
                st = h.stats.remote(target=i).result(timeout_s=30)
                tr = h.transfers.remote(target=i).result(timeout_s=30)
                out[i] = {"role": role, "host": info.host, "pid": st.pid, "running": st.running,
                          "transfers": tr}
            except Exception as e:
                out[i] = {"role": role, "error": repr(e)}
    print("PROBE " + json.dumps(out), flush=True)
"""


class MultiNode:
    def __init__(self, cluster: netns.NetnsCluster, url: str, redis_url: str, log: Path) -> None:
        self.c = cluster
        self.url = url
        self.redis_url = redis_url
        self.log = log
        self._probe: subprocess.Popen | None = None

    @property
    def decode_hosts(self) -> list[netns.Host]:
        return self.c.hosts[1:]

    def store(self):
        from pdserve.cluster.metadata import MetadataStore

        return MetadataStore(self.redis_url)

    def probe(self) -> dict:
        """{instance id: {role, host, pid, running, transfers}} of every live replica."""
        if self._probe is None or self._probe.poll() is not None:
            err = (self.c.dir / "probe.log").open("a")
            self._probe = self.c.exec(self.c.head, [str(netns.BIN / "python"), "-c", _PROBE,
                                                    self.c.ray_address, self.redis_url],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=err, text=True)
            err.close()
        self._probe.stdin.write("\n")
        self._probe.stdin.flush()
        for line in self._probe.stdout:
            if line.startswith("PROBE "):
                return json.loads(line[6:])
        log = (self.c.dir / "probe.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"the probe driver exited ({self._probe.wait()}):\n{log}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def wait_ready(self, prefill: int, decode: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        store = self.store()
        while True:
            try:
                ok = httpx.get(f"{self.url}/health", timeout=2).status_code == 200
                ok = ok and len(store.live_instances("prefill")) >= prefill \
                    and len(store.live_instances("decode")) >= decode
            except Exception:  # noqa: BLE001 - HTTP or Redis not up yet
                ok = False
            if ok:
                return
            assert time.monotonic() < deadline, \
                f"pdserve not ready in {timeout_s:.0f} s; its log:\n{self.log_tail()}"
            time.sleep(1)


def _redis_url(log: Path, host: str, up: subprocess.Popen, timeout_s: float = 240) -> str:
    """The Redis URL `pdserve up` prints once it has deployed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and up.poll() is None:
        for line in log.read_text(errors="replace").splitlines():
            if line.strip().startswith("Redis:"):
                url = line.split("Redis:", 1)[1].strip()
                assert f"@{host}:" in url, f"Redis is not on the head's cluster address: {url}"
                return url
        time.sleep(1)
    raise AssertionError(f"pdserve up did not come up:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def mn(cluster_model):
    reason = netns.why_unavailable()
    if reason:
        pytest.skip(f"multi-node tests build hosts from network namespaces: {reason}")
    netns.sweep_stale()
    c = netns.NetnsCluster([{"node_head": 1, "node_prefill": 1}, {"node_decode": 1},
                            {"node_decode": 1}], num_cpus=[2, 2, 2])
    try:
        c.build().start()
        head = c.head.addr
        cfg = {
            "model": str(cluster_model), "dtype": "float32",
            "router": {"host": head, "port": HTTP_PORT, "api_keys": [KEY], "admin_token": ADMIN,
                       "retries": 3, "resources": {"node_head": 0.01}},
            "prefill": {"cpus": 0.5, "num_blocks": 512, "max_num_batched_tokens": 4096,
                        "resources": {"node_prefill": 1}},
            # one decode replica per worker host: each has one unit of node_decode
            "decode": {"replicas": 2, "cpus": 0.5, "num_blocks": 512,
                       "resources": {"node_decode": 1}},
        }
        path = c.dir / "cluster.yaml"
        path.write_text(yaml.safe_dump(cfg))
        log = c.dir / "pdserve-up.log"
        with log.open("w") as f:
            # no --redis-url: joining a cluster, `pdserve up` starts Redis on this node's
            # cluster address (with a password), which the other hosts' replicas must reach
            up = c.exec(c.head, [str(netns.BIN / "pdserve"), "up", "--address", c.ray_address,
                                 "--config", str(path)], stdout=f, stderr=subprocess.STDOUT)
        m = MultiNode(c, f"http://{head}:{HTTP_PORT}", _redis_url(log, head, up), log)
        m.wait_ready(1, 2, 300)
        yield m
    finally:
        c.close()


@pytest.fixture(scope="module")
def ref(cluster_model):
    llm = LLM(str(cluster_model), num_blocks=1024)

    def run(prompts, n):
        sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return [c.text for c in llm.generate(prompts, sp)]

    return run


def prompts(k: int, seed: int = 0) -> list[list[int]]:
    return [[(seed * 13 + 5 * i + j) % 300 + 3 for j in range(9 + 7 * i)] for i in range(k)]


def _auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


async def stream(c: httpx.AsyncClient, url: str, prompt, n: int, on_token=None) -> str:
    out = []
    async with c.stream("POST", f"{url}/v1/completions", headers=_auth(),
                        json={"prompt": prompt, "max_tokens": n, "temperature": 0,
                              "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                d = json.loads(line[6:])
                assert "error" not in d, d
                out.append(d["choices"][0]["text"])
                if on_token:
                    on_token()
    return "".join(out)


async def complete_all(url: str, ps, n: int) -> list[str]:
    async with httpx.AsyncClient(timeout=120) as c:
        async def one(p):
            r = await c.post(f"{url}/v1/completions", headers=_auth(),
                             json={"prompt": p, "max_tokens": n, "temperature": 0,
                                   "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        return await asyncio.gather(*(one(p) for p in ps))


def test_outputs_across_hosts_equal_single_engine(mn, ref):
    ps = prompts(8)
    assert asyncio.run(complete_all(mn.url, ps, 24)) == ref(ps, 24)


def test_kv_transfer_crossed_hosts(mn):
    asyncio.run(complete_all(mn.url, prompts(4, seed=1), 4))
    state = mn.probe()
    pre = [v for v in state.values() if v["role"] == "prefill"]
    dec = {v["host"]: v for v in state.values() if v["role"] == "decode"}
    assert len(pre) == 1 and "error" not in pre[0], state
    # placement: prefill on the head's host, one decode replica on each worker host
    assert pre[0]["host"] == mn.c.head.addr
    assert sorted(dec) == sorted(h.addr for h in mn.decode_hosts), state
    sends = [t for t in pre[0]["transfers"] if t["side"] == "send"]
    assert sends, "the prefill instance logged no transfer"
    for t in sends:
        # the channel's rendezvous (the decode side's store) sits on a decode host
        assert t["host"] == mn.c.head.addr and t["channel"].rsplit(":", 1)[0] in dec, t
        assert t["bytes"] > 0
    for host, d in dec.items():
        recvs = [t for t in d["transfers"] if t["side"] == "recv"]
        for t in recvs:
            assert t["host"] == host and t["channel"].startswith(f"{host}:"), t
    # and the wire agrees: inside a decode host, an established TCP connection from the
    # prefill host to the port the channel's store listens on
    used = {t["channel"] for t in sends}
    seen = set()
    for h in mn.decode_hosts:
        ss = mn.c.run(h, ["ss", "-Htn", "state", "established"]).stdout.split("\n")
        for line in ss:
            parts = line.split()
            if len(parts) >= 4 and parts[-2] in used and parts[-1].startswith(f"{mn.c.head.addr}:"):
                seen.add(parts[-2])
    assert seen, f"no established connection from {mn.c.head.addr} to any of {used}"


def test_losing_a_decode_host_mid_stream(mn, ref):
    """SIGKILL everything on one decode host (raylet, replica: the node is gone) while 8
    streams run; every stream completes token-exact on the other host's replica. Then the host
    comes back and Serve schedules the lost replica on it again."""
    mn.probe()  # the probe driver is up before the streams start
    ps = prompts(8, seed=2)
    n = 300
    seen = {"n": 0}

    def tick():
        seen["n"] += 1

    async def run():
        async with httpx.AsyncClient(timeout=300) as c:
            tasks = [asyncio.create_task(stream(c, mn.url, p, n, tick)) for p in ps]
            deadline = time.monotonic() + 120
            while seen["n"] < 8 * 5:
                assert time.monotonic() < deadline, "streams did not start"
                await asyncio.sleep(0.05)
            # the host of the decode replica running the most streams
            state = await asyncio.to_thread(mn.probe)
            victim = max((i for i, v in state.items() if v["role"] == "decode"),
                         key=lambda i: state[i].get("running", -1))
            assert state[victim]["running"] > 0, state
            host = mn.c.host_of(state[victim]["host"])
            t = time.monotonic()
            await asyncio.to_thread(mn.c.kill_host, host)
            got = await asyncio.wait_for(asyncio.gather(*tasks), 240)
            return got, time.monotonic() - t, victim, host

    got, took, victim, victim_host = asyncio.run(run())
    assert got == ref(ps, n)
    stats = httpx.get(f"{mn.url}/admin/stats", headers={"Authorization": f"Bearer {ADMIN}"},
                      timeout=10).json()
    assert stats["orchestrator"]["recoveries"] > 0, stats  # the lost host did hold streams
    # capacity returns: a fresh Ray node on the host; Serve reschedules the lost replica there
    mn.c.start_host(victim_host)
    mn.c.wait_nodes(3, 120)
    deadline = time.monotonic() + 240
    store = mn.store()
    while True:
        live = store.live_instances("decode")
        if len(live) == 2 and victim not in live:
            break
        assert time.monotonic() < deadline, f"decode replica not back: {live}\n{mn.log_tail()}"
        time.sleep(1)
    after = mn.probe()
    assert sorted(v["host"] for v in after.values() if v["role"] == "decode") == \
        sorted(h.addr for h in mn.decode_hosts), after
    ps2 = prompts(6, seed=3)
    assert asyncio.run(complete_all(mn.url, ps2, 12)) == ref(ps2, 12)
    print(f"node loss: 8/8 streams completed {took:.1f} s after the kill")


def test_no_decode_capacity_left_fails_clearly_then_recovers(mn, ref):
    """Both decode hosts lost mid-stream: no replica can take the requests over, so each stream
    ends with a timeout error within its deadline (no hang, no wrong token before it); once the
    hosts return, Serve restores both replicas and requests are served exactly again."""
    store = mn.store()
    before = set(store.live_instances("decode"))
    assert len(before) == 2
    ps = prompts(4, seed=4)
    n, limit_s = 300, 20
    seen = {"n": 0}
    expect = ref(ps, n)

    async def one(c, p):
        text, err = [], None
        async with c.stream("POST", f"{mn.url}/v1/completions",
                            headers={**_auth(), "X-Request-Timeout": str(limit_s)},
                            json={"prompt": p, "max_tokens": n, "temperature": 0,
                                  "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    d = json.loads(line[6:])
                    if "error" in d:
                        err = d["error"]
                        break
                    text.append(d["choices"][0]["text"])
                    seen["n"] += 1
        return "".join(text), err

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            tasks = [asyncio.create_task(one(c, p)) for p in ps]
            deadline = time.monotonic() + 120
            while seen["n"] < 4 * 5:
                assert time.monotonic() < deadline, "streams did not start"
                await asyncio.sleep(0.05)
            for h in mn.decode_hosts:
                await asyncio.to_thread(mn.c.kill_host, h)
            t = time.monotonic()
            got = await asyncio.wait_for(asyncio.gather(*tasks), limit_s + 30)
            return got, time.monotonic() - t

    got, took = asyncio.run(run())
    assert took < limit_s + 10, f"streams took {took:.0f} s to end after the decode hosts died"
    for (text, err), want in zip(got, expect):
        assert want.startswith(text)  # whatever was streamed was right
        if text != want:  # cut short: then it says why
            assert err is not None and "time limit" in err["message"], err
    assert any(err is not None for _, err in got), "every stream finished without decode hosts?"
    for h in mn.decode_hosts:
        mn.c.start_host(h)
    mn.c.wait_nodes(3, 120)
    deadline = time.monotonic() + 240
    while True:
        live = set(store.live_instances("decode"))
        if len(live) == 2 and not live & before:
            break
        assert time.monotonic() < deadline, f"decode replicas not back: {live}\n{mn.log_tail()}"
        time.sleep(1)
    ps2 = prompts(6, seed=5)
    assert asyncio.run(complete_all(mn.url, ps2, 12)) == ref(ps2, 12)
    print(f"no capacity: streams ended with an error {took:.1f} s after the kill")


def test_placement_config_reaches_ray_actor_options(cluster_model, monkeypatch):
    """deploy/netns-cluster.yaml's per-pool resources and labels end up in each replica's Ray
    actor options (bundle 0 of a TP replica's placement group); no Ray cluster needed."""
    from pdserve.cluster.app import build_app
    from pdserve.cluster.config import AppConfig, ConfigError
    from ray.serve._private.build_app import build_app as serve_build

    monkeypatch.setenv("PDSERVE_API_KEYS", "sk-x")  # the example serves beyond loopback
    path = Path(__file__).resolve().parents[2] / "deploy" / "netns-cluster.yaml"
    raw = {**yaml.safe_load(path.read_text()), "model": str(cluster_model)}
    raw["decode"] = {**raw["decode"], "node_labels": {"zone": "b"}}
    raw["prefill"] = {**raw["prefill"], "tp": 2}
    deps = {d.name: d for d in serve_build(build_app(raw), name="x").deployments}
    assert deps["decode"].ray_actor_options["resources"] == {"node_decode": 1}
    assert deps["decode"].ray_actor_options["label_selector"] == {"zone": "b"}
    assert deps["decode"].num_replicas == 2
    assert deps["router"].ray_actor_options["resources"] == {"node_head": 0.01}
    bundles = deps["prefill"]._replica_config.placement_group_bundles
    assert bundles[0] == {"CPU": 1, "node_prefill": 1} and bundles[1] == {"CPU": 1}
    with pytest.raises(ConfigError, match="custom resource"):
        AppConfig.from_dict({"decode": {"resources": {"CPU": 2}}})
