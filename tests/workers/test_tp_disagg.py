"""Disaggregated instances with tensor parallelism, wired directly (Ray only for the TP ranks):
every prefill rank pushes its KV heads layer by layer to the decode ranks that own them, and
decoding continues token-exact, for prefill TP=p to decode TP=d with p != d, uneven head
splits and replicated KV heads. A stalled transfer frees the blocks on both sides and the pair
recovers.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from pdserve.workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.workers.engine import Engine
from pdserve.workers.instance import Instance, TransferFailed
from pdserve.workers.messages import Job
from pdserve.workers.parallel import ParallelConfig
from pdserve.workers.request import SamplingParams
from pdserve.workers.tp_engine import TPEngine

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300)]

SP = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = [[(5 * i + j) % 300 + 3 for j in range(1 + 13 * i)] for i in range(5)]


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    torch.set_num_threads(1)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


class DirectPeers:
    """``Instance.peers`` straight to a decode instance in this process, by rank."""

    def __init__(self, decode: Instance) -> None:
        self.decode = decode

    def open_channel(self, peer, src):
        return self.decode.open_channel(src, peer.rank)

    def expect(self, desc, src, layout):
        self.decode.expect(desc.request_id, src, layout)


def instance(path, role: str, tp: int, name: str, peers=None, timeout: float = 5.0) -> Instance:
    cfg = EngineConfig(ModelConfig.from_path(path), CacheConfig(num_blocks=64),
                       SchedulerConfig(role=role))
    engine = None
    if tp > 1:
        engine = TPEngine(cfg, ParallelConfig(tp=tp, cpus_per_rank=0.5, timeout_s=10.0,
                                              startup_timeout_s=60.0))
    return Instance(cfg, name, transfer_timeout_s=timeout, peers=peers, engine=engine)


def close(*insts: Instance) -> None:
    for inst in insts:
        inst.shutdown()
        if isinstance(inst.engine, TPEngine):
            inst.engine.close()


async def run(pre: Instance, dec: Instance, rid: str, prompt) -> list[int]:
    job = Job(rid, prompt, SP)
    desc = dec.reserve(job)
    res = await pre.prefill(job, desc)
    toks = [res.first_token]
    async for c in dec.generate(rid, res.first_token, res.logprobs):
        toks += c.token_ids
    return toks


def reference(path, prompts):
    e = Engine(EngineConfig(ModelConfig.from_path(path), CacheConfig(num_blocks=256)))
    rs = [e.add_request(p, SP) for p in prompts]
    while e.has_work:
        e.step()
    return [r.output_ids for r in rs]


async def blocks_back(*insts: Instance, limit_s: float = 10.0) -> None:
    for _ in range(int(limit_s / 0.1)):
        if all(i.stats().free_blocks == i.stats().total_blocks for i in insts):
            return
        await asyncio.sleep(0.1)
    raise AssertionError([i.stats() for i in insts])


@pytest.mark.parametrize("shape,p,d", [
    ({"num_heads": 4, "num_kv_heads": 2}, 2, 1),  # both prefill ranks send to decode rank 0
    ({"num_heads": 9, "num_kv_heads": 3}, 1, 2),  # one sender, uneven receivers (1 + 2 heads)
    ({"num_heads": 4, "num_kv_heads": 1, "tie": False}, 2, 1),  # replicated: rank 1 idle
], ids=["gqa-2to1", "uneven-1to2", "replicated-2to1"])
async def test_tp_prefill_to_decode_exact(tiny_model_factory, shape, p, d):
    path = tiny_model_factory("llama", **shape)
    dec = instance(path, "decode", d, f"D-{p}{d}")
    pre = instance(path, "prefill", p, f"P-{p}{d}", DirectPeers(dec))
    try:
        assert (pre.layout.tp_size, dec.layout.tp_size) == (p, d)
        got = await asyncio.gather(*(run(pre, dec, f"r{i}", q) for i, q in enumerate(PROMPTS)))
        assert got == reference(path, PROMPTS)
        await blocks_back(pre, dec)
        sent = sum(t["bytes"] for t in pre.transfer_log if t["side"] == "send")
        recv = sum(t["bytes"] for t in dec.transfer_log if t["side"] == "recv")
        # every head arrives exactly once: the same bytes leave all prefill ranks as arrive
        # at all decode ranks (headers included; no leg moves a head twice)
        assert sent == recv > 0
    finally:
        close(pre, dec)


async def test_tp_stalled_transfer_frees_blocks_on_both_sides_and_recovers(tiny_model_factory):
    path = tiny_model_factory("llama", num_heads=4, num_kv_heads=2)
    dec = instance(path, "decode", 2, "D-stall", timeout=2.0)
    pre = instance(path, "prefill", 2, "P-stall", DirectPeers(dec), timeout=2.0)
    try:
        assert await run(pre, dec, "warm", PROMPTS[1]) == reference(path, PROMPTS[1:2])[0]
        pre.faults["stall_transfer"] = 1  # no rank sends: every decode rank times out
        with pytest.raises(TransferFailed):
            await run(pre, dec, "stalled", PROMPTS[2])
        dec.abort("stalled")
        await blocks_back(pre, dec)
        assert not dec._incoming and not pre._outgoing
        # the channels the timeout broke are rebuilt; output exact again
        assert await run(pre, dec, "after", PROMPTS[3]) == reference(path, PROMPTS[3:4])[0]
        await blocks_back(pre, dec)
    finally:
        close(pre, dec)
