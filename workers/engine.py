"""One engine instance: scheduler + block manager + model runner + sampler. Imports no Ray.

    batch = scheduler.schedule(); logits = runner.execute(batch); scheduler.commit(...)

The Serve deployments are thin adapters over this class (and ``AsyncEngine`` for streaming).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import torch

from .block_manager import BlockManager
from .chunk_prefill import ChunkPrefill
from .config import EngineConfig
from .model import LlamaModel
from .request import Chunks, Request, RequestOutput, SamplingParams, Status
from .runner import ModelRunner
from .sampler import Sampler
from .scheduler import QueueFull, ScheduledBatch, Scheduler

log = logging.getLogger(__name__)

__all__ = ["Engine", "QueueFull"]


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        model: LlamaModel | None = None,
        runner: ModelRunner | None = None,  # a ready runner (tensor parallelism brings its own)
    ) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        mcfg = config.model
        self.model = model or (runner.model if runner is not None else LlamaModel(mcfg))
        self.runner = runner or ModelRunner(self.model, config.cache)
        self.blocks = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.prefix_caching,
            salt=f"{mcfg.path}|{mcfg.dtype}",
        )
        max_len = config.scheduler.max_model_len or mcfg.max_position_embeddings
        self.max_model_len = min(max_len, mcfg.max_position_embeddings)
        self.scheduler = Scheduler(config.scheduler, self.blocks, self.max_model_len)
        self.sampler = Sampler(config.seed)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        # on_layer(i, batch): runs once layer i's KV of ``batch`` is in the cache (the
        # KV-transfer layer pushes layer i from here while layer i+1 computes)
        self.on_layer: Callable[[int, ScheduledBatch], None] | None = None
        # RAG chunk reuse (CacheBlend), single-rank engines only (a TP engine prefills chunk
        # requests in full)
        self.chunk_prefill: ChunkPrefill | None = None
        if config.chunks.enabled and self.model.all_reduce is None:
            self.chunk_prefill = ChunkPrefill(
                config.chunks, self.model, self.runner.kv, self.blocks,
                f"{mcfg.path}|{mcfg.dtype}", config.scheduler.max_num_batched_tokens)
        log.info(
            "engine ready: %s, role=%s, %d KV blocks of %d tokens",
            mcfg.architecture, config.scheduler.role, self.blocks.num_blocks,
            config.cache.block_size,
        )

    # ---- requests ------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
        chunks: Chunks | None = None,
    ) -> Request:
        if not prompt_ids:
            raise ValueError("the prompt is empty: send at least one token")
        vocab = self.config.model.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        req = Request(rid, list(prompt_ids), params, self.config.model.eos_token_ids)
        if chunks is not None and chunks.spans and self.chunk_prefill is not None:
            if chunks.spans[-1][1] > len(prompt_ids):
                raise ValueError(f"chunk span {chunks.spans[-1]} ends past the prompt's "
                                 f"{len(prompt_ids)} tokens")
            req.chunks = chunks
        self.scheduler.add(req)
        self.requests[rid] = req
        return req

    def add_prefilled(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        first_token: int,
        first_logprobs: dict[int, float] | None,
        block_ids: list[int],
        chunks: Chunks | None = None,
    ) -> Request:
        """Decode role: a request whose prompt KV already sits in ``block_ids`` (received
        from a prefill instance) and whose first token was sampled there. With ``chunks``
        that KV was blended: it stays out of the prefix cache."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(request_id, list(prompt_ids), params, self.config.model.eos_token_ids)
        req.chunks = chunks
        req.output_ids.append(first_token)
        if first_logprobs is not None:
            req.output_logprobs.append(first_logprobs)
        req.num_computed = len(prompt_ids)
        req.block_ids = list(block_ids)
        self.scheduler.add_prefilled(req)
        self.requests[request_id] = req
        return req

    # ---- live migration (workers/migration.py drives these) -------------------------------
    def detach(self, request_id: str) -> Request | None:
        """Pause a decoding request: it leaves the batch but keeps its blocks (the caller now
        owns them: ``reattach`` or ``blocks.free``). None if it is not decoding here."""
        req = self.requests.get(request_id)
        if req is None or req.status is not Status.RUNNING or req.in_prefill:
            return None
        self.scheduler.remove(request_id)
        del self.requests[request_id]
        return req

    def reattach(self, req: Request) -> None:
        """Undo ``detach``: the request decodes on from where it paused."""
        self.requests[req.request_id] = req
        self.scheduler.add_prefilled(req)

    def add_migrated(self, request_id: str, prompt_ids: list[int], output_ids: list[int],
                     output_logprobs: list[dict[int, float]], params: SamplingParams,
                     block_ids: list[int], generator: torch.Generator | None = None) -> Request:
        """A decoding request moved here from another instance: the KV of every token but
        the last sits in ``block_ids``; decoding goes on with the next token."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(request_id, list(prompt_ids), params, self.config.model.eos_token_ids)
        req.output_ids.extend(output_ids)
        req.output_logprobs.extend(output_logprobs)
        req.num_computed = req.num_tokens - 1
        req.block_ids = list(block_ids)
        req.generator = generator
        self.scheduler.add_prefilled(req)
        self.requests[request_id] = req
        return req

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks. Unknown ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.remove(request_id)
        if req.block_ids:
            self.blocks.free(req)
        req.status, req.finish_reason = Status.FINISHED, "abort"
        return True

    def finish(self, request_id: str, reason: str) -> None:
        """End a request early (a stop string found by the detokenizer)."""
        req = self.requests.pop(request_id, None)
        if req is not None and not req.status.done:
            self.scheduler.finish(req, reason)

    def release(self, request_id: str) -> None:
        """Prefill role: the KV of a prefilled request has been handed off; free its blocks."""
        self.requests.pop(request_id, None)
        self.scheduler.release(request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.chunk_prefill is not None:
            self.chunk_prefill.prepare(self.scheduler.waiting)
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        hook = self.on_layer
        logits = self.runner.execute(batch, (lambda i: hook(i, batch)) if hook else None)
        samples = batch.samples()
        reqs = [r for r, s in zip(batch.requests, samples) if s]
        toks, lps = self.sampler(logits, reqs) if reqs else ([], [])
        it = iter(zip(toks, lps))
        tokens, logprobs = [], []
        for s in samples:
            t, lp = next(it) if s else (None, None)
            tokens.append(t)
            logprobs.append(lp)
        outs = self.scheduler.commit(batch, tokens, logprobs)
        for o in outs:
            req = self.requests.get(o.request_id)
            if req is not None and req.status is Status.FINISHED:
                self.requests.pop(o.request_id)  # held (prefilled) requests stay until release
        return outs

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "free_blocks": self.blocks.num_free,
            "total_blocks": self.blocks.num_blocks,
            "preemptions": self.scheduler.num_preemptions,
            "cached_blocks": self.blocks.num_cached,
            "prefix_hit_rate": self.blocks.hits / max(1, self.blocks.queries),
        }
