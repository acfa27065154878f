"""Sampler: seeded reproducibility and the support of top-k / top-p (checked on distributions)."""

from __future__ import annotations

import torch

from pdserve.workers.request import Request, SamplingParams
from pdserve.workers.sampler import Sampler


def req(**kw) -> Request:
    return Request("r", [1], SamplingParams(**kw))


def test_top_k_restricts_support_to_k_largest():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    reqs = [req(top_k=5), req(top_k=1, temperature=0.5), req(top_k=50)]
    probs = Sampler.probabilities(logits, reqs)
    for i, k in enumerate([5, 1, 50]):
        support = set(torch.nonzero(probs[i]).flatten().tolist())
        assert support == set(logits[i].topk(k).indices.tolist())
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for p, expect in [(0.5, {0}), (0.6, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})]:
        probs = Sampler.probabilities(logits, [req(top_p=p)])
        assert set(torch.nonzero(probs[0]).flatten().tolist()) == expect, p
        kept = probs[0][list(expect)]
        torch.testing.assert_close(kept / kept.sum(), kept)  # renormalized


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    hot = Sampler.probabilities(logits, [req(temperature=2.0)])
    cold = Sampler.probabilities(logits, [req(temperature=0.5)])
    assert cold[0, 0] > hot[0, 0]


def test_seeded_requests_reproduce_regardless_of_batch():
    torch.manual_seed(1)
    logits = torch.randn(40, 100)
    a = [req(temperature=1.0, seed=7) for _ in range(1)]
    seq_a = [Sampler(0)(logits[i : i + 1], a)[0][0] for i in range(40)]
    # same seed, but sharing the batch with unseeded rows and a different default seed
    b = req(temperature=1.0, seed=7)
    other = req(temperature=1.0)
    s = Sampler(123)
    seq_b = [s(torch.stack([logits[i], logits[i]]), [other, b])[0][1] for i in range(40)]
    assert seq_a == seq_b
    c = req(temperature=1.0, seed=8)
    seq_c = [Sampler(0)(logits[i : i + 1], [c])[0][0] for i in range(40)]
    assert seq_c != seq_a


def test_sampling_frequencies_follow_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    r = req(temperature=1.0, seed=3)
    s = Sampler()
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[s(logits, [r])[0][0]] += 1
    torch.testing.assert_close(counts / 3000, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)


def test_logprobs_are_log_softmax_and_include_chosen():
    logits = torch.tensor([[3.0, 1.0, 0.5, -1.0]])
    toks, lps = Sampler()(logits, [req(temperature=0, logprobs=2)])
    lp = torch.log_softmax(logits, -1)[0]
    assert toks == [0]
    assert set(lps[0]) == {0, 1}
    assert abs(lps[0][1] - float(lp[1])) < 1e-6


def test_extreme_parameters_never_produce_nan():
    torch.manual_seed(2)
    logits = torch.randn(3, 40) * 30
    reqs = [req(top_p=5e-324), req(temperature=1e-30, top_k=3), req(temperature=2.0, top_p=1e-9)]
    probs = Sampler.probabilities(logits, reqs)
    assert torch.isfinite(probs).all()
    for i in range(3):
        assert probs[i].argmax() == logits[i].argmax() and probs[i].max() == 1.0
    toks, _ = Sampler(0)(logits, reqs)
    assert toks == logits.argmax(-1).tolist()
