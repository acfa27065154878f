"""Messages between the router and the pool instances: frozen dataclasses, one module.

Control messages go over Ray (Serve deployment handles); KV bytes never do (see kvtransfer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.kvtransfer import ChannelAddress, KVLayout

from .request import Chunks, SamplingParams


@dataclass(frozen=True)
class InstanceInfo:
    """Who an instance is; ``epoch`` changes when the same id comes back after a restart."""

    instance_id: str  # the Serve replica's unique id
    role: str  # prefill | decode | colocated
    epoch: int
    host: str  # address its KV channels bind to (127.0.0.1 locally)
    layout: KVLayout


@dataclass(frozen=True)
class Job:
    """One request as the router hands it to an instance."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    chunks: Chunks | None = None  # document chunks whose KV may be reused (RAG)


@dataclass(frozen=True)
class ReceiveDescriptor:
    """A decode instance's reservation for a request: where its KV must go."""

    request_id: str
    decode: InstanceInfo
    block_ids: list[int]
    transfer_id: int  # unique among this decode instance's transfers in flight
    deadline_s: float  # seconds the reservation waits for the KV before it frees the blocks
    num_cached: int = 0  # leading blocks the decode instance already holds: not sent


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    first_token: int
    logprobs: dict[int, float] | None
    finish_reason: str | None  # None: continues on the decode instance
    prefill: InstanceInfo
    transfer_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # queue/compute/transfer seconds


@dataclass(frozen=True)
class TokenChunk:
    """Tokens streamed from an instance to the router (one or more per message)."""

    request_id: str
    token_ids: list[int]
    logprobs: list[dict[int, float]]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    # finish_reason "migrate": the request goes on at this decode instance (its ``resume``
    # stream); None there means the router must recover it by recompute
    migrated_to: str | None = None


@dataclass(frozen=True)
class MigrationTicket:
    """A destination's reservation for a request migrating to it (live migration)."""

    request_id: str
    dest: InstanceInfo
    block_ids: list[int]  # block i of the source request goes to block_ids[i]
    deadline_s: float  # unused reservations are freed after this


@dataclass(frozen=True)
class MigrationState:
    """Everything a destination needs to continue a paused decoding request: the tokens
    (prompt + outputs; KV of all but the last is in the blocks already sent), the sampling
    parameters and the seeded generator's state (so seeded sampling continues unchanged)."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[dict[int, float]]
    params: SamplingParams
    num_blocks: int  # leading blocks of the ticket that now hold the KV
    rng_state: bytes | None = None


@dataclass(frozen=True)
class ChannelOffer:
    """A receiver's answer to ``open_channel``: connect here within ``timeout_s``."""

    address: ChannelAddress
    timeout_s: float


@dataclass(frozen=True)
class InstanceStats:
    instance_id: str
    role: str
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    queued_prefill_tokens: int  # prompt tokens waiting or mid-prefill
    reserved_blocks: int = 0  # decode: held for incoming transfers
    prefix_hit_tokens: int = 0  # prompt tokens served from the local prefix cache
    prefix_query_tokens: int = 0  # prompt tokens looked up in it
    draining: bool = False
    pid: int = 0  # the instance's process (ops and fault-injection tests)

    def as_routing_stats(self) -> dict[str, float | str]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
