"""Layouts: the rule vs an independent loop oracle, CSR round trips, TP slices, vLLM's get_sparse_attn_mask."""

import time

import numpy as np
import pytest

from cubsattn import BlockSparseLayout, BlocksparseParams, get_sparse_attn_mask
from oracle import rule_mask


def random_params(rng):
    tp_size = int(rng.choice([1, 1, 2, 4]))
    kv_per_rank = int(rng.integers(1, 4))
    group = int(rng.choice([1, 2, 4, 8]))
    heads_per_rank = kv_per_rank * group
    if heads_per_rank * tp_size > 64:
        tp_size = 1
    block_size = int(rng.choice([16, 32, 64, 128]))
    num_blocks = int(rng.integers(1, 30))
    mode = rng.integers(3)
    return BlocksparseParams(
        max_seqlen=int(num_blocks * block_size - rng.integers(0, block_size)),
        num_heads=heads_per_rank, num_kv_heads=kv_per_rank, block_size=block_size,
        local_blocks=int(rng.integers(1, 21)), vert_stride=int(rng.integers(1, 17)),
        homo_head=bool(mode == 1), homo_head_group=bool(mode == 2),
        tp_rank=int(rng.integers(tp_size)), tp_size=tp_size)


@pytest.mark.parametrize("seed", range(60))
def test_rule_matches_loop_oracle(seed):
    p = random_params(np.random.default_rng(seed))
    lay = BlockSparseLayout.from_params(p)
    want = rule_mask(p.total_heads, p.total_kv_heads, p.num_blocks, p.local_blocks, p.vert_stride,
                     p.head_sliding_step, heads=range(*p.active_head_range))
    np.testing.assert_array_equal(lay.to_mask(), want)
    # The CSR itself (not only the dense view) must describe the same mask, ascending, diagonal last.
    np.testing.assert_array_equal(BlockSparseLayout.from_mask(want, p.block_size).indptr, lay.indptr)
    for h in range(lay.num_heads):
        for qb in range(lay.num_blocks):
            cols = lay.indices[h, lay.indptr[h, qb]:lay.indptr[h, qb + 1]]
            np.testing.assert_array_equal(cols, np.flatnonzero(want[h, qb]))
            assert cols[-1] == qb


def test_phi3_pattern_by_hand():
    # Phi-3-small: step 1, vert 8 -> the stripes of head h are the key blocks kb = 7 - (h mod 8) (mod 8).
    lay = BlockSparseLayout.from_params(BlocksparseParams(8192, 32, 8, 64, 16, 8))
    mask = lay.to_mask()
    for h in (0, 3, 8, 31):
        row = mask[h, 100]
        remote = np.flatnonzero(row[:100 - 16 + 1])
        assert set(remote % 8) == {(7 - h % 8) % 8}
        assert row[85:101].all() and not row[101:].any()
    np.testing.assert_array_equal(mask[0], mask[8])
    assert not np.array_equal(mask[0], mask[1])


def test_hand_drawn_small_mask():
    lay = BlockSparseLayout.local_strided(2, 5 * 16, 16, local_blocks=2, vert_stride=3, head_sliding_step=1)
    # head 0: offset 1 -> stripes at kb with (kb + 1) % 3 == 0 -> kb = 2; head 1: offset 2 -> kb = 1, 4
    want0 = np.array([[1, 0, 0, 0, 0],
                      [1, 1, 0, 0, 0],
                      [0, 1, 1, 0, 0],
                      [0, 0, 1, 1, 0],
                      [0, 0, 1, 1, 1]], dtype=bool)
    want1 = np.array([[1, 0, 0, 0, 0],
                      [1, 1, 0, 0, 0],
                      [0, 1, 1, 0, 0],
                      [0, 1, 1, 1, 0],
                      [0, 1, 0, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(lay.to_mask(), np.stack([want0, want1]))
    assert lay.to_text(heads=[0]).splitlines() == ["head 0", "  #", "  ##", "  .##", "  ..##", "  ..###"]


def test_homo_head_group_slides_per_kv_head():
    p = BlocksparseParams(1024, 8, 2, 16, 2, 8, homo_head_group=True)   # step -4: kv head 0 offset 1, kv 1 offset 5
    mask = BlockSparseLayout.from_params(p).to_mask()
    for h in range(4):
        np.testing.assert_array_equal(mask[h], mask[0])
        np.testing.assert_array_equal(mask[4 + h], mask[4])
    assert not np.array_equal(mask[0], mask[4])


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tp_slice_equals_slice_of_full(tp_size):
    full = BlockSparseLayout.from_params(BlocksparseParams(4096, 32, 8, 64, 4, 8))
    for r in range(tp_size):
        p = BlocksparseParams(4096, 32 // tp_size, 8 // tp_size, 64, 4, 8, tp_rank=r, tp_size=tp_size)
        part = BlockSparseLayout.from_params(p)
        s = slice(*p.active_head_range)
        np.testing.assert_array_equal(part.to_mask(), full.to_mask()[s])
        sliced = full.head_slice(*p.active_head_range)
        np.testing.assert_array_equal(part.indptr, sliced.indptr)
        width = part.indices.shape[1]
        np.testing.assert_array_equal(part.indices, sliced.indices[:, :width])


def test_csr_round_trip_random_masks(rng):
    for _ in range(20):
        heads, nb = int(rng.integers(1, 6)), int(rng.integers(1, 20))
        mask = np.tril(rng.random((heads, nb, nb)) < 0.4)
        idx = np.arange(nb)
        mask[:, idx, idx] = True
        mask[rng.random((heads, nb)) < 0.2] = False      # some empty rows
        lay = BlockSparseLayout.from_mask(mask, 32)
        np.testing.assert_array_equal(lay.to_mask(), mask)
        again = BlockSparseLayout(lay.indptr, lay.indices, 32)
        np.testing.assert_array_equal(again.to_mask(), mask)
        assert lay.indices.dtype == np.int32 and lay.indptr.dtype == np.int32
        assert (lay.indices[:, lay.indptr[:, -1].min():] == -1).any() or lay.indptr[:, -1].min() == \
            lay.indices.shape[1]


def brute_pairs(mask, block_size, seq_len, q_len):
    total = 0
    for h in range(mask.shape[0]):
        for qpos in range(seq_len - q_len, seq_len):
            for kpos in range(qpos + 1):
                total += bool(mask[h, qpos // block_size, kpos // block_size])
    return total


@pytest.mark.parametrize("seq_len, q_len", [(1, 1), (16, 16), (37, 37), (100, 100), (100, 1), (100, 45), (64, 0)])
def test_allowed_pairs_and_flops(seq_len, q_len):
    lay = BlockSparseLayout.local_strided(3, 128, 16, local_blocks=2, vert_stride=3, head_sliding_step=1)
    want = brute_pairs(lay.to_mask(), 16, seq_len, q_len)
    assert lay.allowed_pairs(seq_len, q_len) == want
    assert lay.flops(seq_len, 64, q_len) == 4 * 64 * want


def test_density_matches_benchmarks_md():
    lay = BlockSparseLayout.from_params(BlocksparseParams(65536, 32, 8, 64, 16, 8))
    assert lay.density(1024) == 1.0                              # 16 local blocks x 64 = dense up to 1024
    assert round(lay.density(4096), 2) == 0.50
    assert round(lay.density(16384), 2) == 0.23
    assert round(lay.density(65536), 2) == 0.15


def test_get_sparse_attn_mask_shapes_and_content():
    (crow, col), block_mask, dense = get_sparse_attn_mask(4, 96, 128, block_size=16, local_blocks=2, vert_stride=4,
                                                          homo_head=False, return_dense=True)
    assert crow.shape == (4, 7) and crow.dtype == np.int64 and block_mask.shape == (4, 6, 8)
    assert dense.shape == (4, 96, 128)
    full = rule_mask(4, 4, 8, 2, 4, 1)
    np.testing.assert_array_equal(block_mask, full[:, 2:])
    for h in range(4):
        for r in range(6):
            cols = col[h, crow[h, r]:crow[h, r + 1]]
            np.testing.assert_array_equal(cols, np.flatnonzero(full[h, r + 2]))
        assert (col[h, crow[h, -1]:] == -1).all()
    # dense row i is query position 32 + i: kron(block mask) AND causal.
    qpos, kpos = np.arange(32, 128), np.arange(128)
    want = full[:, qpos // 16][:, :, kpos // 16] & (kpos[None, None] <= qpos[None, :, None])
    np.testing.assert_array_equal(dense.astype(bool), want)


def test_get_sparse_attn_mask_homo_and_bias():
    (crow, col), block_mask, dense = get_sparse_attn_mask(8, 64, 64, block_size=16, local_blocks=1, vert_stride=2,
                                                          homo_head=True, return_dense=True, dense_mask_type="bias")
    assert block_mask.shape == (4, 4) and crow.shape == (8, 5) and dense.shape == (64, 64)
    assert crow.strides[0] == 0                                   # one row broadcast to all heads, like expand()
    assert set(np.unique(dense)) == {0.0, -np.inf}
    assert dense[5, 6] == -np.inf and dense[5, 5] == 0.0


def test_get_sparse_attn_mask_unaligned_max_seqlen():
    # max_seqlen % block_size != 0: the last token row is position max_seqlen - 1 (vLLM misaligned this).
    _, _, dense = get_sparse_attn_mask(1, 50, 50, block_size=16, local_blocks=1, vert_stride=100,
                                       homo_head=True, return_dense=True)
    assert dense[49, 48:50].tolist() == [1.0, 1.0] and dense[49, 47] == 0.0     # position 49 is in block 3
    assert dense[47, 32:48].all() and dense[47, 31] == 0.0                        # position 47 is in block 2
    assert dense[0, 0] == 1.0 and dense[0, 1] == 0.0


def test_get_sparse_attn_mask_is_fast_at_128k():
    t = time.perf_counter()
    (crow, col), block_mask, _ = get_sparse_attn_mask(32, 131072, 131072, 64, 16, 8, homo_head=False)
    elapsed = time.perf_counter() - t
    assert crow.shape == (32, 2049) and block_mask.shape == (32, 2048, 2048)
    assert elapsed < 2.0, f"took {elapsed:.2f} s"


def test_layout_from_params_128k_is_fast():
    t = time.perf_counter()
    lay = BlockSparseLayout.from_params(BlocksparseParams(131072, 32, 8, 64, 16, 8))
    assert time.perf_counter() - t < 2.0
    assert lay.num_blocks == 2048


def test_text_and_repr():
    lay = BlockSparseLayout.local_strided(2, 64, 16, 1, 2, 1)
    r = repr(lay)
    assert "num_heads=2" in r and "local_blocks=1" in r and "head 0" in r
    big = BlockSparseLayout.local_strided(1, 64 * 100, 64, 1, 2, 1)
    assert "(first 64 of 100 blocks)" in big.to_text()


def test_repr_png():
    pytest.importorskip("matplotlib")
    png = BlockSparseLayout.local_strided(2, 256, 16, 2, 4, 1)._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mask, match", [
    (np.array([[1, 1], [0, 1]], bool), r"causal at block level: head 0 has block \(qb=0, kb=1\)"),
    (np.array([[1, 0], [1, 0]], bool), r"must include its diagonal block: head 0 row 1"),
    (np.ones((2, 3), bool), r"mask must be \[num_heads, num_blocks, num_blocks\], got shape \[1, 2, 3\]"),
])
def test_from_mask_errors(mask, match):
    with pytest.raises(ValueError, match=match):
        BlockSparseLayout.from_mask(mask, 16)


def test_csr_constructor_errors():
    indptr = np.array([[0, 1, 3]])
    with pytest.raises(ValueError, match=r"column 1 must be in \[0, row\]"):
        BlockSparseLayout(indptr, np.array([[1, 0, 1]]), 16)
    with pytest.raises(ValueError, match="strictly ascending"):
        BlockSparseLayout(indptr, np.array([[0, 1, 0]]), 16)
    with pytest.raises(ValueError, match="non-decreasing"):
        BlockSparseLayout(np.array([[0, 2, 1]]), np.array([[0, 0]]), 16)
    with pytest.raises(ValueError, match=r"block_size \(24\) must be a multiple of 16"):
        BlockSparseLayout(indptr, np.array([[0, 0, 1]]), 24)
    with pytest.raises(ValueError, match=r"max_seqlen \(100\) needs ceil\(max_seqlen / block_size\) = 7"):
        BlockSparseLayout(indptr, np.array([[0, 0, 1]]), 16, max_seqlen=100)
    with pytest.raises(TypeError, match="indices must have an integer dtype"):
        BlockSparseLayout(indptr, np.array([[0.0, 0, 1]]), 16)
    with pytest.raises(ValueError, match=r"head slice \[2, 1\)"):
        BlockSparseLayout(indptr, np.array([[0, 0, 1]]), 16).head_slice(2, 1)
