"""The paged-K/V prefill kernel (cuda_src/prefill_paged.cu): chunked prefill / prefix caching against the float64
oracle on the gathered (dequantised) keys, the NumPy path of prefill_paged, and the backend on fp8 caches.

Caches are built element by element in vLLM's layout (tests/paged_problem.py) with shuffled, non-contiguous block
tables; slots no sequence owns hold NaN and unused table columns hold invalid ids, so any read outside a sequence's
context shows up. Outputs are NaN-poisoned before each launch.
"""

import math

import numpy as np
import pytest

from cubsattn import BlockSparseLayout, BlocksparseParams
from cubsattn import blocksparse_prefill_paged as prefill_paged
from conftest import BF16, FP16, TOLERANCES
from oracle import masked_attention, rule_mask
from paged_problem import make_problem

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


def rule_layout(max_seqlen, heads, kv_heads, block, local, vert):
    p = BlocksparseParams(max_seqlen, heads, kv_heads, block, local, vert)
    nb = -(-max_seqlen // block)
    return BlockSparseLayout.from_params(p), rule_mask(heads, kv_heads, nb, local, vert, p.head_sliding_step)


def run_gpu(cp, p, layout, sm_scale, *, use_out=True, strided_table=False):
    q = cp.asarray(p["q"])
    out = cp.asarray(np.full(p["q"].shape, np.nan, p["q"].dtype)) if use_out else None
    tables = cp.asarray(p["tables"])
    if strided_table:  # a non-contiguous int64 table view: the launcher makes its own int32 copy
        wide = cp.zeros((tables.shape[0], 2 * tables.shape[1]), np.int64)
        wide[:, ::2] = tables
        tables = wide[:, ::2]
    res = prefill_paged(q, cp.asarray(p["k_new"]), cp.asarray(p["v_new"]), cp.asarray(p["key_cache"]),
                        cp.asarray(p["value_cache"]), tables, cp.asarray(p["cu_q"]), cp.asarray(p["context"]),
                        layout, sm_scale=sm_scale, out=out, kv_cache_dtype=p["kv_cache_dtype"],
                        k_scale=p["k_scale"], v_scale=p["v_scale"])
    if use_out:
        assert res is out
    return res.get()


def check(gpu, p, layout, mask, block, sm_scale):
    """Oracle tolerance on the gathered keys, flash-attn 2x rule and agreement with the NumPy path."""
    dtype = p["q"].dtype
    rtol, atol = TOLERANCES[np.dtype(dtype)]
    scale = 1 / math.sqrt(p["q"].shape[2]) if sm_scale is None else sm_scale
    want = masked_attention(p["q"], p["k_all"], p["v_all"], p["cu_q"], p["cu_k"], mask, block, scale)
    got = gpu.astype(np.float64)
    assert np.isfinite(got).all(), "NaN/inf in the output (poisoned rows or cache slots leaked)"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    ref = prefill_paged(p["q"], p["k_new"], p["v_new"], p["key_cache"], p["value_cache"], p["tables"], p["cu_q"],
                        p["context"], layout, sm_scale=sm_scale, kv_cache_dtype=p["kv_cache_dtype"],
                        k_scale=p["k_scale"], v_scale=p["v_scale"]).astype(np.float64)
    err_gpu, err_ref = np.abs(got - want).max(initial=0.0), np.abs(ref - want).max(initial=0.0)
    assert err_gpu <= 2 * err_ref + atol / 4, f"GPU error {err_gpu:.3g} > 2 x NumPy error {err_ref:.3g}"


# ---- random configurations ------------------------------------------------------------------------------------

HEAD_SIZES = (64, 128, 64, 128, 80, 96, 256)


def random_case(seed):
    """Context lengths cover 0, < one cache block, crossing blocks, and beyond the local window."""
    r = np.random.default_rng(seed)
    dtype = (FP16, BF16)[seed % 2]
    d = HEAD_SIZES[seed % len(HEAD_SIZES)]
    block = (16, 32, 64, 128)[(seed // 2) % 4]
    cache_block = int(r.choice([c for c in (8, 16, 32) if block % c == 0]))
    kv_heads = int(r.choice([1, 2]))
    heads = kv_heads * int(r.choice([1, 2, 4]))
    local, vert = int(r.integers(1, 4)), int(r.integers(1, 5))
    max_seqlen = 640
    batch = int(r.integers(1, 4))
    kinds = r.choice(["zero", "short", "cross", "far"], batch)
    contexts = []
    for kind in kinds:
        if kind == "zero":
            contexts.append(0)
        elif kind == "short":
            contexts.append(int(r.integers(1, cache_block)))
        elif kind == "cross":
            contexts.append(int(r.integers(cache_block + 1, 3 * block)))
        else:
            contexts.append(int(r.integers(local * block + 1, max_seqlen - 100)))
    q_lens = [int(min(r.integers(1, 200), max_seqlen - c)) for c in contexts]
    if seed % 5 == 0:
        q_lens[0] = 1  # one new token after a context
    fp8 = seed % 3 == 1
    return dict(seed=seed, dtype=dtype, d=d, block=block, cache_block=cache_block, heads=heads, kv_heads=kv_heads,
                local=local, vert=vert, max_seqlen=max_seqlen, contexts=contexts, q_lens=q_lens, fp8=fp8,
                sm_scale=(None, 1.0 / d)[seed % 2])


RANDOM = [random_case(s) for s in range(24)]


def case_id(c):
    return (f"r{c['seed']:02d}-{'fp8' if c['fp8'] else 'auto'}-d{c['d']}-b{c['block']}-cb{c['cache_block']}-"
            f"h{c['heads']}x{c['kv_heads']}-ctx{'_'.join(map(str, c['contexts']))}")


@pytest.mark.parametrize("c", RANDOM, ids=[case_id(c) for c in RANDOM])
def test_random(cp, c):
    rng = np.random.default_rng(20_000 + c["seed"])
    layout, mask = rule_layout(c["max_seqlen"], c["heads"], c["kv_heads"], c["block"], c["local"], c["vert"])
    p = make_problem(rng, c["dtype"], c["d"], c["heads"], c["kv_heads"], c["contexts"], c["q_lens"],
                     c["cache_block"], fp8=c["fp8"], k_scale=0.03, v_scale=0.02)
    gpu = run_gpu(cp, p, layout, c["sm_scale"], use_out=c["seed"] % 4 != 3, strided_table=c["seed"] % 7 == 2)
    check(gpu, p, layout, mask, c["block"], c["sm_scale"])


# ---- curated cases (small: also the compute-sanitizer subset, -k sanitize) ------------------------------------

CURATED = [
    # id, dtype, d, block, cache_block, heads, kv_heads, contexts, q_lens, fp8
    ("sanitize-fp16-ctx-tile-boundary", FP16, 64, 16, 8, 4, 2, [64, 63, 65], [64, 30, 17], False),
    ("sanitize-bf16-fp8-d128", BF16, 128, 64, 16, 4, 1, [0, 130, 7], [40, 60, 9], True),
    ("sanitize-fp16-b128-cb32-d256", FP16, 256, 128, 32, 2, 2, [300, 1], [90, 200], False),
    ("bf16-fp8-d80-b32-cb8", BF16, 80, 32, 8, 6, 3, [33, 250], [100, 3], True),
    ("fp16-ctx-only-one-query", FP16, 96, 16, 16, 2, 1, [200, 17, 0], [1, 1, 1], False),
    ("fp16-empty-queries", FP16, 64, 32, 16, 2, 1, [40, 10, 0], [0, 25, 0], False),
]


@pytest.mark.parametrize("case", CURATED, ids=[c[0] for c in CURATED])
def test_curated(cp, rng, case):
    _, dtype, d, block, cache_block, heads, kv_heads, contexts, q_lens, fp8 = case
    layout, mask = rule_layout(512, heads, kv_heads, block, 2, 3)
    p = make_problem(rng, dtype, d, heads, kv_heads, contexts, q_lens, cache_block, fp8=fp8, k_scale=0.05,
                     v_scale=0.04)
    gpu = run_gpu(cp, p, layout, None)
    check(gpu, p, layout, mask, block, None)


def test_custom_mask_layout(cp, rng):
    """An arbitrary block mask (empty rows give zeros) through the paged path."""
    nb, block = 16, 32
    m = np.tril(rng.random((2, nb, nb)) < 0.4)
    m[:, np.arange(nb), np.arange(nb)] = True
    m[1, 5] = False
    layout = BlockSparseLayout.from_mask(m, block)
    p = make_problem(rng, BF16, 64, 2, 1, [150, 40], [100, 120], 16)
    gpu = run_gpu(cp, p, layout, 0.1)
    check(gpu, p, layout, m, block, 0.1)


def test_matches_contiguous_kernel_for_16bit_cache(cp, rng):
    """With a 16-bit cache the gathered keys are exact, so the paged kernel agrees with the contiguous kernel on
    the packed keys to within rounding of the same fp32 math (the order of key tiles is the same)."""
    import cubsattn

    layout, _ = rule_layout(1024, 8, 2, 64, 4, 4)
    p = make_problem(rng, BF16, 128, 8, 2, [512, 300], [256, 129], 16)
    gpu = run_gpu(cp, p, layout, 1 / 128)
    contiguous = cubsattn.blocksparse_prefill(cp.asarray(p["q"]), cp.asarray(p["k_all"]), cp.asarray(p["v_all"]),
                                              cp.asarray(p["cu_q"]), cp.asarray(p["cu_k"]), layout,
                                              sm_scale=1 / 128).get()
    rtol, atol = TOLERANCES[BF16]
    np.testing.assert_allclose(gpu.astype(np.float64), contiguous.astype(np.float64), rtol=rtol, atol=atol)


def test_unsupported_cache_block(cp, rng):
    layout, _ = rule_layout(256, 2, 1, 16, 2, 2)
    p = make_problem(rng, FP16, 64, 2, 1, [8], [4], 4)
    with pytest.raises(NotImplementedError, match=r"cache block_size 4 .*supported: \(8, 16, 32"):
        run_gpu(cp, p, layout, None)


# ---- backend: fp8 cache, CUDA == NumPy ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_backend_fp8_cuda_matches_numpy(cp, dtype):
    """Chunked prefills and decodes on an fp8 cache: the CUDA backend (paged prefill kernel) equals the NumPy
    backend (gathered contexts) within tolerance, in batches mixing all kinds of sequences."""
    from test_backend import PLANS, run_schedule

    host = run_schedule(np, dtype, np.random.default_rng(5), PLANS, kv_cache_dtype="fp8")
    dev = run_schedule(cp, dtype, np.random.default_rng(5), PLANS, kv_cache_dtype="fp8")
    rtol, atol = TOLERANCES[dtype]
    for a, b in zip(host, dev):
        assert np.isfinite(b["out"]).all()
        np.testing.assert_allclose(b["out"], a["out"], rtol=rtol, atol=atol)
