"""Continuous batching with a token budget, for the three roles.

Every request is described by counters: it has ``num_tokens`` tokens, the first
``num_computed`` of which have KV in the cache. A step computes ``n`` more tokens of each
scheduled request; when a request's chunk reaches its last token the step samples one new
token for it. So a decode is "n = 1", a prompt is "n = len(prompt)" (or a chunk of it), and a
preempted request is simply reset to ``num_computed = 0`` and recomputed.

Roles are policies over the same loop:
- ``colocated``: running decodes first, then prefill chunks up to the budget (Sarathi-Serve's
  stall-free batches).
- ``prefill``: prompts only, packed into one varlen batch; when a prompt completes and its first
  token is sampled the request leaves with status PREFILLED, its blocks held for the transfer.
- ``decode``: requests arrive with their KV in place (``add_prefilled``) and only decode.
  A request preempted here is recomputed locally (the only prefill a decode instance runs).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .config import SchedulerConfig
from .request import Request, RequestOutput, Status


class QueueFull(RuntimeError):
    """The bounded waiting queue is full: the caller should retry later (HTTP 429)."""


@dataclass(frozen=True)
class ScheduledBatch:
    """One step's work. ``decodes`` (one token each) come first in the packed token order,
    then ``prefills`` (chunks); ``num_new[i]`` is the token count of ``requests[i]``."""

    requests: list[Request]  # decodes first, then prefill chunks
    num_new: list[int]  # tokens computed this step, per request
    num_decodes: int  # requests[:num_decodes] are single-token decodes

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def samples(self) -> list[bool]:
        """Whether each request's chunk ends at its last token (so the step samples for it)."""
        return [r.num_computed + n == r.num_tokens for r, n in zip(self.requests, self.num_new)]


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, max_model_len: int) -> None:
        self.config = config
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prefilled: dict[str, Request] = {}  # prefill role: finished prompts holding blocks
        self.num_preemptions = 0

    # ---- admission -------------------------------------------------------------------
    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"waiting queue is full ({self.config.max_waiting} requests)")
        if len(req.prompt_ids) + 1 > self.max_model_len:
            raise ValueError(
                f"prompt has {len(req.prompt_ids)} tokens; the limit is {self.max_model_len - 1}"
            )
        if self.blocks.blocks_for(req.num_tokens + 1) > self.blocks.num_blocks:
            raise ValueError(
                f"prompt needs {self.blocks.blocks_for(req.num_tokens + 1)} KV blocks but the "
                f"pool has {self.blocks.num_blocks}; raise the KV cache memory"
            )
        self.waiting.append(req)

    def add_prefilled(self, req: Request) -> None:
        """Decode role: ``req`` already owns blocks holding the KV of all but its last token."""
        assert req.num_computed == req.num_tokens - 1 and req.output_ids, "not a prefilled request"
        req.status = Status.RUNNING
        self.running.append(req)

    def remove(self, request_id: str) -> Request | None:
        """Take a request out of every queue (abort); the caller frees its blocks."""
        for q in (self.running, self.waiting):
            for r in q:
                if r.request_id == request_id:
                    q.remove(r)
                    return r
        return self.prefilled.pop(request_id, None)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step ----------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        # Priority order: decodes, then requests mid-prefill (earlier arrival first).
        order = sorted(self.running, key=lambda r: r.in_prefill)
        chosen: list[tuple[Request, int]] = []
        scheduled: set[int] = set()
        for req in order:
            if req.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            if budget <= 0:
                break
            n = min(req.num_pending, budget)
            if n < req.num_pending and not cfg.chunked_prefill:
                continue
            if not self._reserve(req, req.num_computed + n, scheduled):
                continue  # req itself was preempted
            chosen.append((req, n))
            scheduled.add(id(req))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting[0]
            if chosen and not cfg.packed_prefill and any(r.in_prefill for r, _ in chosen):
                break
            matched = self.blocks.match_prefix(req)
            n = req.num_pending
            if n > budget:
                if cfg.chunked_prefill:
                    n = budget
                elif chosen:
                    break  # an unchunked prompt waits for a step of its own
            need = self.blocks.num_missing(req, req.num_computed + n)
            if not self.blocks.can_allocate(need):
                if matched:
                    self.blocks.unmatch(req)
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.blocks.allocate(req, req.num_computed + n)
            req.status = Status.RUNNING
            self.running.append(req)
            chosen.append((req, n))
            budget -= n
        if not chosen:
            return None
        chosen.sort(key=lambda rn: rn[0].in_prefill)
        decodes = sum(1 for r, _ in chosen if not r.in_prefill)
        return ScheduledBatch([r for r, _ in chosen], [n for _, n in chosen], decodes)

    def _reserve(self, req: Request, num_tokens: int, scheduled: set[int]) -> bool:
        """Give ``req`` slots for ``num_tokens`` tokens, preempting the lowest-priority running
        request (the latest arrival not already scheduled this step) while blocks are short.
        Returns False when ``req`` itself had to be preempted."""
        while not self.blocks.can_allocate(self.blocks.num_missing(req, num_tokens)):
            victims = [r for r in self.running if id(r) not in scheduled and r is not req]
            victim = max(victims, key=lambda r: r.arrival_time) if victims else req
            self._preempt(victim)
            if victim is req:
                return False
        self.blocks.allocate(req, num_tokens)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req)
        req.num_computed = 0
        req.num_cached_blocks = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- results -----------------------------------------------------------------------
    def commit(
        self,
        batch: ScheduledBatch,
        tokens: list[int | None],
        logprobs: list[dict[int, float] | None],
    ) -> list[RequestOutput]:
        """Advance counters with one step's sampled tokens (None where nothing was sampled)."""
        outs = []
        for req, n, tok, lp in zip(batch.requests, batch.num_new, tokens, logprobs):
            req.num_computed += n
            self.blocks.commit_full_blocks(req)
            if tok is None:
                continue
            req.output_ids.append(tok)
            if lp is not None:
                req.output_logprobs.append(lp)
            reason = self._finish_reason(req, tok)
            if self.config.role == "prefill":
                # The prompt's KV is (being) sent whatever the first token was: hold the
                # blocks until the transfer layer releases them (LESSONS #3).
                self.finish(req, reason or "prefilled", hold=True)
            elif reason is not None:
                self.finish(req, reason)
            outs.append(
                RequestOutput(
                    req.request_id, [tok], [lp] if lp is not None else [], len(req.prompt_ids),
                    len(req.output_ids), req.status.done, req.finish_reason,
                )
            )
        return outs

    def _finish_reason(self, req: Request, tok: int) -> str | None:
        p = req.params
        if not p.ignore_eos and tok in req.eos_token_ids:
            return "stop"
        if tok in p.stop_token_ids:
            return "stop"
        if len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def finish(self, req: Request, reason: str, hold: bool = False) -> None:
        """End ``req`` here. With ``hold`` (prefill role) it keeps its blocks until
        ``release``."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.finish_reason = reason
        if hold:
            req.status = Status.PREFILLED
            self.prefilled[req.request_id] = req
        else:
            req.status = Status.FINISHED
            self.blocks.free(req)

    def release(self, request_id: str) -> None:
        """Free the blocks of a prefilled request once its KV has been handed off."""
        req = self.prefilled.pop(request_id, None)
        if req is not None:
            self.blocks.free(req)
