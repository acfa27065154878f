"""Which slice of each weight a tensor-parallel rank holds: heads, MLP columns, vocabulary.

Attention is split by **KV-head groups**: a rank holds a contiguous range of KV heads and every
query head that reads them, so GQA's "query head h reads KV head h // group" holds inside each
rank's shard and the attention kernels need no change. Two regimes:

    tp <= kv heads: contiguous, possibly uneven split  rank r: KV [r*K//tp, (r+1)*K//tp)
        9 q / 3 kv, tp=2:   r0  kv [0]    q [0..2]       r1  kv [1, 2]  q [3..8]
    tp > kv heads (tp a multiple of K, tp | H): each KV head replicated on tp/K ranks, which
    split its query heads evenly
        4 q / 1 kv, tp=2:   r0  kv [0]    q [0, 1]       r1  kv [0]     q [2, 3]

Uneven splits are exact: o_proj and down_proj are row-parallel, so each rank's partial product
covers exactly the columns it owns and the all-reduce sums to the full result whatever the
split. The floor-based split gives rank 0 (which also schedules and samples) the smaller share.
Any other degree is refused with the list of valid ones. ``kvtransfer.plan`` uses the same KV
head ranges, so a KV block moves between instances of different TP degrees head for head.

MLP columns use the same floor split (even when tp divides ``intermediate_size``). The LM head,
when vocab-parallel, uses equal ``ceil(V / tp)`` slices (the last one shorter) so that rank 0
can gather equal-sized logit shards.
"""

from __future__ import annotations


def split(n: int, rank: int, size: int) -> tuple[int, int]:
    """Contiguous floor split of ``range(n)``: sizes differ by at most one, rank 0 smallest."""
    return rank * n // size, (rank + 1) * n // size


def supports_tp(num_heads: int, num_kv_heads: int, tp: int) -> bool:
    if tp < 1 or num_heads % num_kv_heads:
        return False
    return tp <= num_kv_heads or (tp % num_kv_heads == 0 and num_heads % tp == 0)


def valid_tp_sizes(num_heads: int, num_kv_heads: int) -> list[int]:
    return [t for t in range(1, num_heads + 1) if supports_tp(num_heads, num_kv_heads, t)]


def check_tp(num_heads: int, num_kv_heads: int, tp: int) -> None:
    if not supports_tp(num_heads, num_kv_heads, tp):
        valid = ", ".join(map(str, valid_tp_sizes(num_heads, num_kv_heads)))
        raise ValueError(
            f"tp={tp} but the model has {num_heads} attention heads and {num_kv_heads} KV heads; "
            f"valid tp: {valid}"
        )


def head_ranges(
    num_heads: int, num_kv_heads: int, rank: int, size: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((q0, q1), (k0, k1))``: the query heads and KV heads rank ``rank`` of ``size`` holds."""
    check_tp(num_heads, num_kv_heads, size)
    group = num_heads // num_kv_heads
    if size <= num_kv_heads:
        k0, k1 = split(num_kv_heads, rank, size)
        return (k0 * group, k1 * group), (k0, k1)
    per = num_heads // size
    q0 = rank * per
    k = q0 // group  # the size/K ranks sharing KV head k split its group evenly
    return (q0, q0 + per), (k, k + 1)


def vocab_range(vocab_size: int, rank: int, size: int) -> tuple[int, int]:
    per = -(-vocab_size // size)
    return min(rank * per, vocab_size), min((rank + 1) * per, vocab_size)
