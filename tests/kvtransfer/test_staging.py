"""StagingPool: buffers come back for reuse (no fresh pages per message), across request
lengths that share a size class, and the idle cap is honoured."""

from __future__ import annotations

import torch
from pdserve.kvtransfer.staging import StagingPool, size_class

CPU = torch.device("cpu")


def test_size_classes_bound_the_waste_and_are_stable():
    for n in (1, 16, 4095, 4097, 3_145_744, 10**8 + 7):
        c = size_class(n)
        assert c >= n and size_class(c) == c
        assert c <= max(4096, n * 1.125)


def test_released_buffers_are_reused_by_nearby_sizes():
    pool = StagingPool()
    a = pool.take(3_000_000, CPU)
    assert a.numel() == 3_000_000 and a.dtype == torch.uint8 and a.is_contiguous()
    ptr = a.data_ptr()
    pool.give(a)
    b = pool.take(3_100_000, CPU)  # another request length, same size class
    assert b.data_ptr() == ptr and b.numel() == 3_100_000
    c = pool.take(3_100_000, CPU)  # b is in use: a new buffer
    assert c.data_ptr() != ptr


def test_idle_cap_drops_the_rest():
    pool = StagingPool(max_idle_bytes=2 << 20)
    bufs = [pool.take(1 << 20, CPU) for _ in range(4)]
    for buf in bufs:
        pool.give(buf)
    assert pool.idle_bytes <= 2 << 20
    pool.give(torch.empty(12345, dtype=torch.uint8))  # not one of ours: ignored
    assert pool.idle_bytes <= 2 << 20
