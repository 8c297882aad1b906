"""prefill_paged on NumPy (the reference behaviour the CUDA kernel must match) and its argument checks."""

import numpy as np
import pytest

from cubsattn import BlockSparseLayout, BlocksparseParams
from cubsattn import blocksparse_prefill_paged as prefill_paged
from conftest import BF16, FP16, TOLERANCES
from oracle import masked_attention, rule_mask
from paged_problem import make_problem

H, HKV, D, BLOCK = 4, 2, 64, 16
PARAMS = BlocksparseParams(max_seqlen=512, num_heads=H, num_kv_heads=HKV, block_size=BLOCK, local_blocks=2,
                           vert_stride=3)
LAYOUT = BlockSparseLayout.from_params(PARAMS)
MASK = rule_mask(H, HKV, PARAMS.num_blocks, 2, 3, PARAMS.head_sliding_step)


def run(p, **kwargs):
    args = dict(sm_scale=1 / D, kv_cache_dtype=p["kv_cache_dtype"], k_scale=p["k_scale"], v_scale=p["v_scale"])
    args.update(kwargs)
    return prefill_paged(p["q"], p["k_new"], p["v_new"], p["key_cache"], p["value_cache"], p["tables"], p["cu_q"],
                         p["context"], LAYOUT, **args)


@pytest.mark.parametrize("fp8", [False, True], ids=["auto", "fp8"])
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_numpy_matches_oracle_on_gathered_keys(rng, dtype, fp8):
    p = make_problem(rng, dtype, D, H, HKV, [0, 5, 40, 100], [7, 30, 1, 60], 8, fp8=fp8, k_scale=0.02,
                     v_scale=0.05)
    out = np.full(p["q"].shape, np.nan, dtype)
    got = run(p, out=out)
    assert got is out
    want = masked_attention(p["q"], p["k_all"], p["v_all"], p["cu_q"], p["cu_k"], MASK, BLOCK, 1 / D)
    rtol, atol = TOLERANCES[dtype]
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=rtol, atol=atol)


def _problem(rng):
    return make_problem(rng, FP16, D, H, HKV, [20, 0], [10, 5], 16)


@pytest.mark.parametrize("change, exc, match", [
    (lambda p: p.update(k_new=p["k_new"][:, :1]), ValueError, r"v_new must have shape|k_new"),
    (lambda p: p.update(v_new=p["v_new"].astype(BF16)), TypeError, "v_new dtype"),
    (lambda p: p.update(key_cache=p["key_cache"].astype(BF16)), TypeError, "key_cache dtype"),
    (lambda p: p.update(value_cache=p["value_cache"][:, :, :32]), ValueError, "value_cache"),
    (lambda p: p.update(context=np.array([20, -1], np.int32)), ValueError, r"context_lens\[1\] \(-1\) must be >= 0"),
    (lambda p: p.update(context=np.array([20], np.int32)), ValueError, r"context_lens must have shape \[batch\]"),
    (lambda p: p.update(context=np.array([70, 0], np.int32)), ValueError, "needs 5 cache blocks of 16"),
    (lambda p: p["tables"].__setitem__((0, 1), 99), ValueError, r"block_tables\[0, 1\] \(99\) is not a cache block"),
    (lambda p: p["tables"].__setitem__((0, 0), -1), ValueError, r"block_tables\[0, 0\] \(-1\)"),
    (lambda p: p.update(tables=p["tables"][:1]), ValueError, "block_tables has 1 rows"),
    (lambda p: p.update(cu_q=np.array([0, 10, 14], np.int32)), ValueError, r"cu_seqlens_q\[-1\]"),
    (lambda p: p.update(context=np.array([505, 0], np.int32), tables=np.zeros((2, 40), np.int32)), ValueError,
     "must be <= max_seqlen"),
    (lambda p: p.update(kv_cache_dtype="fp8_e5m2"), ValueError, "fp8_e5m2"),
    (lambda p: p.update(kv_cache_dtype="fp8"), TypeError, "key_cache dtype .* must be uint8"),
])
def test_errors(rng, change, exc, match):
    p = _problem(rng)
    change(p)
    with pytest.raises(exc, match=match):
        run(p)


def test_fp8_scale_checked(rng):
    p = make_problem(rng, FP16, D, H, HKV, [20], [3], 16, fp8=True)
    with pytest.raises(ValueError, match="k_scale must be finite and > 0"):
        run(p, k_scale=0.0)


def test_layout_heads_checked(rng):
    p = _problem(rng)
    other = BlockSparseLayout.from_params(BlocksparseParams(512, 8, 2, BLOCK, 2, 3))
    with pytest.raises(ValueError, match="layout has 8 heads but q has 4"):
        prefill_paged(p["q"], p["k_new"], p["v_new"], p["key_cache"], p["value_cache"], p["tables"], p["cu_q"],
                      p["context"], other)
