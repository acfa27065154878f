"""The chunk store's tiers: LRU demotion device → host → disk → gone under byte budgets,
promotion on use, exact round trips, and the index callbacks (no model needed)."""

from __future__ import annotations

import torch
from pdserve.workers.chunk_cache import ChunkStore, chunk_hash, chunk_root


def kv(seed: int, n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, n, 2, 4, generator=g)  # [layers, K/V, n, heads, D]


SIZE = kv(0).numel() * 4  # bytes of one 8-token chunk


def test_hash_is_stable_salted_and_distinct_from_prefix_blocks():
    r1, r2 = chunk_root("model-a|float32"), chunk_root("model-b|float32")
    assert chunk_hash(r1, [1, 2, 3]) == chunk_hash(r1, [1, 2, 3])
    assert chunk_hash(r1, [1, 2, 3]) != chunk_hash(r2, [1, 2, 3])
    assert chunk_hash(r1, [1, 2, 3]) != chunk_hash(r1, [1, 2, 4])


def test_spill_through_tiers_and_back(tmp_path):
    stored, evicted = [], []
    st = ChunkStore(memory_bytes=SIZE, host_bytes=SIZE, disk_bytes=2 * SIZE,
                    disk_dir=tmp_path)
    st.on_stored, st.on_evicted = stored.extend, evicted.extend
    tensors = {h: kv(h) for h in range(1, 6)}
    for h in (1, 2, 3, 4):
        assert st.put(h, tensors[h])
    # newest in memory, then host, then the two oldest on disk
    assert [st.tier_of(h) for h in (4, 3, 2, 1)] == ["device", "host", "disk", "disk"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{1:016x}.pt", f"{2:016x}.pt"]
    assert st.usage() == {"device": SIZE, "host": SIZE, "disk": 2 * SIZE}
    # a 5th chunk pushes the least recently used one out of the last tier
    st.put(5, tensors[5])
    assert 1 not in st and len(st) == 4 and evicted == [1]
    assert not (tmp_path / f"{1:016x}.pt").exists()
    # a disk hit comes back exactly and is promoted; the others move down one tier
    got = st.get(2)
    assert torch.equal(got, tensors[2]) and st.tier_of(2) == "device"
    assert [st.tier_of(h) for h in (5, 4, 3)] == ["host", "disk", "disk"]
    for h in (3, 4, 5):
        assert torch.equal(st.get(h), tensors[h])
    assert stored == [1, 2, 3, 4, 5]
    assert st.get(1) is None and st.misses == 1
    st.close()
    assert sorted(evicted) == [1, 2, 3, 4, 5] and not any(tmp_path.iterdir())


def test_oversized_chunks_skip_tiers_and_put_refreshes():
    st = ChunkStore(memory_bytes=SIZE, host_bytes=4 * SIZE)
    big = kv(9, n=16)  # 2 * SIZE: too big for the device tier
    assert st.put(7, big) and st.tier_of(7) == "host"
    assert st.put(1, kv(1)) and st.put(2, kv(2))  # 1 demoted to host by 2
    assert st.tier_of(1) == "host"
    assert st.put(1, kv(1))  # already held: promoted, not duplicated
    assert st.tier_of(1) == "device" and len(st) == 3
    assert not ChunkStore(memory_bytes=SIZE).put(3, big)  # fits nowhere
    # no disk tier: demotion out of host forgets the chunk
    gone = []
    st.on_evicted = gone.extend
    for h in range(10, 14):
        st.put(h, kv(h))
    assert gone and all(h not in st for h in gone)
    assert st.usage()["host"] <= 4 * SIZE
