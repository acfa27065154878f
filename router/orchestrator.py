"""A request's journey through the pools (ARCHITECTURE.md steps 3–6), as an async stream.

disaggregated:  reserve on a decode instance D  →  prefill on P, which pushes the KV to D
                layer by layer and returns the first token (TTFT)  →  stream the rest from D.
colocated:      stream everything from one colocated instance.

The consumer (the HTTP/gRPC layer) iterates ``run(job)``; closing the iterator (client gone,
stop string found) aborts the request on every instance it touched. A failure before the
first token is retried on other instances (``retries``); after it, the error surfaces.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from pdserve.workers.block_manager import prefix_hashes, salt_hash
from pdserve.workers.chunk_cache import chunk_root
from pdserve.workers.instance import NoCapacity
from pdserve.workers.messages import Job, TokenChunk

from .chunks import held_chunk_tokens
from .policy import RoutingHint

log = logging.getLogger(__name__)


class Unavailable(RuntimeError):
    """No instance could take the request in time (HTTP 503)."""


class Handback(RuntimeError):
    """A draining decode instance returned a running request to the router."""


class Orchestrator:
    def __init__(self, mode: str, prefill=None, decode=None, colocated=None,
                 timeout_s: float = 30.0, retries: int = 1, index=None,
                 block_size: int = 16, salt: str = "") -> None:
        self.mode = mode
        self.prefill, self.decode, self.colocated = prefill, decode, colocated
        self.timeout = timeout_s
        self.retries = retries
        self.index = index  # cluster.metadata.MetadataStore, or None: load-only routing
        self.block_size = block_size
        self.root = salt_hash(salt)
        self.chunk_root = chunk_root(salt)
        self.max_recoveries = 3
        self.app_name: str | None = None  # set by the ingress; used to refresh handles
        self.migrator = None  # router.migration.MigrationController (disaggregated mode)
        self.connect_early = False  # open the destination's stream when a hand-over starts
        self.stats = {"requests": 0, "retries": 0, "failures": 0, "recoveries": 0,
                      "migrations": 0,
                      "index_errors": 0,
                      "prompt_tokens": 0, "index_hit_tokens": 0}
        self._index_ok = True

    async def hint(self, job: Job) -> RoutingHint:
        """Which instances hold how much of this prompt (one Redis round trip). With Redis
        down, routing continues on load alone (with a warning and a counter)."""
        n = len(job.prompt_ids)
        self.stats["prompt_tokens"] += n
        if self.index is None:
            return RoutingHint(n, {})
        hashes = prefix_hashes(self.root, job.prompt_ids[: n - 1], self.block_size)
        try:
            held: dict[str, int] = {}
            if job.chunks is not None and job.chunks.spans:  # RAG chunks: see router/chunks.py
                held = await asyncio.to_thread(held_chunk_tokens, self.index, self.chunk_root,
                                               job)
                hashes = []
            blocks = await asyncio.to_thread(self.index.longest_prefix, hashes) if hashes else {}
        except Exception as e:  # noqa: BLE001 - redis errors of any kind
            self.stats["index_errors"] += 1
            if self._index_ok:
                log.warning("prefix index unavailable (%s): routing on load only", e)
            self._index_ok = False
            return RoutingHint(n, {})
        if not self._index_ok:
            log.warning("prefix index is back")
        self._index_ok = True
        cached = {i: b * self.block_size for i, b in blocks.items()} | held
        self.stats["index_hit_tokens"] += max(cached.values(), default=0)
        return RoutingHint(n, cached)

    async def run(self, job: Job) -> AsyncIterator[TokenChunk]:
        self.stats["requests"] += 1
        if self.mode == "colocated":
            hint = await self.hint(job)
            stream = self.colocated.options(stream=True).generate_full.remote(job, routing=hint)
            try:
                async for c in stream:
                    yield c
            finally:
                stream.cancel()
            return
        async for c in self._disaggregated(job):
            yield c

    async def _reserve(self, job: Job, hint: RoutingHint):
        """A decode reservation, waiting (bounded) while every decode instance is full."""
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            try:
                return await self.decode.reserve.remote(job, routing=hint)
            except NoCapacity:
                if time.monotonic() + delay > deadline:
                    raise Unavailable("no decode instance has free KV blocks; retry later") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _disaggregated(self, job: Job) -> AsyncIterator[TokenChunk]:
        """``_pass`` plus recovery. If the decode instance dies mid-stream (or is drained and
        hands the request back with finish_reason "migrate"), the request continues on
        another decode instance: prompt + every token already streamed is prefilled again
        and decoding resumes with the next token. The client never sees a token twice or a
        gap. (Greedy output is unchanged; a seeded sampler restarts its generator.)"""
        generated: list[int] = []
        recoveries = 0
        while True:
            sub = job
            if generated:
                left = job.params.max_tokens - len(generated)
                sub = Job(f"{job.request_id}~{recoveries}", job.prompt_ids + generated,
                          dataclasses.replace(job.params, max_tokens=left))
            try:
                async for c in self._pass(sub):
                    if c.finished and c.finish_reason == "migrate":
                        raise Handback(f"{sub.request_id} handed back by its decode instance")
                    generated += c.token_ids
                    yield TokenChunk(job.request_id, c.token_ids, c.logprobs, c.finished,
                                     c.finish_reason, len(job.prompt_ids), len(generated))
                    if c.finished:
                        return
                return
            except (asyncio.CancelledError, ValueError, Unavailable):
                raise
            except Exception as e:  # noqa: BLE001 - a dead/drained decode instance
                if not generated or recoveries >= self.max_recoveries:
                    self.stats["failures"] += 1
                    raise
                recoveries += 1
                self.stats["recoveries"] += 1
                self._refresh_handles()
                log.warning("request %s: decode interrupted after %d tokens (%s); recovering "
                            "on another instance (%d)", job.request_id, len(generated),
                            type(e).__name__, recoveries)

    async def _pass(self, job: Job) -> AsyncIterator[TokenChunk]:
        """One try: reserve on D, prefill on P (retried on failure), stream from D."""
        attempt = 0
        hint = await self.hint(job)
        while True:
            desc = await self._reserve(job, hint)
            d_id = desc.decode.instance_id
            pre = self.prefill.prefill.remote(job, desc, routing=hint)
            try:
                res = await pre
            except asyncio.CancelledError:
                pre.cancel()
                await self._abort_decode(job.request_id, d_id)
                raise
            except Exception as e:  # noqa: BLE001 - prefill or transfer failed: re-route
                await self._abort_decode(job.request_id, d_id)
                if attempt >= self.retries or isinstance(e, ValueError):
                    self.stats["failures"] += 1
                    raise
                attempt += 1
                self.stats["retries"] += 1
                log.warning("request %s: prefill failed (%s); retrying (attempt %d)",
                            job.request_id, e, attempt + 1)
                continue
            break
        first = TokenChunk(job.request_id, [res.first_token], [res.logprobs] if res.logprobs else [],
                           res.finish_reason is not None, res.finish_reason, len(job.prompt_ids), 1)
        if first.finished:
            await self._abort_decode(job.request_id, d_id)  # frees the (filled) reservation
            yield first
            return
        stream = self.decode.options(stream=True).generate.remote(
            job.request_id, res.first_token, res.logprobs, target=d_id)
        done = False
        early = None  # (instance, its resume stream): opened when a hand-over is announced
        try:
            yield first
            while True:
                moved_to = None
                async for c in stream:
                    if c.migrated_to and not c.finished:
                        # A live migration is about to hand the request over: connect to
                        # the destination now (its resume waits for the hand-over), so the
                        # switch below costs no extra round trip.
                        if not self.connect_early:
                            continue
                        if early is not None:
                            early[1].cancel()
                        early = (c.migrated_to, self.decode.options(stream=True).resume.remote(
                            job.request_id, target=c.migrated_to))
                        continue
                    if c.finished and c.finish_reason == "migrate" and c.migrated_to:
                        # Live-migrated: the same request decodes on at ``migrated_to``;
                        # follow it there (the client sees one unbroken stream).
                        moved_to = c.migrated_to
                        if c.token_ids:
                            yield dataclasses.replace(c, finished=False, finish_reason=None,
                                                      migrated_to=None)
                        continue  # read the old stream to its end (it ends here): a
                        # response left unfinished stays "ongoing" in Serve's handle
                    done = c.finished
                    yield c
                if moved_to is None:
                    break
                self.stats["migrations"] += 1
                log.info("request %s: following its migration %s -> %s", job.request_id,
                         d_id, moved_to)
                d_id = moved_to
                if early is not None and early[0] == moved_to:
                    stream = early[1]
                else:
                    if early is not None:
                        early[1].cancel()
                    stream = self.decode.options(stream=True).resume.remote(job.request_id,
                                                                            target=d_id)
                early = None
        finally:
            if early is not None:
                early[1].cancel()
            if not done:
                stream.cancel()
                await self._abort_decode(job.request_id, d_id)

    def _refresh_handles(self) -> None:
        """Fresh handles after a pool lost a replica: Serve's per-handle routing state was
        seen to stall new requests after one of its replicas died mid-stream."""
        if self.app_name is None:
            return
        from ray import serve

        self.decode = serve.get_deployment_handle("decode", app_name=self.app_name)
        self.prefill = serve.get_deployment_handle("prefill", app_name=self.app_name)

    async def _abort_decode(self, request_id: str, instance_id: str) -> None:
        try:
            await asyncio.shield(self.decode.abort.remote(request_id, target=instance_id))
        except Exception as e:  # noqa: BLE001 - the instance may be gone; nothing to free then
            log.info("abort of %s on %s: %s", request_id, instance_id, e)
