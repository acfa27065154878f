"""Prefix-cache benchmark: TTFT with shared prefixes vs the cache disabled, and the cache hit
rate of prefix-aware vs round-robin routing over two prefill instances.

    python benchmarks/prefix.py --quick

Part 1 (one engine, bf16, one thread): 1,024-token prompts whose first 0%, 50% or 90% is a
prefix shared with an earlier request; TTFT = time until the first token, cache on vs off.
Part 2 (two prefill engines in one process): a stream of multi-turn conversations (each turn
extends its conversation's history) routed by ``PrefixAware`` and by ``RoundRobin`` — the
production policy objects — fed with each engine's real cached-block index (what Redis holds
in a cluster); hit rate = prompt tokens served from cache / prompt tokens.
Part 3 (RAG chunk reuse, CacheBlend; one engine, one thread): chat prompts holding three
documents (marked as chunks, already in the chunk store) and a question. Quality (fp32):
the blended prompt vs the full prefill of the same token ids at several recompute ratios:
KL(full || blended) of the first token's distribution, first-token agreement, and greedy
token agreement over 16 tokens (position by position); a control recomputes random chunk
tokens instead of the most deviating ones. TTFT (bf16): six-document prompts, default
ratio vs full prefill.
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from functools import partial

import torch
from common import machine, progress, write_result
from pdserve.router.chunks import split_text
from pdserve.router.policy import Candidate, PrefixAware, RoundRobin, RoutingHint
from pdserve.workers import blend
from pdserve.workers.block_manager import prefix_hashes
from pdserve.workers.config import (
    CacheConfig,
    ChunkConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from pdserve.workers.engine import Engine
from pdserve.workers.llm import load_tokenizer
from pdserve.workers.model_store import ensure_default_model
from pdserve.workers.request import SamplingParams

SP = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def engine(mc: ModelConfig, caching: bool, role: str = "colocated") -> Engine:
    return Engine(EngineConfig(mc, CacheConfig(num_blocks=2048, prefix_caching=caching),
                               SchedulerConfig(role=role, max_num_batched_tokens=8192)))


def ttft(e: Engine, ids: list[int], chunks=None) -> float:
    t0 = time.perf_counter()
    r = e.add_request(ids, SP, chunks=chunks)
    while not r.output_ids:
        e.step()
    dt = time.perf_counter() - t0
    if r.request_id in e.requests:
        e.release(r.request_id)
    return dt


def ttft_part(mc: ModelConfig, rng: random.Random, n: int, reps: int) -> dict:
    out = {}
    for share in (0.0, 0.5, 0.9):
        res = {}
        for caching in (False, True):
            e = engine(mc, caching)
            times = []
            for _ in range(reps):
                base = [rng.randrange(100, mc.vocab_size) for _ in range(n)]
                k = int(n * share)
                ttft(e, base)  # the earlier request that leaves its prefix behind
                times.append(ttft(e, base[:k] + [rng.randrange(100, mc.vocab_size)
                                                 for _ in range(n - k)]))
            res["cache_on" if caching else "cache_off"] = statistics.median(times)
        res["speedup"] = res["cache_off"] / res["cache_on"]
        out[f"{int(share * 100)}pct"] = res
        progress(f"TTFT {int(share*100)}% shared: off {res['cache_off']*1e3:.0f} ms, "
                 f"on {res['cache_on']*1e3:.0f} ms ({res['speedup']:.2f}x)")
    return out


def routing_part(mc: ModelConfig, rng: random.Random, convs: int, turns: int) -> dict:
    out = {}
    for name, policy in (("prefix_aware", PrefixAware()), ("round_robin", RoundRobin())):
        es = {f"P{i}": engine(mc, True, "prefill") for i in range(2)}
        root = es["P0"].blocks.root
        hist = {c: [rng.randrange(100, mc.vocab_size) for _ in range(200)] for c in range(convs)}
        asked = hit = 0
        order = list(range(convs))
        for _t in range(turns):
            random.Random(_t).shuffle(order)  # conversations come back in any order
            for c in order:
                hist[c] = hist[c] + [rng.randrange(100, mc.vocab_size) for _ in range(40)]
                ids = hist[c]
                hs = prefix_hashes(root, ids[:-1], 16)
                cached = {}
                for iid, e in es.items():  # what the Redis index would answer
                    have = set(e.blocks.cached_hashes())
                    k = next((i for i, h in enumerate(hs) if h not in have), len(hs))
                    cached[iid] = k * 16
                cands = [Candidate(i, {"queued_prefill_tokens": 0}, 0) for i in es]
                best = policy.rank("prefill", cands, RoutingHint(len(ids), cached))[0]
                e = es[best.instance_id]
                before = e.blocks.hits
                ttft(e, ids)
                hit += e.blocks.hits - before
                asked += len(ids)
        out[name] = hit / asked
        progress(f"routing {name}: hit rate {out[name]:.2f}")
    return out


# ---- RAG chunk reuse (CacheBlend) ------------------------------------------------------------
# Eight short documents (written for this benchmark) and questions; a prompt is a chat turn
# holding three of them (or six, for TTFT) and a question about one, each document marked as
# a chunk. Quality = the blended prompt vs the full prefill of the same token ids.
DOCS = [
    ("The Danube is the second-longest river in Europe. It rises in the Black Forest in "
     "Germany and flows east for about 2,850 kilometres through ten countries, including "
     "Austria, Hungary, Serbia and Romania, before emptying into the Black Sea through a wide "
     "delta. Four capital cities lie on its banks: Vienna, Bratislava, Budapest and Belgrade."),
    ("Photosynthesis is the process by which green plants turn light into chemical energy. "
     "Chlorophyll in the chloroplasts absorbs mostly red and blue light. Water is split, "
     "releasing oxygen as a by-product, and carbon dioxide from the air is fixed into sugars "
     "in the Calvin cycle. Nearly all the oxygen in the atmosphere comes from this process."),
    ("The Rust programming language was first released as version 1.0 in May 2015. It "
     "guarantees memory safety without a garbage collector by checking ownership and "
     "borrowing rules at compile time. Its package manager is called Cargo, and its package "
     "registry, crates.io, hosts well over one hundred thousand libraries."),
    ("Mount Kilimanjaro in Tanzania is the highest mountain in Africa, rising 5,895 metres "
     "above sea level. It is a dormant volcano with three cones: Kibo, Mawenzi and Shira. "
     "Climbers usually need five to eight days to reach the summit, Uhuru Peak, and the "
     "glaciers near the top have shrunk by more than eighty percent since 1912."),
    ("The human heart has four chambers: two atria on top and two ventricles below. The right "
     "side pumps blood to the lungs, where it picks up oxygen, and the left side pumps it to "
     "the rest of the body. An adult heart beats about seventy times a minute at rest and "
     "moves roughly five litres of blood every minute."),
    ("Honey bees live in colonies of up to sixty thousand workers, a few hundred drones and a "
     "single queen. Workers communicate the direction and distance of flowers with the "
     "waggle dance. To make one kilogram of honey, bees visit around four million flowers, "
     "and a worker lives only about six weeks in summer."),
    ("The Great Wall of China is not one wall but a series of fortifications built over two "
     "thousand years. Most of what stands today was built during the Ming dynasty, between "
     "1368 and 1644, from brick and stone. Its total length, with all branches, was measured "
     "in 2012 at 21,196 kilometres."),
    ("Lithium-ion batteries store energy by moving lithium ions between a graphite anode and "
     "a metal-oxide cathode through an electrolyte. They power phones, laptops and electric "
     "cars because they hold much more energy per kilogram than nickel or lead batteries. "
     "Their capacity slowly fades with every charge cycle and with heat."),
]
QUESTIONS = [
    "Into which sea does the Danube flow?", "Which gas is released by photosynthesis?",
    "In which year was Rust 1.0 released?", "How high is Kilimanjaro?",
    "How many chambers does the human heart have?", ("How many flowers do bees visit for one "
    "kilogram of honey?"), "During which dynasty was most of the Great Wall built?",
    "What is the anode of a lithium-ion battery made of?",
]


def rag_prompts(tok, n: int, docs_per_prompt: int) -> list[tuple[list[int], object]]:
    """``n`` chat prompts, each with ``docs_per_prompt`` documents as chunks (the
    production tokenization: router/chunks.py)."""
    out = []
    for i in range(n):
        picks = [(i + 3 * j) % len(DOCS) for j in range(docs_per_prompt)]
        q = QUESTIONS[picks[(i // len(DOCS)) % docs_per_prompt]]
        body = "".join(f"Document {j + 1}:\n{DOCS[d]}\n\n" for j, d in enumerate(picks))
        msgs = [{"role": "system", "content": "Answer the question using the documents."},
                {"role": "user", "content": f"{body}Question: {q}"}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out.append(split_text(tok, text, [DOCS[d] for d in picks], "messages", None))
    return out


def chunk_engine(mc: ModelConfig, ratio: float | None) -> Engine:
    return Engine(EngineConfig(mc, CacheConfig(num_blocks=2048, prefix_caching=False),
                               SchedulerConfig(max_num_batched_tokens=8192),
                               chunks=ChunkConfig(recompute_ratio=ratio or 0.0,
                                                  enabled=ratio is not None)))


def generate_all(e: Engine, prompts, n_tokens: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Greedy ``n_tokens`` for every prompt in one batch; with the first token's logits."""
    first: dict[str, torch.Tensor] = {}
    real = e.sampler

    def record(logits, reqs):
        for lg, r in zip(logits, reqs):
            if not r.output_ids:
                first[r.request_id] = lg.float().clone()
        return real(logits, reqs)

    e.sampler = record
    sp = SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)
    reqs = [e.add_request(ids, sp, chunks=ch) for ids, ch in prompts]
    while e.has_work:
        e.step()
    e.sampler = real
    return [first[r.request_id] for r in reqs], [r.output_ids for r in reqs]


def compare(full_lg, full_out, lg, gen, stats) -> dict:
    kls = []
    for f, b in zip(full_lg, lg):
        lp, lq = f.log_softmax(-1), b.log_softmax(-1)
        kls.append(float((lp.exp() * (lp - lq)).sum()))
    n_tokens = len(full_out[0])
    same = sum(a == b for fo, go in zip(full_out, gen) for a, b in zip(fo, go))
    return {"kl_mean": statistics.mean(kls), "kl_max": max(kls),
            "first_token_agreement": statistics.mean(
                float(f.argmax() == b.argmax()) for f, b in zip(full_lg, lg)),
            "token_agreement": same / (len(full_out) * n_tokens),
            "recomputed_fraction": stats["tokens_recomputed"] / max(
                1, stats["tokens_recomputed"] + stats["tokens_reused"])}


def random_selection(select, g, deviation, reuse, ratio):
    return select(torch.rand(deviation.shape, generator=g), reuse, ratio)


def quality_part(mc: ModelConfig, tok, n_prompts: int, n_tokens: int,
                 ratios: tuple[float, ...], control_ratio: float) -> dict:
    """Blended vs full prefill of the same ids, per ratio; plus a control at
    ``control_ratio`` that recomputes *random* chunk tokens instead of the most deviating."""
    prompts = rag_prompts(tok, n_prompts, 3)
    docs = [ids[s:e] for ids, ch in prompts for s, e in ch.spans]
    full_lg, full_out = generate_all(chunk_engine(mc, None), [(i, None) for i, _ in prompts],
                                     n_tokens)
    out = {}
    runs = [(str(r), r) for r in ratios] + [(f"random_{control_ratio}", control_ratio)]
    for name, ratio in runs:
        e = chunk_engine(mc, ratio)
        e.chunk_prefill.warm(docs)  # the documents were seen before
        real = blend.select_tokens
        if name.startswith("random"):
            g = torch.Generator().manual_seed(0)
            blend.select_tokens = partial(random_selection, real, g)
        try:
            lg, gen = generate_all(e, prompts, n_tokens)
        finally:
            blend.select_tokens = real
        out[name] = r = compare(full_lg, full_out, lg, gen, e.chunk_prefill.stats)
        progress(f"chunks {name}: KL {r['kl_mean']:.4f} (max {r['kl_max']:.3f}), "
                 f"first-token agreement {r['first_token_agreement']:.2f}, "
                 f"{n_tokens}-token agreement {r['token_agreement']:.2f}")
    return out


def chunk_ttft_part(mc: ModelConfig, tok, reps: int, ratio: float) -> dict:
    """Full prefill and blended TTFT of the same prompts, interleaved (so that load from
    other processes hits both alike); speed-up = median of the per-prompt ratios."""
    prompts = rag_prompts(tok, reps, 6)
    full, blend = chunk_engine(mc, None), chunk_engine(mc, ratio)
    blend.chunk_prefill.warm([ids[s:e] for ids, ch in prompts for s, e in ch.spans])
    ttft(full, prompts[0][0])  # warm-up
    ttft(blend, *prompts[0])
    t_full, t_blend = [], []
    for ids, ch in prompts:
        t_full.append(ttft(full, ids))
        t_blend.append(ttft(blend, ids, ch))
    res = {"prompt_tokens": statistics.mean(len(i) for i, _ in prompts),
           "full_s": statistics.median(t_full), "blend_s": statistics.median(t_blend),
           "ratio": ratio,
           "speedup": statistics.median(f / b for f, b in zip(t_full, t_blend))}
    progress(f"chunk TTFT ({res['prompt_tokens']:.0f} tokens, 6 documents, ratio {ratio}): "
             f"full {res['full_s']*1e3:.0f} ms, blended {res['blend_s']*1e3:.0f} ms "
             f"({res['speedup']:.2f}x)")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    mc = ModelConfig.from_path(ensure_default_model(progress), "bfloat16")
    rng = random.Random(0)
    tt = ttft_part(mc, rng, 1024, 2 if args.quick else 5)
    rt = routing_part(mc, rng, 5 if args.quick else 9, 3 if args.quick else 5)
    tok = load_tokenizer(mc.path)
    default = ChunkConfig().recompute_ratio
    # quality in fp32, where ratio 1 is bit-exact (in bf16 the full prefill itself varies
    # with batch composition, which would blur the comparison); TTFT in bf16 (serving)
    cq = quality_part(ModelConfig.from_path(mc.path, "float32"), tok, 16 if args.quick else 40,
                      16, (0.0, 0.05, 0.1, 0.15, 0.3, 0.5, 1.0), default)
    ct = chunk_ttft_part(mc, tok, 8 if args.quick else 16, default)
    res = {"machine": machine(), "ttft": tt, "routing_hit_rate": rt,
           "chunk_quality": cq, "chunk_ttft": ct,
           "ttft_speedup_90pct_shared": tt["90pct"]["speedup"],
           "ttft_speedup_50pct_shared": tt["50pct"]["speedup"],
           "routing_hit_rate_prefix_aware": rt["prefix_aware"],
           "routing_hit_rate_round_robin": rt["round_robin"],
           "chunk_ttft_speedup": ct["speedup"], "chunk_kl": cq[str(default)]["kl_mean"],
           "chunk_token_agreement": cq[str(default)]["token_agreement"],
           "chunk_first_token_agreement": cq[str(default)]["first_token_agreement"],
           "chunk_recompute_ratio": default}
    write_result("prefix", res)
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()
                      if k not in ("machine", "ttft", "routing_hit_rate", "chunk_quality",
                                   "chunk_ttft")}))


if __name__ == "__main__":
    main()
