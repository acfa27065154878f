"""The one ``Request`` object that travels scheduler → block manager → runner → sampler."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None  # per-request generator: same seed, same output, any batch
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (0: only the chosen one)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 disables)")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs={self.logprobs}: must be between 0 and 20")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1  # tiny temperatures: argmax


@dataclass(frozen=True)
class Chunks:
    """Document chunks marked in a prompt (RAG): their KV may be reused from the chunk cache
    and blended (CacheBlend; see ``workers/blend.py``)."""

    spans: tuple[tuple[int, int], ...]  # [start, end) token offsets in the prompt, in order
    recompute_ratio: float | None = None  # fraction of chunk tokens recomputed; None: default

    def __post_init__(self) -> None:
        prev = 0
        for s, e in self.spans:
            if not prev <= s < e:
                raise ValueError(f"chunk span [{s}, {e}) is empty, negative or overlaps the "
                                 "previous one; spans must be ordered and disjoint")
            prev = e
        if self.recompute_ratio is not None and not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio={self.recompute_ratio}: must be in [0, 1]")
        object.__setattr__(self, "spans", tuple((int(s), int(e)) for s, e in self.spans))


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREFILLED = "prefilled"  # prefill role: prompt done, first token sampled, KV held for transfer
    FINISHED = "finished"

    @property
    def done(self) -> bool:
        return self in (Status.PREFILLED, Status.FINISHED)


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in this instance's cache
    block_ids: list[int] = field(default_factory=list)  # owned by the BlockManager
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of full blocks (memo)
    num_cached_blocks: int = 0  # leading blocks already published to the prefix cache
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "prefilled"
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_preemptions: int = 0
    generator: object | None = None  # torch.Generator for seeded sampling (set by the sampler)
    # document chunks (RAG). Their KV is blended, i.e. approximate below ratio 1, so such a
    # request never reads or fills the prefix cache.
    chunks: Chunks | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output, without concatenating the two (the
        runner calls this for every request in every step)."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    @property
    def num_pending(self) -> int:
        """Tokens whose KV still has to be computed before the next sample."""
        return self.num_tokens - self.num_computed

    @property
    def in_prefill(self) -> bool:
        """Still computing the prompt (or recomputing after preemption)."""
        return self.num_pending > 1 or not self.output_ids


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (the new token ids since the last output)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]]
    num_prompt_tokens: int
    num_output_tokens: int
    finished: bool
    finish_reason: str | None = None
