"""Block manager invariants under random request streams (pure logic, no tensors)."""

from __future__ import annotations

import random

import pytest

from pdserve.workers.block_manager import BlockManager, NoFreeBlocks
from pdserve.workers.request import Request, SamplingParams


def test_random_streams_return_every_block():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    live: list[tuple[Request, int]] = []
    for step in range(3000):
        op = rng.random()
        if op < 0.4:
            r = Request(f"r{step}", [1] * rng.randint(1, 20), SamplingParams())
            n = len(r.prompt_ids)
            if bm.can_allocate(bm.num_missing(r, n)):
                bm.allocate(r, n)
                live.append((r, n))
        elif op < 0.8 and live:
            i = rng.randrange(len(live))
            r, n = live[i]
            n += rng.randint(1, 6)
            try:
                bm.allocate(r, n)
                live[i] = (r, n)
            except NoFreeBlocks:
                assert bm.num_missing(r, n) > bm.num_free
        elif live:
            r, _ = live.pop(rng.randrange(len(live)))
            bm.free(r)
            assert r.block_ids == []
        bm.check_invariants()
        held = sum(len(r.block_ids) for r, _ in live)
        assert held + bm.num_free == bm.num_blocks
        for r, n in live:
            assert len(r.block_ids) == bm.blocks_for(n)
    for r, _ in live:
        bm.free(r)
    bm.check_invariants()
    assert bm.num_free == bm.num_blocks


def test_allocation_is_all_or_nothing_and_double_free_is_caught():
    bm = BlockManager(num_blocks=4, block_size=16)
    with pytest.raises(NoFreeBlocks):
        bm.allocate_ids(5)
    assert bm.num_free == 4
    ids = bm.allocate_ids(2)
    bm.free_ids(ids)
    with pytest.raises(RuntimeError, match="double free"):
        bm.free_ids(ids)
