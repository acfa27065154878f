"""Engine API: streaming generate, cancellation, errors a user can act on, offline LLM, CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from pdserve.workers.async_engine import AsyncEngine
from pdserve.workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.workers.engine import Engine
from pdserve.workers.llm import LLM
from pdserve.workers.request import SamplingParams
from pdserve.workers.scheduler import QueueFull


def engine(path, **sched) -> Engine:
    return Engine(EngineConfig(ModelConfig.from_path(path), CacheConfig(num_blocks=64),
                               SchedulerConfig(**sched)))


async def test_async_streaming_and_cancel_frees_blocks(tiny_llama):
    ae = AsyncEngine(engine(tiny_llama))
    try:
        sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

        async def collect(p):
            toks = []
            async for o in ae.generate(p, sp):
                toks += o.new_token_ids
            return toks

        outs = await asyncio.gather(*(collect([5, 6, 7, i]) for i in range(4)))
        assert all(len(t) == 10 for t in outs)
        ref = Engine(ae.engine.config)
        r = ref.add_request([5, 6, 7, 0], sp)
        while ref.has_work:
            ref.step()
        assert outs[0] == r.output_ids

        long = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
        gen = ae.generate([1, 2, 3], long)
        await gen.__anext__()
        await gen.aclose()  # the client went away
        for _ in range(100):
            if ae.call(lambda e: e.blocks.num_free) == 64:
                break
            await asyncio.sleep(0.02)
        assert ae.call(lambda e: (e.blocks.num_free, e.has_work)) == (64, False)
    finally:
        ae.shutdown()


def test_bad_inputs_raise_clear_errors(tiny_llama, tmp_path):
    e = engine(tiny_llama, max_waiting=2)
    with pytest.raises(ValueError, match="empty"):
        e.add_request([], SamplingParams())
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 384\)"):
        e.add_request([100000], SamplingParams())
    with pytest.raises(ValueError, match="KV blocks"):
        e.add_request([1] * 2000, SamplingParams())
    e.add_request([1], SamplingParams())
    e.add_request([1], SamplingParams())
    with pytest.raises(QueueFull):
        e.add_request([1], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ModelConfig.from_path(tmp_path / "nope")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="supports LlamaForCausalLM"):
        ModelConfig.from_path(tmp_path / "gpt")
    with pytest.raises(ValueError, match="role"):
        SchedulerConfig(role="both")


def test_offline_llm_stop_strings_and_seeds(tiny_llama):
    llm = LLM(str(tiny_llama), num_blocks=128)
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    full = llm.generate(["The quick"], greedy)[0]
    assert full.text == tok.decode(full.token_ids) and len(full.token_ids) == 12
    stop = full.text[4:7]
    cut = llm.generate(["The quick"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                     stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    a = llm.generate(["The quick", "Un café"], seeded)
    b = llm.generate(["Un café", "x", "The quick"], seeded)
    assert a[0].token_ids == b[2].token_ids and a[1].token_ids == b[0].token_ids


def test_cli_generate(tiny_llama):
    out = subprocess.run(
        [sys.executable, "-m", "pdserve.cluster.cli", "generate", "--model", str(tiny_llama),
         "--prompt", "The quick", "--max-tokens", "12", "--temperature", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    llm = LLM(str(tiny_llama), num_blocks=64)
    ref = llm.generate(["The quick"], SamplingParams(max_tokens=12, temperature=0))[0].text
    assert out.stdout.rstrip("\n") == ref
    bad = subprocess.run([sys.executable, "-m", "pdserve.cluster.cli", "generate", "--model",
                          "/nonexistent", "--prompt", "x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no such folder" in bad.stderr
