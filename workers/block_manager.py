"""KV block accounting: ids, reference counts, the free list and the prefix cache.
Never touches tensors.

The model runner owns the cache tensors; this class only decides which block ids a request
may write. Invariant (checked by ``check_invariants``): every block is either free with
refcount 0, or held with refcount >= 1 — never both, never lost.

Prefix cache. A *full* block is named by a chain hash over everything that determines its
KV: the salt (model + dtype), the parent block's hash, and the block's token ids::

    h0 = H(salt, tokens[0:16])   h1 = H(h0, tokens[16:32])   h2 = H(h1, tokens[32:48]) ...

so equal hashes mean equal prefixes. When a request frees its blocks, full hashed blocks
stay cached: they go to the free list in LRU order (the least recently freed is reused
first) but keep their hash, and a later request whose prompt starts with the same blocks
takes them back (refcount 0 → 1) instead of recomputing. A block is forgotten only when it
is handed out again as a fresh block (eviction). Shared blocks are never written: a request
only writes past its matched prefix, into blocks of its own.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from .request import Request


class NoFreeBlocks(RuntimeError):
    pass


def chain_hash(parent: int, tokens: Sequence[int]) -> int:
    """63-bit stable hash (same in every process, unlike ``hash`` of str)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent.to_bytes(8, "little"))
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def prefix_hashes(root: int, tokens: Sequence[int], block_size: int) -> list[int]:
    """Chain hashes of every full block of ``tokens`` (what the router looks up)."""
    out: list[int] = []
    for i in range(len(tokens) // block_size):
        out.append(chain_hash(out[-1] if out else root, tokens[i * block_size:(i + 1) * block_size]))
    return out


def salt_hash(salt: str) -> int:
    return int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little") >> 1


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False,
                 salt: str = "") -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.root = salt_hash(salt)
        # free blocks in eviction order (front = least recently freed); value unused
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._ref = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        self._block_of: dict[int, int] = {}  # hash -> block holding it
        # callbacks for a global index (Redis): called with lists of hashes
        self.on_cached: Callable[[list[int]], None] | None = None
        self.on_evicted: Callable[[list[int]], None] | None = None
        self.hits = 0  # prompt tokens served from the cache
        self.queries = 0  # prompt tokens looked up

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing(self, req: Request, num_tokens: int) -> int:
        """Blocks ``req`` still needs so that ``num_tokens`` of its tokens have a slot."""
        return max(0, self.blocks_for(num_tokens) - len(req.block_ids))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    # ---- fresh blocks ----------------------------------------------------------------------
    def allocate_ids(self, n: int) -> list[int]:
        """Take ``n`` fresh blocks (refcount 1), evicting cached ones LRU-first; all or none."""
        if n > len(self._free):
            raise NoFreeBlocks(f"need {n} KV blocks, {len(self._free)} free")
        ids = []
        evicted = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self._hash_of[b]
            if h is not None:
                self._hash_of[b] = None
                if self._block_of.get(h) == b:
                    del self._block_of[h]
                    evicted.append(h)
            self._ref[b] = 1
            ids.append(b)
        if evicted and self.on_evicted is not None:
            self.on_evicted(evicted)
        return ids

    def allocate(self, req: Request, num_tokens: int) -> None:
        """Grow ``req.block_ids`` so that its first ``num_tokens`` tokens have slots."""
        req.block_ids.extend(self.allocate_ids(self.num_missing(req, num_tokens)))

    def free_ids(self, ids: list[int]) -> None:
        # Freed in reverse so a request's later blocks are evicted before its earlier ones
        # (the head of a shared prefix stays cached longest).
        for b in reversed(ids):
            if self._ref[b] <= 0:
                raise RuntimeError(f"double free of KV block {b}")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None

    def free(self, req: Request) -> None:
        self.free_ids(req.block_ids)
        req.block_ids = []

    # ---- prefix cache ----------------------------------------------------------------------
    def block_hashes(self, req: Request, upto_tokens: int) -> list[int]:
        """Chain hashes of ``req``'s full blocks among its first ``upto_tokens`` tokens
        (memoized on the request as it grows)."""
        hs = req.block_hashes
        bs = self.block_size
        ids = None
        for i in range(len(hs), upto_tokens // bs):
            ids = ids or req.all_ids
            hs.append(chain_hash(hs[-1] if hs else self.root, ids[i * bs:(i + 1) * bs]))
        return hs[: upto_tokens // bs]

    def match_prefix(self, req: Request) -> int:
        """Give a fresh request (no blocks yet) the cached blocks of its longest cached
        prefix, leaving at least one token to compute. Returns the tokens matched."""
        if not self.prefix_caching or req.block_ids or req.num_computed or req.chunks:
            return 0
        n = req.num_tokens
        self.queries += n
        matched = []
        for h in self.block_hashes(req, n - 1):
            b = self._block_of.get(h)
            if b is None:
                break
            matched.append(b)
        for b in matched:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
        req.block_ids = matched
        req.num_computed = len(matched) * self.block_size
        self.hits += req.num_computed
        return req.num_computed

    def unmatch(self, req: Request) -> None:
        """Undo ``match_prefix`` for a request that could not be admitted after all."""
        self.hits -= req.num_computed
        self.queries -= req.num_tokens
        self.free(req)
        req.num_computed = 0

    def commit_full_blocks(self, req: Request) -> None:
        """Publish the hashes of ``req``'s blocks that are now completely computed (never
        those of a request with blended chunk KV: not what its tokens alone produce)."""
        if not self.prefix_caching or req.chunks:
            return
        full = req.num_computed // self.block_size
        hs = self.block_hashes(req, full * self.block_size)
        new = []
        for i in range(req.num_cached_blocks, full):
            b, h = req.block_ids[i], hs[i]
            if self._hash_of[b] is None and h not in self._block_of:
                self._hash_of[b] = h
                self._block_of[h] = b
                new.append(h)
        req.num_cached_blocks = max(req.num_cached_blocks, full)
        if new and self.on_cached is not None:
            self.on_cached(new)

    def cached_hashes(self) -> list[int]:
        return list(self._block_of)

    def check_invariants(self) -> None:
        assert len(set(self._free)) == len(self._free), "a block is on the free list twice"
        for b in range(self.num_blocks):
            if b in self._free:
                assert self._ref[b] == 0, f"free block {b} has refcount {self._ref[b]}"
            else:
                assert self._ref[b] > 0, f"block {b} is neither free nor referenced (leak)"
        for h, b in self._block_of.items():
            assert self._hash_of[b] == h, f"index says block {b} holds {h}, block disagrees"
