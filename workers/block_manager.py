"""KV block accounting: ids, reference counts and the free list. Never touches tensors.

The model runner owns the cache tensors; this class only decides which block ids a request
may write. Invariant (checked by ``check_invariants``): every block is either on the free
list with refcount 0, or held with refcount >= 1 — never both, never lost.
"""

from __future__ import annotations

from collections import deque

from .request import Request


class NoFreeBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing(self, req: Request, num_tokens: int) -> int:
        """Blocks ``req`` still needs so that ``num_tokens`` of its tokens have a slot."""
        return max(0, self.blocks_for(num_tokens) - len(req.block_ids))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate_ids(self, n: int) -> list[int]:
        """Take ``n`` fresh blocks (refcount 1); all or nothing."""
        if n > len(self._free):
            raise NoFreeBlocks(f"need {n} KV blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        for b in ids:
            self._ref[b] = 1
        return ids

    def allocate(self, req: Request, num_tokens: int) -> None:
        """Grow ``req.block_ids`` so that its first ``num_tokens`` tokens have slots."""
        req.block_ids.extend(self.allocate_ids(self.num_missing(req, num_tokens)))

    def free_ids(self, ids: list[int]) -> None:
        for b in ids:
            if self._ref[b] <= 0:
                raise RuntimeError(f"double free of KV block {b}")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)

    def free(self, req: Request) -> None:
        self.free_ids(req.block_ids)
        req.block_ids = []

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for b in range(self.num_blocks):
            if b in free:
                assert self._ref[b] == 0, f"free block {b} has refcount {self._ref[b]}"
            else:
                assert self._ref[b] > 0, f"block {b} is neither free nor referenced (leak)"
