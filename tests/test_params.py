"""BlocksparseParams: derived fields (SPEC section 2) and every validation error."""

import pytest

from cubsattn import BlocksparseParams, get_head_sliding_step

PHI3 = dict(max_seqlen=8192, num_heads=32, num_kv_heads=8, block_size=64, local_blocks=16, vert_stride=8)


def test_phi3_small_derived_fields():
    p = BlocksparseParams(**PHI3)
    assert p.head_sliding_step == 1
    assert p.active_head_range == (0, 32)
    assert p.kv_head_range == (0, 8)
    assert p.num_blocks == 128
    assert (p.total_heads, p.total_kv_heads) == (32, 8)


@pytest.mark.parametrize("n, vert, homo, want", [
    (32, 8, False, 1), (2, 8, False, 4), (3, 8, False, 2), (8, 8, False, 1), (1, 16, False, 16),
    (4, 8, True, 0), (64, 1, False, 1),
])
def test_get_head_sliding_step(n, vert, homo, want):
    assert get_head_sliding_step(n, vert, homo) == want


def test_tp_ranks_partition_heads():
    ranges = [BlocksparseParams(**{**PHI3, "num_heads": 8, "num_kv_heads": 2}, tp_rank=r, tp_size=4)
              for r in range(4)]
    assert [p.active_head_range for p in ranges] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert [p.kv_head_range for p in ranges] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # The step is computed from the TOTAL number of heads, so all ranks agree with TP=1.
    assert {p.head_sliding_step for p in ranges} == {1}


def test_homo_head_group_negative_step():
    p = BlocksparseParams(**{**PHI3, "num_heads": 4, "num_kv_heads": 2}, homo_head_group=True)
    assert p.head_sliding_step == -4     # -max(1, int(8 / 2))
    p = BlocksparseParams(**PHI3, homo_head=True)
    assert p.head_sliding_step == 0


def test_frozen():
    p = BlocksparseParams(**PHI3)
    with pytest.raises(AttributeError):
        p.local_blocks = 3


def test_from_vllm_dict():
    p = BlocksparseParams.from_vllm_dict({**PHI3, "homo_head": False}, tp_rank=1, tp_size=2)
    assert p.active_head_range == (32, 64)
    with pytest.raises(ValueError, match=r"unknown blocksparse parameter\(s\) \['foo'\]"):
        BlocksparseParams.from_vllm_dict({**PHI3, "foo": 1})


@pytest.mark.parametrize("change, match", [
    (dict(block_size=0), "block_size must be >= 1, got 0"),
    (dict(block_size=-64), "block_size must be >= 1, got -64"),
    (dict(block_size=40), r"block_size \(40\) must be a multiple of 16"),
    (dict(local_blocks=0), "local_blocks must be >= 1, got 0"),
    (dict(vert_stride=0), "vert_stride must be >= 1, got 0"),
    (dict(num_heads=30), r"num_heads \(30\) must be a multiple of num_kv_heads \(8\)"),
    (dict(num_kv_heads=0), "num_kv_heads must be >= 1, got 0"),
    (dict(max_seqlen=0), "max_seqlen must be >= 1, got 0"),
    (dict(tp_rank=2, tp_size=2), r"tp_rank \(2\) must be in \[0, tp_size\) = \[0, 2\)"),
    (dict(tp_rank=-1), r"tp_rank \(-1\) must be in \[0, tp_size\)"),
    (dict(tp_size=0), "tp_size must be >= 1, got 0"),
    (dict(homo_head=True, homo_head_group=True), "mutually exclusive"),
])
def test_invalid_values(change, match):
    with pytest.raises(ValueError, match=match):
        BlocksparseParams(**{**PHI3, **change})


def test_non_integer_is_type_error():
    with pytest.raises(TypeError, match=r"block_size must be an integer, got float \(64.0\)"):
        BlocksparseParams(**{**PHI3, "block_size": 64.0})
