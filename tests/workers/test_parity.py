"""Greedy output equals Hugging Face transformers, token for token, in every engine mode."""

from __future__ import annotations

import pytest
import torch
from helpers import PROMPTS, hf_greedy, smollm2_path
from transformers import AutoTokenizer

from pdserve.workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.workers.engine import Engine
from pdserve.workers.request import SamplingParams

N = 12


def run(path, prompts, n=N, cache=None, sched=None, one_at_a_time=False):
    e = Engine(EngineConfig(ModelConfig.from_path(path), cache or CacheConfig(num_blocks=256),
                            sched or SchedulerConfig()))
    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    outs = []
    if one_at_a_time:
        for p in prompts:
            r = e.add_request(p, sp)
            while e.has_work:
                e.step()
            outs.append(r.output_ids)
    else:
        reqs = [e.add_request(p, sp) for p in prompts]
        while e.has_work:
            e.step()
        outs = [r.output_ids for r in reqs]
    e.blocks.check_invariants()
    assert e.blocks.num_free == e.blocks.num_blocks, "blocks leaked after all requests finished"
    return outs, e


def encode(path, prompts=PROMPTS):
    tok = AutoTokenizer.from_pretrained(str(path))
    return [tok(p)["input_ids"] for p in prompts]


ARCHS = [
    ("llama", dict()),  # GQA 4/2, tied
    ("llama", dict(num_heads=4, num_kv_heads=1, tie=False)),  # MQA, untied
    ("qwen2", dict(tie=False)),  # qkv bias
    ("mistral", dict(num_heads=6, num_kv_heads=2, tie=False)),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
]


@pytest.mark.parametrize("arch,kw", ARCHS, ids=lambda a: str(a) if isinstance(a, str) else "")
def test_batched_greedy_matches_hf(tiny_model_factory, arch, kw):
    path = tiny_model_factory(arch, **kw)
    ids = encode(path)
    assert len(ids) >= 8 and len({len(i) for i in ids}) >= 6
    ref = hf_greedy(path, ids, N)
    got, _ = run(path, ids)
    assert got == ref


def test_modes_give_identical_outputs(tiny_llama):
    ids = encode(tiny_llama)
    ref = hf_greedy(tiny_llama, ids, N)
    # alone, one request at a time
    assert run(tiny_llama, ids, one_at_a_time=True)[0] == ref
    # chunked prefill with a small budget (prompts split across steps, mixed with decodes)
    chunked = SchedulerConfig(max_num_batched_tokens=24, chunked_prefill=True)
    assert run(tiny_llama, ids, sched=chunked)[0] == ref
    # no chunking, no packing: one prompt per step
    plain = SchedulerConfig(chunked_prefill=False, packed_prefill=False)
    assert run(tiny_llama, ids, sched=plain)[0] == ref
    # a tiny pool forces preemption by recompute: just enough blocks for the longest request
    need = max(-(-(len(i) + N) // 16) for i in ids) + 1
    got, e = run(tiny_llama, ids, cache=CacheConfig(num_blocks=need), n=N)
    assert e.scheduler.num_preemptions > 0, "the tiny pool should have forced preemption"
    assert got == ref


def test_block_size_variants(tiny_llama):
    ids = encode(tiny_llama)[:4]
    ref = hf_greedy(tiny_llama, ids, N)
    for bs in (1, 8, 32):
        assert run(tiny_llama, ids, cache=CacheConfig(block_size=bs, num_blocks=4096 // bs))[0] == ref


def test_prefill_role_returns_first_token_and_holds_blocks(tiny_llama):
    ids = encode(tiny_llama)[:4]
    ref = hf_greedy(tiny_llama, ids, 1)
    e = Engine(EngineConfig(ModelConfig.from_path(tiny_llama), CacheConfig(num_blocks=64),
                            SchedulerConfig(role="prefill")))
    reqs = [e.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)) for p in ids]
    outs = []
    while e.has_work:
        outs += e.step()
    assert [r.output_ids for r in reqs] == ref
    assert all(o.finish_reason == "prefilled" for o in outs)
    assert e.blocks.num_free < e.blocks.num_blocks  # held for the KV transfer
    for r in reqs:
        e.release(r.request_id)
    assert e.blocks.num_free == e.blocks.num_blocks


def test_abort_frees_blocks(tiny_llama):
    ids = encode(tiny_llama)
    e = Engine(EngineConfig(ModelConfig.from_path(tiny_llama), CacheConfig(num_blocks=128)))
    reqs = [e.add_request(p, SamplingParams(max_tokens=50, temperature=0)) for p in ids]
    e.step()
    e.step()
    for r in reqs[::2]:
        assert e.abort(r.request_id)
    while e.has_work:
        e.step()
    e.blocks.check_invariants()
    assert e.blocks.num_free == e.blocks.num_blocks


@pytest.mark.skipif(smollm2_path() is None, reason="default model not fetched (make setup does it)")
def test_smollm2_matches_hf():
    torch.set_num_threads(2)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(str(path))
    msgs = ["What is the capital of France?", "Write a short poem about the sea."]
    ids = [tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False) for m in msgs]
    ref = hf_greedy(path, ids, 32)
    got, _ = run(path, ids, n=32, cache=CacheConfig(num_blocks=64))
    assert got == ref
