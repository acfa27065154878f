"""The message rank 0 sends the other TP ranks each step: the model's inputs, nothing more.

Ranks > 0 hold no scheduler, no requests and no block manager; they need only what
``LlamaModel.forward`` reads, plus the KV pushes the step makes. One step is two int64
tensors: a fixed 9-word header (so a receiver can size the payload buffer) and the payload,
all fields back to back::

    header  = [kind, T, D, P, Wd, Wp, has_prefix, S, X]
    payload = input_ids[T] | positions[T] | slot_mapping[T] | decode_block_tables[D*Wd]
              | decode_context_lens[D] | cu_seqlens[P+1] | prefix_lens[P]
              | prefill_block_tables[P*Wp] | sample_idx[S] | pushes[X]

T tokens, D decodes, P prefill chunks, Wd/Wp block-table widths, S sampled rows. ``pushes``
lists the transfers whose prompt completes in this step (disaggregated prefill): for each,
``key, n, n source block ids``; every rank starts sending its heads of them from its layer
hook (the key names a transfer rank 0 registered with the ranks beforehand). On the wire
it is one fixed 16 KB frame (header + payload head: a whole decode step of 16 requests at 1k
context fits), and a second broadcast for the rest only when it does not fit, so a typical
step costs rank 0 one broadcast. ``kind`` 0 tells the ranks to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import AttnMetadata

HEADER_WORDS = 9
FRAME_WORDS = 2048  # one broadcast carries a step of 16 decodes at up to ~1.8k tokens each
STEP, STOP = 1, 0


@dataclass(frozen=True)
class StepMessage:
    input_ids: torch.Tensor  # [T] int64
    meta: AttnMetadata
    sample_idx: torch.Tensor  # [S] int64, rows of the batch that produce logits
    pushes: torch.Tensor | None = None  # [X] int64: (key, n, n block ids) per KV push

    @staticmethod
    def encode_pushes(orders: list[tuple[int, list[int]]]) -> torch.Tensor:
        words: list[int] = []
        for key, ids in orders:
            words += [key, len(ids), *ids]
        return torch.tensor(words, dtype=torch.int64)

    def push_orders(self) -> list[tuple[int, list[int]]]:
        """``[(key, source block ids)]`` of this step's KV pushes."""
        if self.pushes is None:
            return []
        w, out, i = self.pushes.tolist(), [], 0
        while i < len(w):
            n = w[i + 1]
            out.append((w[i], w[i + 2 : i + 2 + n]))
            i += 2 + n
        return out

    def pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.meta
        pushes = self.pushes if self.pushes is not None else torch.empty(0, dtype=torch.int64)
        parts = [
            self.input_ids,
            m.positions,
            m.slot_mapping,
            m.decode_block_tables.flatten(),
            m.decode_context_lens,
            m.cu_seqlens,
            m.prefix_lens,
            m.prefill_block_tables.flatten(),
            self.sample_idx,
            pushes,
        ]
        header = torch.tensor(
            [
                STEP,
                self.input_ids.numel(),
                m.num_decodes,
                m.prefix_lens.numel(),
                m.decode_block_tables.shape[1],
                m.prefill_block_tables.shape[1],
                int(m.has_prefix),
                self.sample_idx.numel(),
                pushes.numel(),
            ],
            dtype=torch.int64,
        )
        payload = torch.cat([p.detach().to("cpu", torch.int64) for p in parts])
        return header, payload

    def frames(self) -> list[torch.Tensor]:
        """What goes on the wire: one fixed ``FRAME_WORDS`` frame (header + the payload's head),
        plus the payload's tail only when it does not fit (long block tables)."""
        header, payload = self.pack()
        first = torch.zeros(FRAME_WORDS, dtype=torch.int64)
        k = min(payload.numel(), FRAME_WORDS - HEADER_WORDS)
        first[:HEADER_WORDS] = header
        first[HEADER_WORDS : HEADER_WORDS + k] = payload[:k]
        return [first] if k == payload.numel() else [first, payload[k:].clone()]

    @staticmethod
    def stop_frame() -> torch.Tensor:
        return torch.zeros(FRAME_WORDS, dtype=torch.int64)

    @staticmethod
    def split_frame(first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(header, payload head, words still to receive)`` of a received first frame."""
        header = first[:HEADER_WORDS]
        n = StepMessage.payload_words(header) if header[0].item() == STEP else 0
        k = min(n, FRAME_WORDS - HEADER_WORDS)
        return header, first[HEADER_WORDS : HEADER_WORDS + k], n - k

    @staticmethod
    def payload_words(header: torch.Tensor) -> int:
        _, t, d, p, wd, wp, _, s, x = header.tolist()
        return 3 * t + d * wd + d + (p + 1) + p + p * wp + s + x

    @classmethod
    def unpack(
        cls, header: torch.Tensor, payload: torch.Tensor, device: torch.device | None = None
    ) -> StepMessage:
        _, t, d, p, wd, wp, has_prefix, s, x = header.tolist()
        sizes = [t, t, t, d * wd, d, p + 1, p, p * wp, s, x]
        f = payload.to(device) if device is not None else payload
        ids, pos, slots, dbt, dctx, cu, pre, pbt, sidx, pushes = torch.split(f, sizes)
        i32 = torch.int32
        meta = AttnMetadata(
            positions=pos,
            slot_mapping=slots,
            num_decodes=d,
            decode_block_tables=dbt.view(d, wd).to(i32),
            decode_context_lens=dctx.to(i32),
            cu_seqlens=cu.to(i32),
            prefix_lens=pre.to(i32),
            prefill_block_tables=pbt.view(p, wp).to(i32),
            has_prefix=bool(has_prefix),
        )
        return cls(ids, meta, sidx, pushes.cpu() if x else None)
