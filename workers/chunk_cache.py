"""The chunk store: the KV of RAG document chunks, each computed once on its own, kept in
tiers under size limits. Owns chunk tensors; knows nothing of requests or blocks.

A chunk is named by a hash of its token ids (and the model + dtype salt), so the same
document text tokenized the same way finds the same KV in any request at any position. The
stored KV is what the chunk produces alone at positions ``0..n-1``: one tensor
``[layers, 2, n, kv_heads, head_dim]`` (K at 0, V at 1; K already rotated by RoPE for
positions 0..n-1, see ``blend.rerotate`` for moving it).

Tiers, fastest first: ``device`` (the instance's memory), ``host`` (CPU RAM), ``disk``
(one file per chunk). Each is an LRU with a byte budget::

    put / get ──► device ──evict LRU──► host ──evict LRU──► disk ──evict LRU──► gone
                    ▲                     │                   │
                    └──── get promotes ───┴───────────────────┘

A chunk bigger than a tier's whole budget skips that tier. ``on_stored`` / ``on_evicted``
(lists of hashes) fire when a chunk enters the store or leaves its last tier: the global
chunk index (Redis) follows the store through them. On CPU the device and host tiers are
both RAM; they stay separate budgets so the same code runs on a GPU.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .block_manager import chain_hash, salt_hash

__all__ = ["ChunkStore", "chunk_hash", "chunk_root"]


def chunk_root(salt: str) -> int:
    """The hash root of chunk names (distinct from the prefix cache's block-chain root)."""
    return salt_hash(f"{salt}|chunk")


def chunk_hash(root: int, token_ids: Sequence[int]) -> int:
    """63-bit stable name of a chunk's token ids (the key of the store and the Redis index)."""
    return chain_hash(root, token_ids)


@dataclass
class _Tier:
    name: str
    budget: int  # bytes
    used: int = 0
    entries: OrderedDict[int, object] = field(default_factory=OrderedDict)  # LRU first


class ChunkStore:
    def __init__(self, memory_bytes: int, host_bytes: int = 0, disk_bytes: int = 0,
                 disk_dir: str | Path | None = None, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.tiers = [_Tier("device", memory_bytes), _Tier("host", host_bytes),
                      _Tier("disk", disk_bytes)]
        self._own_dir = disk_bytes > 0 and disk_dir is None
        self.disk_dir = Path(tempfile.mkdtemp(prefix="pdserve-chunks-")) if self._own_dir \
            else (Path(disk_dir) if disk_dir else None)
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
        self._size: dict[int, int] = {}  # hash -> bytes, for every chunk held in any tier
        self.on_stored: Callable[[list[int]], None] | None = None
        self.on_evicted: Callable[[list[int]], None] | None = None
        self.hits = 0  # get() found the chunk
        self.misses = 0

    # ---- queries -----------------------------------------------------------------------
    def __contains__(self, h: int) -> bool:
        return h in self._size

    def __len__(self) -> int:
        return len(self._size)

    def hashes(self) -> list[int]:
        """Every chunk held, any tier (what the global index should list for this instance)."""
        return list(self._size)

    def tier_of(self, h: int) -> str | None:
        return next((t.name for t in self.tiers if h in t.entries), None)

    def usage(self) -> dict[str, int]:
        return {t.name: t.used for t in self.tiers}

    # ---- put / get ---------------------------------------------------------------------
    def put(self, h: int, kv: torch.Tensor) -> bool:
        """Store a chunk's KV (``[layers, 2, n, kv_heads, head_dim]``); False if it fits in no
        tier. Storing a chunk already held only refreshes its recency."""
        if h in self._size:
            self.get(h)
            return True
        size = kv.numel() * kv.element_size()
        if not self._insert(0, h, kv, size):
            return False
        self._size[h] = size
        if self.on_stored is not None:
            self.on_stored([h])
        return True

    def get(self, h: int) -> torch.Tensor | None:
        """The chunk's KV on the device (promoted to the device tier), or None."""
        for i, t in enumerate(self.tiers):
            if h not in t.entries:
                continue
            self.hits += 1
            kv = self._load(t, h)
            if i == 0:
                t.entries.move_to_end(h)
                return kv
            self._remove(t, h)
            self._insert(0, h, kv, self._size[h])
            return kv.to(self.device)
        self.misses += 1
        return None

    # ---- tiers -------------------------------------------------------------------------
    def _insert(self, i: int, h: int, kv: torch.Tensor, size: int) -> bool:
        """Put ``h`` into tier ``i`` or the first lower tier that can hold it, demoting LRU
        entries as needed. False (and the chunk forgotten) when no tier can hold it."""
        while i < len(self.tiers) and self.tiers[i].budget < size:
            i += 1
        if i == len(self.tiers):
            return False
        t = self.tiers[i]
        while t.used + size > t.budget:
            old, _ = next(iter(t.entries.items()))
            old_kv = self._load(t, old)
            self._remove(t, old)
            if not self._insert(i + 1, old, old_kv, self._size[old]):
                self._forget(old)
        if t.name == "disk":
            path = self.disk_dir / f"{h:016x}.pt"
            torch.save(kv.cpu(), path)
            t.entries[h] = path
        else:
            t.entries[h] = kv.to(self.device) if t.name == "device" else kv.cpu()
        t.used += size
        return True

    def _load(self, t: _Tier, h: int) -> torch.Tensor:
        item = t.entries[h]
        if isinstance(item, Path):
            return torch.load(item, weights_only=True)
        return item

    def _remove(self, t: _Tier, h: int) -> None:
        item = t.entries.pop(h)
        t.used -= self._size[h]
        if isinstance(item, Path):
            item.unlink(missing_ok=True)

    def _forget(self, h: int) -> None:
        del self._size[h]
        if self.on_evicted is not None:
            self.on_evicted([h])

    def clear(self) -> None:
        gone = list(self._size)
        for t in self.tiers:
            for h in list(t.entries):
                self._remove(t, h)
        self._size.clear()
        if gone and self.on_evicted is not None:
            self.on_evicted(gone)

    def close(self) -> None:
        self.clear()
        if self._own_dir and self.disk_dir is not None:
            shutil.rmtree(self.disk_dir, ignore_errors=True)
