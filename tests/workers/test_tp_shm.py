"""Shared-memory collectives: correct sums and gathers, and loud failures (two threads as ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from pdserve.workers.parallel import TPError
from pdserve.workers.tp_shm import ShmCollectives, create_segment, shm_supported

pytestmark = pytest.mark.skipif(not shm_supported(), reason="x86-64 with /dev/shm only")

CAP = 64 * 1024


@pytest.fixture
def segment():
    path = create_segment(2, CAP)
    yield path
    os.unlink(path)


def test_two_ranks_sum_and_gather_like_one(segment):
    me = os.getpid()
    ranks = [ShmCollectives(segment, r, 2, CAP, [me, me], timeout_s=10) for r in range(2)]
    shapes = [(1, 576), (16, 576), (3, 7), (1, 1)]
    results: dict[int, list] = {0: [], 1: []}

    def run(r: int) -> None:
        g = torch.Generator().manual_seed(r)
        for i in range(12):
            shape = shapes[i % len(shapes)]
            dtype = torch.bfloat16 if i % 3 == 2 else torch.float32
            t = torch.randn(shape, generator=g).to(dtype)
            if i % 4 == 3:
                results[r].append(("gather", t.clone(), ranks[r].gather(t)))
            else:
                before = t.clone()
                ranks[r].all_reduce(t)
                results[r].append(("sum", before, t))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not any(th.is_alive() for th in threads)
    for (kind, a, out0), (_, b, out1) in zip(results[0], results[1], strict=True):
        if kind == "sum":
            assert torch.equal(out0, a + b) and torch.equal(out1, out0)  # bit-identical
        else:
            assert out1 is None and torch.equal(out0[0], a) and torch.equal(out0[1], b)


def test_dead_peer_is_reported_within_milliseconds(segment):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a pid that no longer exists
    rank0 = ShmCollectives(segment, 0, 2, CAP, [os.getpid(), p.pid], timeout_s=30)
    t0 = time.monotonic()
    with pytest.raises(TPError, match=rf"rank 1 \(pid {p.pid}\) died"):
        rank0.all_reduce(torch.ones(4))
    assert time.monotonic() - t0 < 1


def test_silent_peer_times_out(segment):
    rank0 = ShmCollectives(segment, 0, 2, CAP, [os.getpid(), os.getpid()], timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(TPError, match=r"did not answer within 0.3s"):
        rank0.all_reduce(torch.ones(4))
    assert 0.3 <= time.monotonic() - t0 < 3


def test_only_small_cpu_tensors_take_the_shm_path(segment):
    c = ShmCollectives(segment, 0, 2, CAP, [os.getpid()] * 2, timeout_s=1)
    assert c.fits(torch.ones(16, 576))
    assert not c.fits(torch.ones(CAP // 4 + 1))
    assert not c.fits(torch.ones(8, 8).t())  # not contiguous
