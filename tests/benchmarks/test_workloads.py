"""Workload generation: seeded, reproducible, the same requests at every rate."""

from __future__ import annotations

import itertools
import random
import statistics

import benchpath  # noqa: F401 - makes benchmarks/ modules importable
import pytest
from workloads import (
    WORKLOADS,
    LengthDist,
    arrival_times,
    make_requests,
    num_requests,
    probe_requests,
    smoke,
    token_range,
)

VOCAB = 49152


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_requests_are_reproducible(name):
    w = WORKLOADS[name]
    a = make_requests(w, 20, VOCAB, seed=0)
    b = make_requests(w, 20, VOCAB, seed=0)
    c = make_requests(w, 20, VOCAB, seed=1)
    assert a == b
    assert a != c


def test_more_requests_extend_the_same_sequence():
    w = WORKLOADS["chatbot"]
    assert make_requests(w, 30, VOCAB)[:10] == make_requests(w, 10, VOCAB)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_lengths_and_ids_stay_in_range(name):
    w = WORKLOADS[name]
    lo, hi = token_range(VOCAB)
    for r in make_requests(w, 200, VOCAB):
        assert w.input.lo <= len(r.prompt_ids) <= w.input.hi
        assert w.output.lo <= r.max_tokens <= w.output.hi
        assert all(lo <= t <= hi for t in r.prompt_ids)
    assert w.max_len <= 8192  # SmolLM2's context


def test_sampled_means_follow_the_scaled_published_means():
    # ShareGPT: 161 in / 338 out (vLLM paper), scaled by 0.5 then clipped (the clip trims the
    # long tail, so the sampled mean sits a little under the target).
    w = WORKLOADS["chatbot"]
    reqs = make_requests(w, 4000, VOCAB)
    mean_in = statistics.mean(len(r.prompt_ids) for r in reqs)
    mean_out = statistics.mean(r.max_tokens for r in reqs)
    assert 0.8 * 80.5 < mean_in < 1.05 * 80.5
    assert 0.8 * 169 < mean_out < 1.05 * 169


def test_lognormal_median_and_uniform():
    d = LengthDist(100, 0.8, 1, 10_000)
    rng = random.Random(0)
    xs = [d.sample(rng) for _ in range(20_000)]
    assert abs(statistics.median(xs) - d.median) / d.median < 0.05
    u = LengthDist(0, 0.0, 10, 20)
    ys = [u.sample(rng) for _ in range(1000)]
    assert min(ys) == 10 and max(ys) == 20 and u.median == 15


def test_scaling_keeps_the_shape():
    d = LengthDist(200, 0.9, 10, 1000).scaled(0.5)
    assert (d.mean, d.sigma, d.lo, d.hi) == (100, 0.9, 5, 500)


def test_arrivals_are_poisson_and_compress_with_rate():
    w = WORKLOADS["chatbot"]
    a1 = arrival_times(w, 5000, 1.0)
    a4 = arrival_times(w, 5000, 4.0)
    assert a1[0] == 0.0 and a1 == sorted(a1)
    assert a4 == pytest.approx([t / 4 for t in a1])
    gaps = [b - a for a, b in itertools.pairwise(a1)]
    assert statistics.mean(gaps) == pytest.approx(1.0, rel=0.05)
    # exponential gaps: the standard deviation equals the mean
    assert statistics.stdev(gaps) == pytest.approx(1.0, rel=0.08)
    assert arrival_times(w, 10, 2.0, seed=0) == arrival_times(w, 10, 2.0, seed=0)
    with pytest.raises(ValueError):
        arrival_times(w, 3, 0.0)


def test_num_requests_is_clamped():
    assert num_requests(0.1, 20, 10, 60) == 10
    assert num_requests(2.0, 20, 10, 60) == 40
    assert num_requests(10.0, 20, 10, 60) == 60


def test_probes_use_the_median_prompt_and_distinct_ids():
    w = WORKLOADS["code"]
    probes = probe_requests(w, 3, VOCAB)
    assert {len(p.prompt_ids) for p in probes} == {w.input.median}
    assert len({p.prompt_ids for p in probes}) == 3  # no shared prefix for a cache to serve
    assert all(p.max_tokens == min(128, w.output.median) for p in probes)
    real = {r.prompt_ids[:16] for r in make_requests(w, 50, VOCAB)}
    assert not real & {p.prompt_ids[:16] for p in probes}


def test_smoke_workload_is_tiny_and_fits_a_tiny_vocab():
    w = smoke(WORKLOADS["summarization"])
    reqs = make_requests(w, 6, 384)
    assert all(len(r.prompt_ids) <= 48 and r.max_tokens <= 24 for r in reqs)
    assert all(max(r.prompt_ids) < 384 for r in reqs)
    assert w.rates == (1.0, 2.0)
