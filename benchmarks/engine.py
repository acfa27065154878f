"""Engine throughput: pdserve offline vs Hugging Face ``generate`` with padded static batches,
and packed (varlen) vs padded prefill for the same mixed batch. SmolLM2-135M, same threads.

    python benchmarks/engine.py --quick

Last stdout line: one JSON object with ``throughput_ratio_vs_hf`` and
``packed_prefill_speedup`` (and the raw figures). Writes benchmarks/results/engine.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from common import machine, progress, write_result

from pdserve.workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.workers.engine import Engine
from pdserve.workers.model_store import ensure_default_model
from pdserve.workers.request import SamplingParams


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_pdserve(path, prompts, out_len, dtype, max_batched=4096):
    e = Engine(EngineConfig(ModelConfig.from_path(path, dtype), CacheConfig(memory_bytes=2 << 30, prefix_caching=False),
                            SchedulerConfig(max_num_batched_tokens=max_batched)))
    warm = e.add_request(prompts[0][:32], SamplingParams(max_tokens=2, temperature=0))
    while e.has_work:
        e.step()
    sp = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    reqs = [e.add_request(p, sp) for p in prompts]
    steps = 0
    while e.has_work:
        e.step()
        steps += 1
    dt = time.perf_counter() - t0
    del warm
    return dt, [r.output_ids for r in reqs], e


def run_hf(path, prompts, out_len, batch):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.generation_config.pad_token_id = 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        model.generate(ids, attention_mask=mask, max_new_tokens=out_len, min_new_tokens=out_len,
                       do_sample=False, eos_token_id=None)
    return time.perf_counter() - t0


def prefill_time(path, dtype, prompts, padded: bool, reps: int = 2) -> float:
    """Time one prefill step of the whole mixed batch (packed, or every prompt padded to the
    longest: the padding tokens are computed like real ones, which is what padding costs)."""
    width = max(len(p) for p in prompts)
    budget = width * len(prompts)
    e = Engine(EngineConfig(ModelConfig.from_path(path, dtype), CacheConfig(memory_bytes=2 << 30, prefix_caching=False),
                            SchedulerConfig(max_num_batched_tokens=budget)))
    batch = [p + [0] * (width - len(p)) if padded else p for p in prompts]
    best = float("inf")
    for _ in range(reps):
        reqs = [e.add_request(p, SamplingParams(max_tokens=1, temperature=0)) for p in batch]
        t0 = time.perf_counter()
        e.step()
        best = min(best, time.perf_counter() - t0)
        for r in reqs:
            e.abort(r.request_id)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--out-len", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", help="pdserve dtype for the headline ratios")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = ensure_default_model(progress)
    vocab = ModelConfig.from_path(path).vocab_size
    prompts = workload(args.requests, 64, 512, vocab)
    total_out = args.requests * args.out_len
    res: dict = {"machine": machine(), "requests": args.requests, "prompt_lens": "64-512",
                 "out_len": args.out_len, "threads": args.threads}

    for dtype in ("float32", "bfloat16"):
        progress(f"pdserve offline, {dtype}: {args.requests} requests")
        dt, outs, e = run_pdserve(path, prompts, args.out_len, dtype)
        res[f"pdserve_{dtype}_s"] = dt
        res[f"pdserve_{dtype}_tok_s"] = total_out / dt
        res[f"pdserve_{dtype}_outputs"] = outs
        del e
        progress(f"packed vs padded prefill of the same mixed batch, {dtype}")
        sub = prompts[:16] if args.quick else prompts
        packed = prefill_time(path, dtype, sub, padded=False)
        padded = prefill_time(path, dtype, sub, padded=True)
        res[f"prefill_packed_{dtype}_s"] = packed
        res[f"prefill_padded_{dtype}_s"] = padded
        res[f"prefill_tok_s_{dtype}"] = sum(map(len, sub)) / packed
        if dtype == args.dtype:
            res["packed_prefill_speedup"] = padded / packed
    a, b = res.pop("pdserve_float32_outputs"), res.pop("pdserve_bfloat16_outputs")
    agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    res["bf16_token_agreement_vs_fp32"] = agree / sum(len(r) for r in a)
    first_div = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), len(ra)) for ra, rb in zip(a, b)]
    res["bf16_mean_tokens_before_divergence"] = sum(first_div) / len(first_div)

    progress(f"HF transformers generate, fp32, padded static batches of {args.hf_batch}")
    hf = run_hf(path, prompts, args.out_len, args.hf_batch)
    res["hf_fp32_s"] = hf
    res["hf_fp32_tok_s"] = total_out / hf
    res["throughput_ratio_vs_hf"] = res[f"pdserve_{args.dtype}_tok_s"] / res["hf_fp32_tok_s"]
    res["throughput_ratio_vs_hf_fp32_only"] = res["pdserve_float32_tok_s"] / res["hf_fp32_tok_s"]
    write_result("engine", res)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
                      if k != "machine"}))


if __name__ == "__main__":
    main()
