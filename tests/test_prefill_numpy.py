"""The NumPy prefill backend against the independent float64 oracle, plus every input error."""

import math

import ml_dtypes
import numpy as np
import pytest

from cubsattn import BlockSparseLayout, BlocksparseParams, LocalStridedBlockSparseAttn, blocksparse_prefill
from conftest import BF16, FP16, FP32, TOLERANCES
from oracle import masked_attention


def make_batch(rng, q_lens, k_lens, heads, kv_heads, head_size, dtype):
    tq, tk = int(sum(q_lens)), int(sum(k_lens))
    q = rng.standard_normal((tq, heads, head_size)).astype(dtype)
    k = rng.standard_normal((tk, kv_heads, head_size)).astype(dtype)
    v = rng.standard_normal((tk, kv_heads, head_size)).astype(dtype)
    cu_q = np.concatenate(([0], np.cumsum(q_lens))).astype(np.int32)
    cu_k = np.concatenate(([0], np.cumsum(k_lens))).astype(np.int32)
    return q, k, v, cu_q, cu_k


def check_close(out, want, dtype):
    rtol, atol = TOLERANCES[np.dtype(dtype)]
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out.astype(np.float64), want, rtol=rtol, atol=atol)


CASES = [
    # id, heads, kv_heads, head_size, block, local, vert, q_lens, k_lens, dtype
    ("mha-fp32", 4, 4, 32, 16, 2, 3, [70, 1, 33], [70, 1, 33], FP32),
    ("gqa4-fp16-cross-local", 8, 2, 64, 16, 3, 4, [130, 17], [130, 17], FP16),
    ("mqa-bf16", 4, 1, 64, 32, 1, 2, [200], [200], BF16),
    ("chunked-q<k", 4, 2, 32, 16, 2, 4, [5, 40, 1], [90, 40, 77], FP32),
    ("all-one-token", 2, 1, 16, 16, 1, 2, [1, 1, 1], [1, 1, 1], FP32),
    ("dense-vert1", 2, 2, 16, 16, 1, 1, [50], [50], FP32),
    ("block64-long", 4, 2, 32, 64, 2, 3, [300, 129], [300, 129], FP32),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_oracle(case, rng):
    _, heads, kv_heads, d, block, local, vert, q_lens, k_lens, dtype = case
    lay = BlockSparseLayout.local_strided(heads, 512, block, local, vert, head_sliding_step=1)
    q, k, v, cu_q, cu_k = make_batch(rng, q_lens, k_lens, heads, kv_heads, d, dtype)
    out = blocksparse_prefill(q, k, v, cu_q, cu_k, lay)
    want = masked_attention(q, k, v, cu_q, cu_k, lay.to_mask(), block, 1 / math.sqrt(d))
    check_close(out, want, dtype)


@pytest.mark.parametrize("seed", range(12))
def test_random_configs(seed):
    rng = np.random.default_rng(1000 + seed)
    kv_heads = int(rng.integers(1, 4))
    heads = kv_heads * int(rng.choice([1, 2, 4]))
    tp_size = int(rng.choice([1, 2]))
    block = int(rng.choice([16, 32]))
    mode = int(rng.integers(3))
    p = BlocksparseParams(400, heads, kv_heads, block, int(rng.integers(1, 5)), int(rng.integers(1, 6)),
                          homo_head=mode == 1, homo_head_group=mode == 2,
                          tp_rank=int(rng.integers(tp_size)), tp_size=tp_size)
    lay = BlockSparseLayout.from_params(p)
    batch = int(rng.integers(1, 4))
    k_lens = rng.integers(1, 400, batch)
    q_lens = np.minimum(k_lens, rng.integers(1, 400, batch)) if seed % 2 else k_lens
    q, k, v, cu_q, cu_k = make_batch(rng, q_lens, k_lens, heads, kv_heads, 32, np.float32)
    out = blocksparse_prefill(q, k, v, cu_q, cu_k, lay, sm_scale=0.3)
    check_close(out, masked_attention(q, k, v, cu_q, cu_k, lay.to_mask(), block, 0.3), np.float32)


def test_custom_mask_with_empty_row(rng):
    mask = np.tril(np.ones((2, 4, 4), bool))
    mask[0, 2] = False             # head 0, block row 2: empty -> zeros
    mask[1, 3, 1] = False
    lay = BlockSparseLayout.from_mask(mask, 16)
    q, k, v, cu_q, cu_k = make_batch(rng, [60], [60], 2, 2, 16, np.float32)
    out = blocksparse_prefill(q, k, v, cu_q, cu_k, lay)
    assert (out[32:48, 0] == 0).all() and np.abs(out[48:, 0]).sum() > 0
    check_close(out, masked_attention(q, k, v, cu_q, cu_k, mask, 16, 0.25), np.float32)


def test_scale_zero_is_honoured(rng):
    lay = BlockSparseLayout.local_strided(1, 64, 16, 4, 1, 1)
    q, k, v, cu_q, cu_k = make_batch(rng, [20], [20], 1, 1, 8, np.float32)
    out = blocksparse_prefill(q, k, v, cu_q, cu_k, lay, sm_scale=0.0)
    # scale 0: uniform weights over the causal prefix -> running mean of v.
    want = np.cumsum(v[:, 0].astype(np.float64), axis=0) / np.arange(1, 21)[:, None]
    np.testing.assert_allclose(out[:, 0], want, rtol=1e-5, atol=1e-5)


def test_out_buffer_is_filled(rng):
    lay = BlockSparseLayout.local_strided(2, 64, 16, 1, 2, 1)
    q, k, v, cu_q, cu_k = make_batch(rng, [40], [40], 2, 1, 16, FP16)
    out = np.full(q.shape, np.nan, dtype=FP16)
    res = blocksparse_prefill(q, k, v, cu_q, cu_k, lay, out=out)
    assert res is out and np.isfinite(out.astype(np.float32)).all()


def test_local_strided_attn_matches_vllm_usage(rng):
    # Phi-3-small-like, scaled down; TP rank 1 of 2 computes global heads 4..7.
    attn = LocalStridedBlockSparseAttn(8, 1024, local_blocks=4, vert_stride=8, block_size=16,
                                       active_head_range=(4, 8))
    full = LocalStridedBlockSparseAttn(8, 1024, local_blocks=4, vert_stride=8, block_size=16)
    q, k, v, cu_q, cu_k = make_batch(rng, [150, 90], [150, 90], 8, 2, 32, BF16)
    part = attn(q[:, 4:], k[:, 1:], v[:, 1:], cu_k)
    whole = full(q, k, v, cu_k)
    np.testing.assert_array_equal(part.astype(np.float32), whole[:, 4:].astype(np.float32))
    want = masked_attention(q, k, v, cu_q, cu_k, full.layout.to_mask(), 16, 1 / math.sqrt(32))
    check_close(whole, want, BF16)


def test_cu_seqlens_q_defaults(rng):
    lay = BlockSparseLayout.local_strided(2, 64, 16, 2, 2, 1)
    _, k, v, _, cu_k = make_batch(rng, [30, 10], [30, 10], 2, 2, 8, np.float32)
    q1 = rng.standard_normal((2, 2, 8)).astype(np.float32)              # T_q == batch: one query per sequence
    out = blocksparse_prefill(q1, k, v, None, cu_k, lay)
    want = masked_attention(q1, k, v, np.array([0, 1, 2]), cu_k, lay.to_mask(), 16, 8 ** -0.5)
    check_close(out, want, np.float32)


def test_q_block_size_accepted_and_result_unchanged(rng):
    a = LocalStridedBlockSparseAttn(2, 256, 2, 2, 16, q_block_size=32)
    b = LocalStridedBlockSparseAttn(2, 256, 2, 2, 16)
    q, k, v, _, cu_k = make_batch(rng, [100], [100], 2, 2, 8, np.float32)
    np.testing.assert_array_equal(a(q, k, v, cu_k), b(q, k, v, cu_k))
    with pytest.raises(ValueError, match=r"q_block_size \(8\) must be a multiple of block_size \(16\)"):
        LocalStridedBlockSparseAttn(2, 256, 2, 2, 16, q_block_size=8)


# ---- errors -------------------------------------------------------------------------------------------------------
LAY = BlockSparseLayout.local_strided(4, 128, 16, 2, 2, 1)
Q = np.ones((10, 4, 8), np.float32)
KV = np.ones((10, 2, 8), np.float32)
CU = np.array([0, 4, 10])


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(q=Q[0]), ValueError, r"q must be 3-D, got shape \[4, 8\]"),
    (dict(k=KV[0]), ValueError, r"k must be 3-D"),
    (dict(q=Q.astype(np.float64)), TypeError, "q has dtype float64; supported: float16, bfloat16, float32"),
    (dict(k=KV.astype(np.float16)), TypeError, r"k dtype \(float16\) must equal q dtype \(float32\)"),
    (dict(v=np.ones((10, 1, 8), np.float32)), ValueError, "k and v must have the same shape"),
    (dict(k=np.ones((10, 2, 4), np.float32), v=np.ones((10, 2, 4), np.float32)), ValueError,
     r"head_size of k \(4\) must equal head_size of q \(8\)"),
    (dict(k=np.ones((10, 3, 8), np.float32), v=np.ones((10, 3, 8), np.float32)), ValueError,
     r"num_heads of q \(4\) must be a multiple of num_kv_heads of k \(3\)"),
    (dict(layout=BlockSparseLayout.local_strided(2, 128, 16, 2, 2, 1)), ValueError,
     "layout has 2 heads but q has 4"),
    (dict(layout="dense"), TypeError, "layout must be a BlockSparseLayout"),
    (dict(cu_seqlens_k=np.array([0, 4, 9])), ValueError, r"cu_seqlens_k\[-1\] \(9\) must equal the number of "
                                                         r"tokens \(10\)"),
    (dict(cu_seqlens_k=np.array([0, 6, 4, 10])), ValueError, "cu_seqlens_k must be non-decreasing"),
    (dict(cu_seqlens_k=np.array([1, 4, 10])), ValueError, r"cu_seqlens_k\[0\] must be 0, got 1"),
    (dict(cu_seqlens_k=np.array([0.0, 4, 10])), TypeError, "cu_seqlens_k must have an integer dtype"),
    (dict(cu_seqlens_q=np.array([0, 10])), ValueError, "cu_seqlens_q has 2 entries but cu_seqlens_k has 3"),
    (dict(cu_seqlens_q=np.array([0, 5, 10])), ValueError, r"sequence 0: q_len \(5\) must be <= k_len \(4\)"),
    (dict(q=np.ones((7, 4, 8), np.float32)), ValueError, "cu_seqlens_q is required: q has 7 tokens"),
    (dict(layout=BlockSparseLayout.local_strided(4, 5, 16, 2, 2, 1)), ValueError,
     r"sequence 1: k_len \(6\) must be <= max_seqlen \(5\)"),
    (dict(out=np.ones((10, 4, 4), np.float32)), ValueError, r"out must have shape \[10, 4, 8\]"),
    (dict(out=np.ones((10, 4, 8), np.float16)), TypeError, r"out dtype \(float16\) must equal q dtype"),
    (dict(q=[[[1.0]]]), TypeError, "expected numpy.ndarray or cupy.ndarray"),
    (dict(kernel="sm75"), ValueError, r"kernel must be one of \('auto', 'sm80', 'sm90'\), got 'sm75'"),
])
def test_errors(kwargs, exc, match):
    args = dict(q=Q, k=KV, v=KV, cu_seqlens_q=None, cu_seqlens_k=CU, layout=LAY)
    args.update(kwargs)
    out = args.pop("out", None)
    kernel = args.pop("kernel", "auto")
    with pytest.raises(exc, match=match):
        blocksparse_prefill(args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"],
                            args["layout"], out=out, kernel=kernel)


def test_bf16_is_ml_dtypes():
    assert BF16 == np.dtype(ml_dtypes.bfloat16)
