"""Kernel micro-benchmarks: each Triton kernel against its torch reference, and the attention
kernels against ``torch.nn.functional.scaled_dot_product_attention`` on the same work laid out
densely (the paged layout's cost shows as the gap). Reports achieved GB/s for the memory-bound
ops and TFLOP/s for attention.

    python benchmarks/kernels.py            # CUDA: Llama-3-8B-like sizes, do_bench timings
    python benchmarks/kernels.py --smoke    # CPU: tiny sizes, each once under the interpreter

``--smoke`` exists so this script cannot rot on machines without a GPU: its timings mean
nothing, but every kernel is launched and checked against its reference (``max_err``).
Last stdout line: one JSON object ``{"device", "smoke", "dtype", "results": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before anything imports triton: the interpreter runs the kernels on CPU
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
from common import machine, progress
from pdserve.kernels import attention, blocks, kv_quant, kv_store, rmsnorm, rope


@dataclass
class Sizes:
    batch: int  # decode sequences
    context: int  # decode context length (tokens)
    seqs: int  # packed prefill sequences
    seqlen: int  # tokens per prefill sequence
    tokens: int  # tokens for the elementwise ops
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    block_size: int
    layers: int  # for block gather/scatter
    moved_blocks: int


REAL = Sizes(batch=64, context=4096, seqs=8, seqlen=1024, tokens=8192, heads=32, kv_heads=8,
             head_dim=128, hidden=4096, block_size=16, layers=32, moved_blocks=256)
TINY = Sizes(batch=2, context=40, seqs=2, seqlen=24, tokens=8, heads=4, kv_heads=2,
             head_dim=64, hidden=64, block_size=16, layers=2, moved_blocks=3)


@dataclass
class Row:
    op: str
    impl: str  # "triton" | "ref" | "sdpa"
    ms: float
    gbps: float | None = None
    tflops: float | None = None
    max_err: float | None = None  # triton vs ref, max abs


def timed(fn: Callable[[], object], smoke: bool) -> float:
    """Milliseconds per call: ``do_bench`` (L2 flushed, median) on CUDA, one call otherwise."""
    if smoke:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100))


def rates(ms: float, nbytes: float | None, flops: float | None) -> dict:
    s = ms / 1e3
    return {"gbps": nbytes / s / 1e9 if nbytes else None,
            "tflops": flops / s / 1e12 if flops else None}


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def compare(op: str, impls: dict[str, Callable[[], object]], smoke: bool,
            nbytes: float | None = None, flops: float | None = None,
            check: Callable[[], float] | None = None) -> list[Row]:
    progress(op)
    rows = []
    for impl, fn in impls.items():
        ms = timed(fn, smoke)
        rows.append(Row(op, impl, ms, **rates(ms, nbytes, flops)))
    if check is not None:
        rows[0].max_err = check()
    return rows


def bench_attention(z: Sizes, dt: torch.dtype, dev: torch.device, smoke: bool) -> list[Row]:
    g = torch.Generator(device=dev).manual_seed(0)
    d, h, hkv, bs = z.head_dim, z.heads, z.kv_heads, z.block_size
    el = torch.empty((), dtype=dt).element_size()
    scale = d**-0.5

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=dt)

    # decode: B sequences of `context` keys, each in its own shuffled blocks
    per_seq = -(-z.context // bs)
    nblocks = z.batch * per_seq
    kc, vc = randn(nblocks, bs, hkv, d), randn(nblocks, bs, hkv, d)
    bt = torch.randperm(nblocks, generator=g, device=dev).view(z.batch, per_seq).int()
    ctx = torch.full((z.batch,), z.context, dtype=torch.int32, device=dev)
    q = randn(z.batch, h, d)
    kd = kc[bt.long()].view(z.batch, -1, hkv, d)[:, : z.context].transpose(1, 2).contiguous()
    vd = vc[bt.long()].view(z.batch, -1, hkv, d)[:, : z.context].transpose(1, 2).contiguous()
    args = (q, kc, vc, bt, ctx, scale)
    rows = compare(
        "paged_decode_attention",
        {"triton": lambda: attention._paged_decode_attention_triton(*args),
         "ref": lambda: attention.paged_decode_attention_ref(*args),
         "sdpa": lambda: F.scaled_dot_product_attention(q[:, :, None], kd, vd, scale=scale,
                                                        enable_gqa=True)},
        smoke, nbytes=2 * z.batch * z.context * hkv * d * el,
        flops=4 * z.batch * h * z.context * d,
        check=lambda: err(attention._paged_decode_attention_triton(*args),
                          attention.paged_decode_attention_ref(*args)),
    )

    # prefill: `seqs` packed sequences of `seqlen` new tokens, no cached prefix
    n, t = z.seqlen, z.seqs * z.seqlen
    qp, kp, vp = randn(t, h, d), randn(t, hkv, d), randn(t, hkv, d)
    cu = torch.arange(0, t + 1, n, dtype=torch.int32, device=dev)
    pre = torch.zeros(z.seqs, dtype=torch.int32, device=dev)
    qb, kb, vb = (x.view(z.seqs, n, -1, d).transpose(1, 2) for x in (qp, kp, vp))
    pargs = (qp, kp, vp, cu, pre, None, None, None, scale)
    rows += compare(
        "varlen_prefill_attention",
        {"triton": lambda: attention._varlen_prefill_attention_triton(*pargs),
         "ref": lambda: attention.varlen_prefill_attention_ref(*pargs),
         "sdpa": lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale,
                                                        enable_gqa=True)},
        smoke, flops=4 * z.seqs * h * d * n * (n + 1) / 2,
        check=lambda: err(attention._varlen_prefill_attention_triton(*pargs),
                          attention.varlen_prefill_attention_ref(*pargs)),
    )
    return rows


def bench_elementwise(z: Sizes, dt: torch.dtype, dev: torch.device, smoke: bool) -> list[Row]:
    g = torch.Generator(device=dev).manual_seed(1)
    el = torch.empty((), dtype=dt).element_size()
    t, d, hkv, h, bs = z.tokens, z.head_dim, z.kv_heads, z.heads, z.block_size

    def randn(*shape, dtype=dt):
        return torch.randn(*shape, generator=g, device=dev, dtype=dtype)

    rows = []
    nblocks = -(-t // bs) + 1
    k, v = randn(t, hkv, d), randn(t, hkv, d)
    kc, vc = randn(nblocks, bs, hkv, d), randn(nblocks, bs, hkv, d)
    kc2, vc2 = kc.clone(), vc.clone()
    slots = torch.randperm(nblocks * bs, generator=g, device=dev)[:t]

    def store_err():
        kv_store._store_kv_triton(k, v, kc, vc, slots)
        kv_store.store_kv_ref(k, v, kc2, vc2, slots)
        return max(err(kc, kc2), err(vc, vc2))

    rows += compare("store_kv", {
        "triton": lambda: kv_store._store_kv_triton(k, v, kc, vc, slots),
        "ref": lambda: kv_store.store_kv_ref(k, v, kc2, vc2, slots),
    }, smoke, nbytes=4 * t * hkv * d * el, check=store_err)

    x, r, w = randn(t, z.hidden), randn(t, z.hidden), randn(z.hidden)
    rows += compare("add_rmsnorm", {
        "triton": lambda: rmsnorm._add_rmsnorm_triton(x, r, w, 1e-5),
        "ref": lambda: rmsnorm.add_rmsnorm_ref(x, r, w, 1e-5),
    }, smoke, nbytes=4 * t * z.hidden * el,
        check=lambda: err(rmsnorm._add_rmsnorm_triton(x, r, w, 1e-5)[0],
                          rmsnorm.add_rmsnorm_ref(x, r, w, 1e-5)[0]))

    cs = rope.build_cos_sin(rope.rope_frequencies(d, 500000.0, None), 8192).to(dev)
    pos = torch.randint(0, 8192, (t,), generator=g, device=dev)
    qr, kr = randn(t, h, d), randn(t, hkv, d)

    def rope_err():
        q1, k1, q2, k2 = qr.clone(), kr.clone(), qr.clone(), kr.clone()
        rope._apply_rope_triton(q1, k1, pos, cs)
        rope.apply_rope_ref(q2, k2, pos, cs)
        return max(err(q1, q2), err(k1, k2))

    rows += compare("apply_rope", {
        "triton": lambda: rope._apply_rope_triton(qr, kr, pos, cs),
        "ref": lambda: rope.apply_rope_ref(qr, kr, pos, cs),
    }, smoke, nbytes=2 * t * (h + hkv) * d * el + t * d * 4, check=rope_err)
    return rows


def bench_transfer(z: Sizes, dt: torch.dtype, dev: torch.device, smoke: bool) -> list[Row]:
    g = torch.Generator(device=dev).manual_seed(2)
    el = torch.empty((), dtype=dt).element_size()
    nb = 2 * z.moved_blocks
    kv = torch.randn(z.layers, 2, nb, z.block_size, z.kv_heads, z.head_dim, generator=g,
                     device=dev, dtype=dt)
    ids = torch.randperm(nb, generator=g, device=dev)[: z.moved_blocks]
    moved = kv[:, :, : z.moved_blocks].numel()
    buf = blocks.gather_blocks_ref(kv, ids)
    rows = compare("gather_blocks", {
        "triton": lambda: blocks._gather_blocks_triton(kv, ids, None),
        "ref": lambda: blocks.gather_blocks_ref(kv, ids),
    }, smoke, nbytes=2 * moved * el,
        check=lambda: err(blocks._gather_blocks_triton(kv, ids, None), buf))
    kv2 = kv.clone()

    def scatter_err():
        blocks._scatter_blocks_triton(buf, kv, ids, None)
        blocks.scatter_blocks_ref(buf, kv2, ids)
        return err(kv, kv2)

    rows += compare("scatter_blocks", {
        "triton": lambda: blocks._scatter_blocks_triton(buf, kv, ids, None),
        "ref": lambda: blocks.scatter_blocks_ref(buf, kv2, ids),
    }, smoke, nbytes=2 * moved * el, check=scatter_err)

    one_layer = buf[0, 0].contiguous()  # [n, bs, kv_heads, dim]: one layer's K (or V)
    n_el = one_layer.numel()
    for per in kv_quant.PERS:
        qt, st = kv_quant.quantize_kv_ref(one_layer, per)
        rows += compare(f"quantize_kv[{per}]", {
            "triton": lambda per=per: kv_quant._quantize_kv_triton(one_layer, per),
            "ref": lambda per=per: kv_quant.quantize_kv_ref(one_layer, per),
        }, smoke, nbytes=n_el * (el + 1),
            check=lambda per=per, qt=qt: err(kv_quant._quantize_kv_triton(one_layer, per)[0], qt))
        rows += compare(f"dequantize_kv[{per}]", {
            "triton": lambda per=per, qt=qt, st=st: kv_quant._dequantize_kv_triton(qt, st, per, dt),
            "ref": lambda per=per, qt=qt, st=st: kv_quant.dequantize_kv_ref(qt, st, per, dt),
        }, smoke, nbytes=n_el * (el + 1),
            check=lambda per=per, qt=qt, st=st: err(
                kv_quant._dequantize_kv_triton(qt, st, per, dt),
                kv_quant.dequantize_kv_ref(qt, st, per, dt)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, each kernel once under the Triton interpreter on CPU")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    a = ap.parse_args()
    dt = getattr(torch, a.dtype)
    if a.smoke:
        dev, sizes = torch.device("cpu"), TINY
    elif torch.cuda.is_available():
        dev, sizes = torch.device("cuda"), REAL
    else:
        sys.exit("benchmarks/kernels.py: no CUDA GPU; run with --smoke on CPU")
    with torch.inference_mode():
        rows = [row for bench in (bench_attention, bench_elementwise, bench_transfer)
                for row in bench(sizes, dt, dev, a.smoke)]
    for r in rows:
        rate = (f"{r.tflops:8.2f} TFLOP/s" if r.tflops is not None
                else f"{r.gbps:8.1f} GB/s" if r.gbps is not None else "")
        extra = f"  max_err={r.max_err:.3g}" if r.max_err is not None else ""
        print(f"{r.op:26s} {r.impl:7s} {r.ms:10.3f} ms {rate}{extra}")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (triton interpreter)"
    print(json.dumps({"device": name, "smoke": a.smoke, "dtype": a.dtype, "machine": machine(),
                      "sizes": asdict(sizes), "results": [asdict(r) for r in rows]}))


if __name__ == "__main__":
    main()
