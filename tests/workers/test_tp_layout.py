"""Tensor-parallel layout (which heads/columns a rank holds), the step message, and TP=1."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import PROMPTS, hf_greedy
from pdserve.workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.workers.engine import Engine
from pdserve.workers.loader import Shard
from pdserve.workers.model import AttnMetadata
from pdserve.workers.parallel import ParallelConfig
from pdserve.workers.request import SamplingParams
from pdserve.workers.tp_engine import TPEngine, make_engine
from pdserve.workers.tp_layout import head_ranges, supports_tp, valid_tp_sizes, vocab_range
from pdserve.workers.tp_message import StepMessage
from transformers import AutoTokenizer

SHAPES = [(4, 2), (4, 1), (9, 3), (8, 8), (12, 4), (6, 2), (32, 8), (14, 2)]


@pytest.mark.parametrize("h,k", SHAPES)
def test_every_valid_degree_covers_each_head_in_whole_groups(h, k):
    group = h // k
    for tp in valid_tp_sizes(h, k):
        q_seen: list[int] = []
        for r in range(tp):
            (q0, q1), (k0, k1) = head_ranges(h, k, r, tp)
            assert q1 > q0 and k1 > k0
            q_seen += range(q0, q1)
            # GQA inside the shard: local query head j reads local KV head j // local_group
            assert {q // group for q in range(q0, q1)} == set(range(k0, k1))
            assert (q1 - q0) % (k1 - k0) == 0
        assert q_seen == list(range(h)), f"tp={tp}: query heads not split exactly once"


def test_uneven_and_replicated_schemes():
    # SmolLM2's shape at tp=2: uneven KV groups, rank 0 (which also schedules) lighter
    assert head_ranges(9, 3, 0, 2) == ((0, 3), (0, 1))
    assert head_ranges(9, 3, 1, 2) == ((3, 9), (1, 3))
    assert [head_ranges(9, 3, r, 3) for r in range(3)] == [
        ((0, 3), (0, 1)),
        ((3, 6), (1, 2)),
        ((6, 9), (2, 3)),
    ]
    # one KV head, tp=2: both ranks hold it, query heads split
    assert [head_ranges(4, 1, r, 2) for r in range(2)] == [((0, 2), (0, 1)), ((2, 4), (0, 1))]


def test_invalid_degree_names_the_valid_ones():
    assert valid_tp_sizes(9, 3) == [1, 2, 3, 9]
    assert not supports_tp(9, 3, 4)
    with pytest.raises(
        ValueError,
        match=r"tp=4 but the model has 9 attention heads and 3 KV "
        r"heads; valid tp: 1, 2, 3, 9",
    ):
        head_ranges(9, 3, 0, 4)


@pytest.mark.parametrize("h,k", SHAPES)
def test_shard_keeps_the_old_scheme_where_it_applied(h, k):
    for tp in range(1, h + 1):
        for r in range(tp):
            s = Shard(r, tp)
            try:
                old = (s.heads(h), s.heads(k))
            except ValueError:
                continue
            assert s.attention_heads(h, k) == old


def test_column_and_vocab_splits_cover_exactly():
    for n, tp in [(96, 2), (1536, 3), (97, 4), (5, 5)]:
        cols = [Shard(r, tp).range(n) for r in range(tp)]
        assert cols[0][0] == 0 and cols[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(cols))
    for v, tp in [(384, 2), (49152, 2), (385, 3), (10, 4)]:
        parts = [vocab_range(v, r, tp) for r in range(tp)]
        assert parts[0][0] == 0 and parts[-1][1] == v
        assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))


def test_step_message_round_trip():
    g = torch.Generator().manual_seed(0)

    def ints(*shape, dtype=torch.int64):
        return torch.randint(0, 1000, shape, generator=g).to(dtype)

    for nd, np_, t in [(3, 2, 11), (0, 1, 7), (4, 0, 4)]:
        meta = AttnMetadata(
            positions=ints(t),
            slot_mapping=ints(t),
            num_decodes=nd,
            decode_block_tables=ints(nd, 5, dtype=torch.int32),
            decode_context_lens=ints(nd, dtype=torch.int32),
            cu_seqlens=ints(np_ + 1, dtype=torch.int32),
            prefix_lens=ints(np_, dtype=torch.int32),
            prefill_block_tables=ints(np_, 3, dtype=torch.int32),
            has_prefix=nd % 2 == 1,
        )
        msg = StepMessage(ints(t), meta, ints(2))
        header, payload = msg.pack()
        assert payload.numel() == StepMessage.payload_words(header)
        back = StepMessage.unpack(header, payload)
        assert torch.equal(back.input_ids, msg.input_ids)
        assert torch.equal(back.sample_idx, msg.sample_idx)
        for f in (
            "positions",
            "slot_mapping",
            "decode_block_tables",
            "decode_context_lens",
            "cu_seqlens",
            "prefix_lens",
            "prefill_block_tables",
        ):
            a, b = getattr(back.meta, f), getattr(meta, f)
            assert a.dtype == b.dtype and torch.equal(a, b), f
        assert back.meta.num_decodes == nd and back.meta.has_prefix == meta.has_prefix


def test_parallel_config_validates():
    with pytest.raises(ValueError, match="tp=0"):
        ParallelConfig(tp=0)
    with pytest.raises(ValueError, match="transport"):
        ParallelConfig(transport="mpi")
    assert ParallelConfig(cpus_per_rank=0.5).num_threads == 1


def test_unsupported_degree_is_refused_before_any_rank_starts(tiny_model_factory):
    path = tiny_model_factory("llama", num_heads=9, num_kv_heads=3)
    cfg = EngineConfig(ModelConfig.from_path(path), CacheConfig(num_blocks=16))
    with pytest.raises(ValueError, match="valid tp: 1, 2, 3, 9"):
        make_engine(cfg, ParallelConfig(tp=4))


def test_tp1_runs_the_tp_path_without_ray(tiny_llama):
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    ids = [tok(p)["input_ids"] for p in PROMPTS[:4]]
    cfg = EngineConfig(
        ModelConfig.from_path(tiny_llama),
        CacheConfig(num_blocks=64),
        SchedulerConfig(max_num_batched_tokens=16),
    )
    assert type(make_engine(cfg, ParallelConfig(tp=1))) is Engine
    with TPEngine(cfg, ParallelConfig(tp=1)) as e:
        assert e.workers == [] and e.group is None
        sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        reqs = [e.add_request(p, sp) for p in ids]
        while e.has_work:
            e.step()
    assert [r.output_ids for r in reqs] == hf_greedy(tiny_llama, ids, 6)


def test_step_message_frames_one_broadcast_or_two():
    from pdserve.workers.tp_message import FRAME_WORDS

    for width in (4, 300):  # short block tables fit one frame; 16 x 300 blocks do not
        nd = 16
        meta = AttnMetadata(
            positions=torch.arange(nd),
            slot_mapping=torch.arange(nd) * 3,
            num_decodes=nd,
            decode_block_tables=torch.arange(nd * width, dtype=torch.int32).view(nd, width),
            decode_context_lens=torch.full((nd,), 7, dtype=torch.int32),
            cu_seqlens=torch.zeros(1, dtype=torch.int32),
            prefix_lens=torch.zeros(0, dtype=torch.int32),
            prefill_block_tables=torch.zeros(0, 1, dtype=torch.int32),
            has_prefix=False,
        )
        msg = StepMessage(torch.arange(nd) + 100, meta, torch.arange(nd))
        frames = msg.frames()
        assert frames[0].numel() == FRAME_WORDS and len(frames) == (1 if width == 4 else 2)
        header, head, missing = StepMessage.split_frame(frames[0])
        payload = torch.cat([head, frames[1]]) if missing else head
        assert missing == (frames[1].numel() if missing else 0)
        assert torch.equal(payload, msg.pack()[1])
        back = StepMessage.unpack(header, payload)
        assert torch.equal(back.meta.decode_block_tables, meta.decode_block_tables)
    stop_header, _, _ = StepMessage.split_frame(StepMessage.stop_frame())
    assert stop_header[0].item() == 0
