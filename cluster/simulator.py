"""A discrete-event simulator of pdserve's pools, driven by a fitted ``LatencyModel``.

What it models (and what the real system does that it mirrors):

    arrival --> prefill instance (least queued prompt tokens)
                FCFS queue; each step packs prompt chunks from the head up to the token
                budget (the last one may be a partial chunk: chunked prefill) and max_num_seqs;
                step time = LatencyModel.prefill_time(chunks)
            --> first token at the end of the step holding the prompt's last chunk  (TTFT)
            --> KV transfer to the decode instance with the fewest requests
                visible time = latency + max(X / L, X - step * (L-1) / L),  X = bytes / bw:
                layer-wise sending overlaps all but the last layer with the prefill step
            --> decode instance: FCFS admission while KV tokens and max_num_seqs allow
                (a request reserves ceil((prompt + output) / block) blocks); continuous
                batching: every step decodes all admitted requests, one token each;
                step time = LatencyModel.decode_time(batch, context tokens)
            --> last token (TPOT = (finish - first token) / (output - 1))

Colocated instances run Sarathi-style mixed steps: all running decodes first (one token each),
then prompt chunks from the FCFS queue with the rest of the token budget; step time =
LatencyModel.mixed_time. A prompt that finishes in a step starts decoding in the next one.

An idle instance starts its step after every other event of the same instant, so work that
arrives together is batched together (as an engine loop would find it in its queue).

Not modelled: preemption (admission control stands in for it), transfer contention between
pairs, prefix-cache hits, router retries. Decode-only and prefill-only runs (the planner's
per-phase search) skip the other phase: a decode-only request arrives with its first token.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .latency_model import LatencyModel, TransferModel, chunk_pairs
from .workload import SimRequest


@dataclass(frozen=True)
class PoolSpec:
    """One pool: ``replicas`` instances of the shape ``latency`` with these batch limits."""

    latency: LatencyModel
    replicas: int = 1
    max_batched_tokens: int = 2048
    max_num_seqs: int = 128
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.max_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("replicas, max_batched_tokens and max_num_seqs must be >= 1")


@dataclass(frozen=True)
class SimResult:
    """Per-request outcomes, index-aligned with the input requests (seconds)."""

    ttft: np.ndarray
    tpot: np.ndarray  # 0 for single-token outputs
    finish: np.ndarray

    def attainment(self, ttft_slo: float | None, tpot_slo: float | None) -> float:
        """Fraction of requests meeting both SLOs (an SLO of None is not checked)."""
        ok = np.ones(len(self.ttft), dtype=bool)
        if ttft_slo is not None:
            ok &= self.ttft <= ttft_slo
        if tpot_slo is not None:
            ok &= self.tpot <= tpot_slo
        return float(ok.mean()) if len(ok) else 1.0


class _Job:
    __slots__ = ("arrival", "done", "finish", "first", "output", "prompt", "reserved")

    def __init__(self, r: SimRequest) -> None:
        self.arrival, self.prompt, self.output = r.arrival, r.prompt_len, r.output_len
        self.done = 0  # prompt tokens computed
        self.first = self.finish = math.nan
        self.reserved = 0  # KV tokens held on a decode instance


class _Decoder:
    """Continuous-batching bookkeeping: a request joining before step ``s`` emits its last
    token at the end of step ``s + output - 2`` (it needs ``output - 1`` decode steps)."""

    def __init__(self) -> None:
        self.running = 0
        self.ctx = 0  # sum over running requests of the tokens each attends to this step
        self.step = 0  # index of the next step
        self.ending: dict[int, list[_Job]] = {}

    def join(self, job: _Job) -> None:
        self.running += 1
        self.ctx += job.prompt + 1  # the prompt plus the token being fed in
        self.ending.setdefault(self.step + job.output - 2, []).append(job)

    def advance(self, t: float) -> list[_Job]:
        self.ctx += self.running  # every running request's context grew by one
        done = self.ending.pop(self.step, [])
        for j in done:
            j.finish = t
            self.running -= 1
            self.ctx -= j.prompt + j.output
        self.step += 1
        return done


class _Instance:
    def __init__(self, spec: PoolSpec) -> None:
        self.spec, self.lat = spec, spec.latency
        self.queue: deque[_Job] = deque()  # prompts waiting or mid-prefill (FCFS)
        self.waiting: deque[_Job] = deque()  # decode: transferred, not yet admitted
        self.load = 0  # prompt tokens still to prefill
        self.inflight = 0  # decode: transfers heading here
        self.kv_used = 0
        self.busy = False
        self.chunks: list[tuple[_Job, int]] = []
        self.dec = _Decoder()

    def take_chunks(self, budget: int, seqs: int) -> tuple[int, int]:
        """Fill ``self.chunks`` from the queue head; returns (tokens, attended pairs)."""
        self.chunks, tokens, pairs = [], 0, 0
        for job in self.queue:
            if budget <= 0 or seqs <= 0:
                break
            n = min(job.prompt - job.done, budget)
            self.chunks.append((job, n))
            tokens += n
            pairs += chunk_pairs(n, job.done)
            budget, seqs = budget - n, seqs - 1
        return tokens, pairs

    def finish_chunks(self) -> list[_Job]:
        """Advance prefill progress; returns the prompts that completed (a queue prefix)."""
        out = []
        for job, n in self.chunks:
            job.done += n
            self.load -= n
            if job.done == job.prompt:
                assert self.queue[0] is job
                self.queue.popleft()
                out.append(job)
        self.chunks = []
        return out


class Simulator:
    """One run over a fixed request list. ``mode``: disaggregated | colocated | prefill |
    decode (the last two simulate one phase alone, for per-phase goodput)."""

    def __init__(self, mode: str, prefill: PoolSpec | None = None,
                 decode: PoolSpec | None = None, transfer: TransferModel | None = None,
                 layerwise: bool = True) -> None:
        need = {"disaggregated": (prefill, decode), "prefill": (prefill,), "decode": (decode,),
                "colocated": (prefill,)}
        if mode not in need:
            raise ValueError(f"mode={mode!r}: choose one of {', '.join(need)}")
        if any(p is None for p in need[mode]):
            raise ValueError(f"mode {mode} is missing a pool spec (colocated: pass it as prefill)")
        self.mode, self.transfer, self.layerwise = mode, transfer or TransferModel(), layerwise
        self.pspec, self.dspec = prefill, decode
        self._events: list[tuple[float, int, Callable, object]] = []
        self._seq = itertools.count()

    def run(self, requests: Sequence[SimRequest]) -> SimResult:
        self.pre = [_Instance(self.pspec) for _ in range(self.pspec.replicas)] if self.pspec else []
        self.dec = [_Instance(self.dspec) for _ in range(self.dspec.replicas)] if self.dspec else []
        jobs = [_Job(r) for r in requests]
        if any(j.prompt < 1 or j.output < 1 for j in jobs):
            raise ValueError("every request needs prompt_len >= 1 and output_len >= 1")
        arrive = self._to_decode if self.mode == "decode" else self._arrive
        for j in jobs:
            self._push(j.arrival, arrive, j)
        while self._events:
            t, _, fn, arg = heapq.heappop(self._events)
            fn(t, arg)
        first = np.array([j.first for j in jobs])
        finish = np.array([j.finish for j in jobs])
        arrival = np.array([j.arrival for j in jobs])
        out = np.array([j.output for j in jobs])
        tpot = np.where(out > 1, (finish - first) / np.maximum(out - 1, 1), 0.0)
        if self.mode == "prefill":
            tpot[:] = 0.0
        return SimResult(first - arrival, tpot, finish)

    def _push(self, t: float, fn: Callable, arg: object) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, arg))

    # ---- prefill (and colocated) -----------------------------------------------------------
    def _arrive(self, t: float, job: _Job) -> None:
        inst = min(self.pre, key=lambda i: (i.load, i.dec.running))
        inst.queue.append(job)
        inst.load += job.prompt
        if not inst.busy:  # start after every event of this instant (batch simultaneous work)
            inst.busy = True
            self._push(t, self._start, inst)

    def _start(self, t: float, inst: _Instance) -> None:
        spec = inst.spec
        if self.mode == "colocated":
            b = inst.dec.running
            tokens, pairs = inst.take_chunks(spec.max_batched_tokens - b, spec.max_num_seqs - b)
            if b == 0 and not inst.chunks:
                inst.busy = False
                return
            dur = inst.lat.mixed_time(b, inst.dec.ctx, tokens, pairs)
        else:
            tokens, pairs = inst.take_chunks(spec.max_batched_tokens, spec.max_num_seqs)
            if not inst.chunks:
                inst.busy = False
                return
            dur = inst.lat.prefill(tokens, pairs)
        inst.busy = True
        self._push(t + dur, self._end, (inst, dur))

    def _end(self, t: float, arg: tuple[_Instance, float]) -> None:
        inst, dur = arg
        if self.mode == "colocated":
            inst.dec.advance(t)
        for job in inst.finish_chunks():
            job.first = t
            if job.output <= 1:
                job.finish = t
            elif self.mode == "colocated":
                inst.dec.join(job)
            elif self.mode == "prefill":
                job.finish = t  # the decode phase is not simulated; TPOT reads as 0
            else:
                self._send(t, job, dur)
        self._start(t, inst)

    def _send(self, t: float, job: _Job, step: float) -> None:
        dst = min(self.dec, key=lambda d: d.dec.running + len(d.waiting) + d.inflight)
        lat = dst.lat
        channels = min(self.pspec.latency.tp, lat.tp)  # one channel per rank pair
        x = job.prompt * lat.kv_bytes_per_token / (self.transfer.bandwidth_bytes_per_s * channels)
        if self.layerwise and lat.num_layers > 1:
            layers = lat.num_layers
            x = max(x / layers, x - step * (layers - 1) / layers)
        dst.inflight += 1
        self._push(t + self.transfer.latency_s + x, self._received, (dst, job))

    # ---- decode ----------------------------------------------------------------------------
    def _to_decode(self, t: float, job: _Job) -> None:
        job.first = t
        if job.output <= 1:
            job.finish = t
            return
        dst = min(self.dec, key=lambda d: d.dec.running + len(d.waiting))
        dst.inflight += 1
        self._received(t, (dst, job))

    def _received(self, t: float, arg: tuple[_Instance, _Job]) -> None:
        inst, job = arg
        inst.inflight -= 1
        inst.waiting.append(job)
        if not inst.busy:
            inst.busy = True
            self._push(t, self._decode_step, inst)

    def _decode_step(self, t: float, inst: _Instance) -> None:
        spec, cap = inst.spec, inst.lat.kv_capacity_tokens
        bs = spec.block_size
        while inst.waiting and inst.dec.running < spec.max_num_seqs:
            job = inst.waiting[0]
            need = -(-(job.prompt + job.output) // bs) * bs
            # a request larger than the whole pool still runs alone rather than block forever
            if cap is not None and inst.kv_used + need > cap and inst.dec.running > 0:
                break
            inst.waiting.popleft()
            job.reserved, inst.kv_used = need, inst.kv_used + need
            inst.dec.join(job)
        if inst.dec.running == 0:
            inst.busy = False
            return
        inst.busy = True
        dur = inst.lat.decode_time(inst.dec.running, inst.dec.ctx)
        self._push(t + dur, self._decode_end, inst)

    def _decode_end(self, t: float, inst: _Instance) -> None:
        for job in inst.dec.advance(t):
            inst.kv_used -= job.reserved
        self._decode_step(t, inst)


def simulate(mode: str, requests: Sequence[SimRequest], prefill: PoolSpec | None = None,
             decode: PoolSpec | None = None, transfer: TransferModel | None = None) -> SimResult:
    """Convenience wrapper: ``Simulator(mode, ...).run(requests)``."""
    return Simulator(mode, prefill, decode, transfer).run(requests)
