"""Engine parity with the Triton kernels: a tiny Llama's greedy output under
``PDSERVE_KERNELS=triton`` (interpreter on CPU) equals the torch-kernel engine and HF."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:  # tests/conftest.py normally does this
    sys.path.insert(0, TESTS)

from tiny_models import make_model  # noqa: E402

from pdserve.kernels import attention, kv_store, rmsnorm, rope  # noqa: E402
from pdserve.workers.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from pdserve.workers.engine import Engine  # noqa: E402
from pdserve.workers.request import SamplingParams  # noqa: E402

MAX_TOKENS = 8
LAUNCHERS = [
    (attention, "_paged_decode_attention_triton"),
    (attention, "_varlen_prefill_attention_triton"),
    (kv_store, "_store_kv_triton"),
    (rmsnorm, "_add_rmsnorm_triton"),
    (rope, "_apply_rope_triton"),
]


def _engine_outputs(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    e = Engine(EngineConfig(ModelConfig.from_path(path), cache=CacheConfig(num_blocks=64)))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    reqs = [e.add_request(p, params) for p in prompts]
    while e.has_work:
        e.step()
    return [list(r.output_ids) for r in reqs]


def _hf_outputs(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            for _ in range(MAX_TOKENS):
                nxt = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            outs.append(ids[0, len(p):].tolist())
    return outs


def _counted(fn, name, calls):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def test_engine_triton_matches_torch_and_hf(tmp_path, monkeypatch):
    path = make_model(tmp_path / "m", "llama")
    gen = torch.Generator().manual_seed(0)
    # 13 tokens: decode crosses the 16-token block boundary; 21: the prompt spans two blocks
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (13, 21)]
    monkeypatch.setenv("PDSERVE_KERNELS", "torch")
    ref = _engine_outputs(path, prompts)
    calls = {name: 0 for _, name in LAUNCHERS}
    for module, name in LAUNCHERS:  # count launches: the Triton path really ran
        monkeypatch.setattr(module, name, _counted(getattr(module, name), name, calls))
    monkeypatch.setenv("PDSERVE_KERNELS", "triton")
    got = _engine_outputs(path, prompts)
    assert all(calls.values()), calls
    assert got == ref
    assert ref == _hf_outputs(path, prompts)
    assert all(len(o) == MAX_TOKENS for o in got)
