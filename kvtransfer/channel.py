"""The point-to-point channel that KV bytes travel over, as a small interface.

A `Channel` joins exactly two processes (a *pair*): one rank of a sending instance and one
rank of a receiving instance. Everything above it (`transfer.py`) only needs tagged, async
send/recv of whole tensors with deadlines; everything below it (`torch_channel.py`) is one
backend: `torch.distributed` process groups, gloo on CPU and NCCL on CUDA.

Contract, shared by every implementation:

* **Buffers belong to the caller.** `send(t, tag)` and `recv(t, tag)` only post the operation
  and return a `Pending` handle at once. Until that handle's `wait()` has returned, the caller
  must keep `t` alive and must not write it (send) or read it (recv). The channel never
  allocates, frees or resizes a caller's tensor.
* **Messages are matched by tag.** A recv with tag T completes with the bytes of the send with
  tag T from the other side; messages with the same tag match in the order they were posted.
  Sizes must agree exactly. Backends whose transport cannot honour tags (NCCL) say so with
  `ordered_only = True`: there, messages match purely in post order, and the caller must keep
  at most one logical stream of messages in flight per channel.
* **Nothing blocks forever.** Posting never blocks on the peer. `Pending.wait(timeout_s)` blocks
  at most about `timeout_s` seconds and raises `TransferTimeout` when the deadline passes, or
  `ChannelClosed` when the channel was closed or the peer went away.
* **A failure breaks the whole channel.** After any op raised, the channel is *broken*:
  `closed` is True, every other pending op raises `ChannelClosed`, and so does every later
  post. (gloo closes the connection of a pair on any expired wait, so this is the only
  contract a backend can keep honestly.) Whoever owns the channel (the `ChannelPool`) replaces
  it; the peer sees its own ops fail with `ChannelClosed` promptly.
* `close()` is idempotent and never blocks for long; it fails pending ops on both sides.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class TransferError(Exception):
    """A KV transfer failed; the caller frees the blocks it reserved and retries or recomputes."""


class TransferTimeout(TransferError):
    """A deadline passed before an op (or a whole transfer, or a channel's creation) finished."""


class ChannelClosed(TransferError):
    """The channel was closed locally, broken by an earlier failure, or the peer went away."""


class Pending(ABC):
    """The handle of one posted send or recv.

    `wait()` may be called several times; after the first successful return it returns at once.
    """

    @abstractmethod
    def wait(self, timeout_s: float) -> None:
        """Block until the op completes, at most about `timeout_s` seconds.

        Raises `TransferTimeout` if the deadline passes first and `ChannelClosed` if the channel
        is or becomes broken. Either way the channel is closed afterwards.
        """

    @property
    @abstractmethod
    def done(self) -> bool:
        """True once `wait()` has returned successfully."""


class Channel(ABC):
    """A two-party, bidirectional, tagged message pipe for tensors (see the module docstring).

    `local_rank_in_pair` is 0 on the side that hosted the rendezvous (the receiver of KV bytes)
    and 1 on the side that connected to it (the sender); the ack of a transfer flows 0 -> 1 on
    the same channel.
    """

    @property
    @abstractmethod
    def peer(self) -> str:
        """A human-readable name of the process at the other end (for logs and errors)."""

    @property
    @abstractmethod
    def local_rank_in_pair(self) -> int:
        """0 or 1: this side's rank inside the two-party group."""

    @property
    def peer_rank_in_pair(self) -> int:
        return 1 - self.local_rank_in_pair

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where tensors passed to send/recv must live (CPU for gloo, the rank's GPU for NCCL)."""

    @property
    def ordered_only(self) -> bool:
        """True when tags are ignored and messages match only in post order (NCCL)."""
        return False

    @property
    @abstractmethod
    def closed(self) -> bool:
        """True after `close()` or after any op failed; a closed channel is never reused."""

    @abstractmethod
    def send(self, tensor: torch.Tensor, tag: int) -> Pending:
        """Post a send of the contiguous `tensor` (on `device`) with `tag`; returns at once.

        Raises `ChannelClosed` if the channel is closed.
        """

    @abstractmethod
    def recv(self, tensor: torch.Tensor, tag: int) -> Pending:
        """Post a recv into the contiguous `tensor` (on `device`) with `tag`; returns at once.

        Raises `ChannelClosed` if the channel is closed.
        """

    @abstractmethod
    def close(self) -> None:
        """Close the channel: fail every pending op here and at the peer. Idempotent."""
