"""The GPU copy of the rule (cuda_src/layout.cuh via debug.cu) equals layout.py's, exactly."""

import numpy as np
import pytest

from cubsattn import BlockSparseLayout, BlocksparseParams

pytestmark = pytest.mark.gpu

CASES = [
    # num_heads, num_kv_heads, local_blocks, vert_stride, homo_head, homo_head_group, tp_rank, tp_size
    (32, 8, 16, 8, False, False, 0, 1),
    (16, 4, 16, 8, False, False, 1, 2),
    (4, 2, 1, 3, False, True, 0, 1),
    (8, 8, 3, 16, True, False, 0, 1),
    (2, 1, 20, 1, False, False, 0, 1),
    (6, 3, 2, 5, False, True, 2, 4),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_gpu_rule_equals_numpy_rule(case):
    from cubsattn import _debug_cuda

    heads, kv, local, vert, homo, group, rank, size = case
    p = BlocksparseParams(64 * 90, heads, kv, 64, local, vert, homo, group, tp_rank=rank, tp_size=size)
    lay = BlockSparseLayout.from_params(p)
    gpu = _debug_cuda.layout_mask(lay.stripe_offsets, lay.num_blocks, local, vert).get().astype(bool)
    np.testing.assert_array_equal(gpu, lay.to_mask())
