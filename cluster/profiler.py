"""``pdserve profile``: measure one instance shape's step latencies and fit ``LatencyModel``.

What is timed is a real ``Engine.step()`` (schedule + forward + sample + commit), so the fit
includes everything a serving step pays:

- **prefill**: a prefill-role engine, ``k`` prompts of ``l`` random tokens packed into one
  step, for every ``l`` of the grid and ``k`` in {1, packs...} up to the token cap. Packed
  batches are what separate the ``tokens`` term from the ``pairs`` term (single prompts alone
  make them collinear-ish). Prefix caching is off so every token is computed.
- **decode**: a decode-role engine holding ``B`` requests of context ``C`` whose prompt KV is
  *not* computed (blocks are reserved and left as they are: a decode step's cost does not
  depend on the values in the cache); one warm-up step, then the median of ``steps`` timed
  steps. Grid points with ``B * C`` above the cap are skipped to bound memory.
- **transfer**: a gloo pair channel with both ends in this process (two threads), the path KV
  takes between instances on one host; ``t = latency + bytes / bandwidth`` fitted over a few
  message sizes. Instances on different hosts: pass ``pdserve plan --transfer-bandwidth``.

Every point is the median of ``repeats`` runs after one warm-up. Progress goes to stderr.
TP > 1 runs the instance through ``make_engine`` (ranks as Ray actors; a local Ray is started).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .latency_model import LatencyModel, LinearFit, Profile, TransferModel, chunk_pairs


@dataclass(frozen=True)
class ProfileGrid:
    prefill_lens: tuple[int, ...]  # prompt lengths
    packs: tuple[int, ...]  # prompts per packed prefill step (1 is always measured)
    prefill_token_cap: int  # skip packed steps above this many tokens
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_token_cap: int  # skip decode points with batch * context above this
    steps: int = 3  # timed decode steps per point
    repeats: int = 3
    transfer_sizes: tuple[int, ...] = (1 << 20, 8 << 20, 32 << 20)


FULL = ProfileGrid((16, 64, 128, 256, 512, 1024, 2048), (2, 4, 8), 4096,
                   (1, 2, 4, 8, 16, 32, 64), (64, 256, 1024, 2048), 32768)
QUICK = ProfileGrid((16, 128, 512), (4,), 1024, (1, 4, 16), (64, 512), 4096, steps=3,
                    repeats=3, transfer_sizes=(1 << 20, 8 << 20))


def _say(msg: str) -> None:
    print(f"[profile] {msg}", file=sys.stderr, flush=True)


def _median_time(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _engine(mcfg, role: str, num_blocks: int, max_tokens: int, max_seqs: int, tp: int,
            cpus: float):
    from pdserve.workers.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.workers.parallel import ParallelConfig
    from pdserve.workers.tp_engine import make_engine

    cfg = EngineConfig(
        mcfg, CacheConfig(num_blocks=num_blocks, prefix_caching=False),
        SchedulerConfig(role=role, max_num_batched_tokens=max_tokens, max_num_seqs=max_seqs,
                        max_waiting=max_seqs * 2),
        num_threads=max(1, int(cpus)))
    return make_engine(cfg, ParallelConfig(tp=tp, cpus_per_rank=cpus))


def measure_prefill(mcfg, grid: ProfileGrid, tp: int, cpus: float, rng: np.random.Generator,
                    say: Callable[[str], None] = _say) -> list[dict]:
    from pdserve.workers.request import SamplingParams

    lens = [n for n in grid.prefill_lens if n < mcfg.max_position_embeddings]
    shapes = [(1, n) for n in lens] + [(k, n) for k in grid.packs for n in lens
                                        if k * n <= grid.prefill_token_cap]
    top = max(k * n for k, n in shapes)
    blocks = max(k * -(-(n + 1) // 16) for k, n in shapes) + 2
    eng = _engine(mcfg, "prefill", blocks, top, max(k for k, _ in shapes), tp, cpus)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    points: list[dict] = []
    times: list[float] = []
    try:
        def run(k: int, n: int) -> None:
            reqs = [eng.add_request(rng.integers(0, mcfg.vocab_size, n).tolist(), params)
                    for _ in range(k)]
            t0 = time.perf_counter()
            outs = eng.step()
            dt = time.perf_counter() - t0
            if len(outs) != k:
                raise RuntimeError(f"prefill of {k}x{n} tokens took more than one step")
            for r in reqs:
                eng.release(r.request_id)
            times.append(dt)

        run(1, lens[0])  # warm-up
        for k, n in shapes:
            times.clear()
            for _ in range(grid.repeats):
                run(k, n)
            t = statistics.median(times)
            points.append({"lens": [n] * k, "tokens": k * n, "pairs": k * chunk_pairs(n),
                           "seconds": t})
            say(f"prefill {k} x {n} tokens: {t * 1e3:.1f} ms")
    finally:
        getattr(eng, "close", lambda: None)()
    return points


def measure_decode(mcfg, grid: ProfileGrid, tp: int, cpus: float, rng: np.random.Generator,
                   say: Callable[[str], None] = _say) -> list[dict]:
    from pdserve.workers.request import SamplingParams

    ctxs = [c for c in grid.decode_contexts
            if c + grid.steps + 2 < mcfg.max_position_embeddings]
    shapes = [(b, c) for b in grid.decode_batches for c in ctxs if b * c <= grid.decode_token_cap]
    need = max(b * (-(-(c + grid.steps + 2) // 16)) for b, c in shapes)
    eng = _engine(mcfg, "decode", need + 2, max(grid.decode_batches),
                  max(grid.decode_batches), tp, cpus)
    params = SamplingParams(max_tokens=grid.steps + 2, temperature=0, ignore_eos=True)
    points, rid = [], 0
    try:
        for i, (b, c) in enumerate([shapes[0], *shapes]):  # pass 0 only warms the engine up
            ids = []
            for _ in range(b):
                rid += 1
                prompt = rng.integers(0, mcfg.vocab_size, c).tolist()
                blocks = eng.blocks.allocate_ids(eng.blocks.blocks_for(c))
                eng.add_prefilled(f"p{rid}", prompt, params, int(prompt[-1]), None, blocks)
                ids.append(f"p{rid}")
            eng.step()  # warm-up: first step at this batch shape
            times = [_median_time(eng.step, 1) for _ in range(grid.steps)]
            for r in ids:
                eng.abort(r)
            if i == 0:
                continue
            t = statistics.median(times)
            mid = c + 2 + grid.steps // 2  # context of the median step (prompt + tokens so far)
            points.append({"batch": b, "context": c, "context_tokens": b * mid, "seconds": t})
            say(f"decode batch {b} x context {c}: {t * 1e3:.2f} ms/step")
    finally:
        getattr(eng, "close", lambda: None)()
    return points


def measure_transfer(sizes: tuple[int, ...], repeats: int,
                     say: Callable[[str], None] = _say) -> tuple[TransferModel, list[dict]]:
    import torch
    from pdserve.kvtransfer import ChannelListener, connect

    listener = ChannelListener("127.0.0.1", "profile-probe", epoch=1)
    box: dict = {}
    th = threading.Thread(target=lambda: box.setdefault("rx", listener.accept("tx", 30.0)))
    th.start()
    tx = connect(listener.address, "rx", timeout_s=30.0)
    th.join(35)
    rx = box["rx"]
    points = []
    try:
        for size in sizes:
            src = torch.ones(size // 4, dtype=torch.float32)
            dst = torch.empty_like(src)

            def once(src: torch.Tensor = src, dst: torch.Tensor = dst) -> None:
                r = rx.recv(dst, 1)
                tx.send(src, 1).wait(60.0)
                r.wait(60.0)

            once()
            t = _median_time(once, max(3, repeats))
            points.append({"bytes": size, "seconds": t})
            say(f"transfer {size >> 20} MiB: {t * 1e3:.2f} ms ({size / t / 1e9:.2f} GB/s)")
    finally:
        rx.close()
        tx.close()
    x = np.array([p["bytes"] for p in points], float)
    y = np.array([p["seconds"] for p in points])
    slope, icpt = np.polyfit(x, y, 1) if len(points) > 1 else (y[0] / x[0], 0.0)
    slope = max(float(slope), 1e-15)
    return TransferModel(1.0 / slope, max(0.0, float(icpt))), points


def default_kv_capacity(mcfg, tp: int, memory_bytes: int | None, block_size: int = 16) -> int:
    """KV tokens one instance holds with the engine's default budget (or ``memory_bytes``
    per rank): the same arithmetic as ``ModelRunner``/``TPEngine``."""
    import psutil
    from pdserve.workers.runner import DEFAULT_KV_CAP, DEFAULT_KV_FRACTION, bytes_per_block

    budget = memory_bytes or min(int(psutil.virtual_memory().available * DEFAULT_KV_FRACTION),
                                 DEFAULT_KV_CAP) // tp
    kv_per_rank = max(1, -(-mcfg.num_kv_heads // tp))
    return int(budget // bytes_per_block(mcfg, block_size, kv_per_rank)) * block_size


def run_profile(model: str | None, tp: int = 1, dtype: str = "float32", cpus: float = 1.0,
                grid: ProfileGrid = FULL, transfer: bool = True, seed: int = 0,
                kv_cache_memory: int | None = None,
                say: Callable[[str], None] = _say) -> Profile:
    """Measure, fit, and return the profile (the caller saves it)."""
    import torch
    from pdserve.workers.config import ModelConfig
    from pdserve.workers.model_store import DEFAULT_MODEL, resolve_model
    from pdserve.workers.runner import bytes_per_block

    path = resolve_model(model, progress=say)
    mcfg = ModelConfig.from_path(path, dtype)
    started_ray = False
    if tp > 1:
        from .launcher import loopback_ray_env

        loopback_ray_env()  # before ray's first import, or Ray binds the external address
        import ray

        if not ray.is_initialized():
            from .launcher import start_ray

            start_ray(None)
            started_ray = True
    rng = np.random.default_rng(seed)
    say(f"{path.name}: tp={tp}, {dtype}, {cpus:g} CPU(s) per rank")
    threads = torch.get_num_threads()  # the engine sets its own; give the caller's back
    try:
        pre = measure_prefill(mcfg, grid, tp, cpus, rng, say)
        dec = measure_decode(mcfg, grid, tp, cpus, rng, say)
    finally:
        torch.set_num_threads(threads)
        if started_ray:
            import ray

            ray.shutdown()
    pfit = LinearFit.fit([p["tokens"] for p in pre], [p["pairs"] for p in pre],
                         [p["seconds"] for p in pre])
    dfit = LinearFit.fit([p["batch"] for p in dec], [p["context_tokens"] for p in dec],
                         [p["seconds"] for p in dec])
    say(f"prefill fit: {pfit.a * 1e3:.3g} ms + {pfit.b * 1e6:.3g} us/token + "
        f"{pfit.c * 1e9:.3g} ns/pair (mean error {pfit.mean_rel_error:.1%})")
    say(f"decode fit: {dfit.a * 1e3:.3g} ms + {dfit.b * 1e6:.3g} us/request + "
        f"{dfit.c * 1e9:.3g} ns/context token (mean error {dfit.mean_rel_error:.1%})")
    tmodel, tpoints = (measure_transfer(grid.transfer_sizes, grid.repeats, say) if transfer
                       else (TransferModel(), []))
    lat = LatencyModel(pfit, dfit, tp, cpus, bytes_per_block(mcfg, 1, mcfg.num_kv_heads),
                       mcfg.num_layers, default_kv_capacity(mcfg, tp, kv_cache_memory))
    machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": max(1, int(cpus)),
               "processor": platform.machine(), "python": platform.python_version(),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return Profile(model or DEFAULT_MODEL, dtype, lat, tmodel, mcfg.num_heads,
                   mcfg.num_kv_heads, mcfg.max_position_embeddings, pre, dec, tpoints, machine)
