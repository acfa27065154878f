"""Block gather/scatter (all layers or one) against ``index_select`` / ``index_copy_``."""

from __future__ import annotations

import pytest
import torch
from pdserve.kernels import blocks


@pytest.mark.parametrize(
    "num_blocks,ids", [(1, [0]), (7, [6, 0, 3]), (257, list(range(256, 0, -3)))]
)
@pytest.mark.parametrize("layer", [None, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_gather_scatter_blocks(num_blocks, ids, layer, dtype, device, force_triton):
    gen = torch.Generator().manual_seed(num_blocks)
    shape = (2, 2, num_blocks, 4, 2, 8)  # layers, K|V, blocks, block_size, kv_heads, dim
    kv = (10 * torch.randn(shape, generator=gen)).to(device, dtype)
    block_ids = torch.tensor(ids, dtype=torch.int32, device=device)
    buf = blocks.gather_blocks(kv, block_ids, layer)
    assert torch.equal(buf, blocks.gather_blocks_ref(kv, block_ids.long(), layer))
    new = (10 * torch.randn(buf.shape, generator=gen)).to(device, dtype)
    kv_ref = kv.clone()
    blocks.scatter_blocks(new, kv, block_ids, layer)
    blocks.scatter_blocks_ref(new, kv_ref, block_ids.long(), layer)
    assert torch.equal(kv, kv_ref)


def test_blocks_reject(force_triton, default_device):
    kv, ids = torch.zeros(2, 2, 5, 4, 2, 8), torch.tensor([1, 3])
    with pytest.raises(ValueError, match="layers, 2, blocks"):
        blocks.gather_blocks(kv[0], ids)
    with pytest.raises(ValueError, match="block_ids: dtype"):
        blocks.gather_blocks(kv, ids.float())
    with pytest.raises(ValueError, match="out of range"):
        blocks.gather_blocks(kv, ids, layer=2)
    with pytest.raises(ValueError, match="contiguous"):
        blocks.gather_blocks(kv.transpose(4, 5), ids)
    with pytest.raises(ValueError, match="buffer"):
        blocks.scatter_blocks(torch.zeros(2, 2, 3, 4, 2, 8), kv, ids)
    with pytest.raises(ValueError, match="dtype"):
        blocks.scatter_blocks(torch.zeros(2, 2, 2, 4, 2, 8).half(), kv, ids)
