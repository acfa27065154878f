"""The engine's chunk-reuse policy: requests that mark document chunks get the region up to
their last chunk blended from the chunk store before the scheduler sees them.

Where it sits in a step::

    engine.step():  chunk_prefill.prepare(waiting)   ← blend waiting chunk requests
                    batch = scheduler.schedule()      ← they look like prefix-cache hits
                    runner.execute(batch) ...         ← the query after the chunks, as usual

``prepare`` takes waiting requests that carry ``chunks`` and hold no blocks yet, in queue
order: it allocates blocks for the region ``[0, E)`` (E = the end of the last chunk, at most
``len(prompt) - 1`` so that the step that samples always computes a token), fetches each
chunk's KV from the store (computing and storing the missing ones on their own first),
blends (``blend.blend_prefill``) and sets ``num_computed = E``. The scheduler then computes
the rest of the prompt exactly as after a prefix-cache hit, the prefill role's layer hook
sends all the request's blocks to the decode instance, and a preempted request (blocks
freed, ``num_computed = 0``) is simply blended again. Blended KV is approximate below ratio
1, so these requests never enter the prefix cache (``BlockManager`` checks ``req.chunks``).

One blend per step at least, then more while ``budget_tokens`` lasts, so that running
decodes are not stalled behind many blends.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .blend import BlendStats, blend_prefill, compute_alone
from .block_manager import BlockManager
from .chunk_cache import ChunkStore, chunk_hash, chunk_root
from .config import ChunkConfig
from .model import LlamaModel
from .request import Request

__all__ = ["ChunkPrefill"]


class ChunkPrefill:
    def __init__(self, cfg: ChunkConfig, model: LlamaModel, kv: torch.Tensor,
                 blocks: BlockManager, salt: str, budget_tokens: int) -> None:
        self.cfg = cfg
        self.model = model
        self.kv = kv  # the runner's paged cache
        self.blocks = blocks
        self.root = chunk_root(salt)
        self.budget_tokens = budget_tokens
        self.store = ChunkStore(cfg.memory_bytes, cfg.host_bytes, cfg.disk_bytes, cfg.disk_dir,
                                kv.device)
        self.stats = {"requests": 0, "chunks": 0, "chunks_computed": 0, "tokens_reused": 0,
                      "tokens_recomputed": 0}
        self.last: BlendStats | None = None

    def hashes(self, req: Request) -> list[int]:
        """The store keys of ``req``'s chunks (what the router looks up in Redis)."""
        return [chunk_hash(self.root, req.prompt_ids[s:e]) for s, e in req.chunks.spans]

    def warm(self, chunks: list[list[int]]) -> int:
        """Compute and store the KV of the chunks not held yet (a document set ahead of its
        queries). Returns how many were computed."""
        todo = {chunk_hash(self.root, c): c for c in chunks}
        todo = {h: c for h, c in todo.items() if h not in self.store}
        if todo:
            kvs = compute_alone(self.model, list(todo.values()), self.blocks.block_size)
            for h, kv in zip(todo, kvs):
                self.store.put(h, kv)
        return len(todo)

    def prepare(self, waiting: Iterable[Request]) -> None:
        budget = self.budget_tokens
        for req in list(waiting):
            if budget <= 0:
                break
            if req.chunks is None or not req.chunks.spans or req.block_ids or req.num_computed:
                continue
            end = min(req.chunks.spans[-1][1], len(req.prompt_ids) - 1)
            if end <= 0:
                continue
            if not self.blocks.can_allocate(self.blocks.blocks_for(end)):
                break  # blocks are short: the queue head waits (FCFS), as in the scheduler
            self._blend(req, end)
            budget -= end

    def _blend(self, req: Request, end: int) -> None:
        spans = [(s, e) for s, e in req.chunks.spans if s < end]
        hashes = [chunk_hash(self.root, req.prompt_ids[s:e]) for s, e in spans]
        found = {h: self.store.get(h) for h in dict.fromkeys(hashes)}
        missing = [h for h, kv in found.items() if kv is None]
        if missing:
            first = {h: (s, e) for h, (s, e) in zip(hashes, spans)}
            toks = [req.prompt_ids[first[h][0]:first[h][1]] for h in missing]
            for h, kv in zip(missing, compute_alone(self.model, toks, self.blocks.block_size)):
                found[h] = kv
                self.store.put(h, kv)
        bs = self.blocks.block_size
        req.block_ids = self.blocks.allocate_ids(self.blocks.blocks_for(end))
        table = req.block_ids
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(end)],
                             dtype=torch.int64, device=self.kv.device)
        chunks = [(s, found[h][:, :, : min(e, end) - s]) for h, (s, e) in zip(hashes, spans)]
        ratio = req.chunks.recompute_ratio
        ratio = self.cfg.recompute_ratio if ratio is None else ratio
        self.last = blend_prefill(self.model, self.kv, req.prompt_ids[:end], slots, chunks,
                                  ratio, min(self.cfg.select_layer, self.model.cfg.num_layers - 1))
        req.num_computed = end
        st = self.stats
        st["requests"] += 1
        st["chunks"] += len(spans)
        st["chunks_computed"] += len(missing)
        st["tokens_reused"] += self.last.num_reused - self.last.num_recomputed
        st["tokens_recomputed"] += self.last.num_recomputed
