"""The Hopper prefill kernel (cuda_src/prefill_sm90.cu) against the float64 oracle and against the sm_80 kernel.

Same problems and checks as tests/test_prefill_gpu.py (whose helpers it imports), restricted to what the sm_90a
kernel compiles (head sizes 64 / 128, block sizes 64 / 128), launched through ``_prefill_sm90.prefill`` directly so
the tests do not depend on dispatch. Every output buffer is poisoned with NaN before the launch. Skipped unless the
device has compute capability 9.0.
"""

import math

import numpy as np
import pytest

from cubsattn import BlockSparseLayout, _prefill_cuda, _prefill_sm90
from conftest import BF16, FP16, TOLERANCES
from test_prefill_gpu import check_against_oracle, custom_problem, make_inputs, random_case, rule_problem

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    if int(cupy.cuda.Device().compute_capability) != _prefill_sm90.COMPUTE_CAPABILITY:
        pytest.skip("the sm_90a kernel needs compute capability 9.0")
    return cupy


def run_path(cp, module, q, k, v, cu_q, cu_k, layout, sm_scale, *, out_poison=True):
    """``module.prefill`` (sm_90a or sm_80 launcher) on a NaN-poisoned output; returns the host result."""
    scale = 1 / math.sqrt(q.shape[2]) if sm_scale is None else float(sm_scale)
    out = cp.asarray(np.full(q.shape, np.nan if out_poison else 0, dtype=q.dtype))
    res = module.prefill(cp.asarray(q), cp.asarray(k), cp.asarray(v), np.asarray(cu_q, np.int64),
                         np.asarray(cu_k, np.int64), layout, scale, out)
    assert res is out
    return res.get()


def run_sm90(cp, *args):
    return run_path(cp, _prefill_sm90, *args)


# ---- curated cases --------------------------------------------------------------------------------------------

CASES = [
    # id, dtype, head_size, block, heads, kv_heads, local, vert, q_lens, k_lens, sm_scale
    ("phi3-like-bf16", BF16, 128, 64, 8, 2, 4, 8, [700, 300], [700, 300], 1 / 128),
    ("phi3-long-bf16", BF16, 128, 64, 8, 2, 16, 8, [2500], [2500], 1 / 128),
    ("fp16-d64-b64-onetoken", FP16, 64, 64, 4, 4, 2, 3, [1, 70, 1, 33], [1, 70, 1, 33], None),
    ("bf16-d64-b128-mqa", BF16, 64, 128, 8, 1, 2, 4, [257], [257], None),
    ("fp16-d128-b128-gqa8", FP16, 128, 128, 8, 1, 1, 2, [600], [600], 0.2),
    ("fp16-d128-b128-chunked", FP16, 128, 128, 4, 2, 1, 3, [1, 130, 300], [500, 400, 300], None),
    ("bf16-d128-b64-chunked", BF16, 128, 64, 4, 2, 2, 3, [5, 90, 64], [150, 200, 1000], None),
    ("bf16-d64-b64-scale0", BF16, 64, 64, 4, 2, 2, 2, [100, 45], [100, 45], 0.0),
    ("fp16-d128-b64-dense", FP16, 128, 64, 4, 2, 1, 1, [400], [400], None),
    ("bf16-d64-b64-q0", BF16, 64, 64, 4, 4, 3, 2, [0, 40, 0], [10, 77, 0], None),
    ("fp16-d64-b128-negative-scale", FP16, 64, 128, 4, 2, 2, 3, [300, 20], [300, 50], -0.15),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_curated(cp, case, rng):
    _, dtype, d, block, heads, kv_heads, local, vert, q_lens, k_lens, sm_scale = case
    layout, mask = rule_problem(max(1024, max(k_lens)), heads, kv_heads, block, local, vert)
    q, k, v, cu_q, cu_k = make_inputs(rng, q_lens, k_lens, heads, kv_heads, d, dtype)
    gpu = run_sm90(cp, q, k, v, cu_q, cu_k, layout, sm_scale)
    check_against_oracle(gpu, q, k, v, cu_q, cu_k, layout, mask, block, sm_scale)


# ---- random configurations (test_prefill_gpu.random_case with a supported head / block size) ------------------

def sm90_case(seed):
    c = random_case(seed)
    c["d"] = _prefill_sm90.HEAD_SIZES[(seed // 2) % 2]
    c["block"] = _prefill_sm90.BLOCK_SIZES[(seed // 4) % 2]
    return c


RANDOM = [sm90_case(s) for s in range(40)]


@pytest.mark.parametrize("c", RANDOM, ids=[f"r{c['seed']:02d}-{c['kind']}-d{c['d']}-b{c['block']}-"
                                            f"h{c['heads']}x{c['kv_heads']}" for c in RANDOM])
def test_random(cp, c):
    rng = np.random.default_rng(20_000 + c["seed"])
    heads, kv_heads, block = c["heads"], c["kv_heads"], c["block"]
    if c["kind"] == "custom":
        layout, mask = custom_problem(rng, c["max_seqlen"], heads, block, empty_rows=2)
    else:
        tp_size = 2 if c["kind"] == "tp" else 1
        layout, mask = rule_problem(c["max_seqlen"], heads, kv_heads, block, c["local"], c["vert"],
                                    homo=c["kind"] == "homo", group=c["kind"] == "group", tp_rank=tp_size - 1,
                                    tp_size=tp_size)
    q, k, v, cu_q, cu_k = make_inputs(rng, c["q_lens"], c["k_lens"], heads, kv_heads, c["d"], c["dtype"])
    gpu = run_sm90(cp, q, k, v, cu_q, cu_k, layout, c["sm_scale"])
    check_against_oracle(gpu, q, k, v, cu_q, cu_k, layout, mask, block, c["sm_scale"])


def test_custom_mask_empty_rows_are_zero(cp, rng):
    mask = np.tril(np.ones((2, 6, 6), bool))
    mask[0, 2] = False                      # head 0, block row 2 empty -> zeros
    mask[1, 4, :4] = False                  # head 1, row 4: diagonal only
    layout = BlockSparseLayout.from_mask(mask, 64)
    q, k, v, cu_q, cu_k = make_inputs(rng, [350], [350], 2, 1, 64, FP16)
    gpu = run_sm90(cp, q, k, v, cu_q, cu_k, layout, None)
    assert (gpu[128:192, 0] == 0).all()
    check_against_oracle(gpu, q, k, v, cu_q, cu_k, layout, mask, 64, None)


def test_one_warpgroup_skips_long_runs(cp, rng):
    """Block 64: even CSR rows (first consumer warpgroup) hold columns 0 and the diagonal, odd rows are dense, so
    one warpgroup skips long runs of key tiles between two active ones (a pending P V must not hold its stage)."""
    nb = 24
    mask = np.tril(np.ones((2, nb, nb), bool))
    mask[:, 0::2, 1:] = False
    idx = np.arange(nb)
    mask[:, idx, idx] = True
    layout = BlockSparseLayout.from_mask(mask, 64)
    q, k, v, cu_q, cu_k = make_inputs(rng, [nb * 64, 700], [nb * 64, 900], 2, 1, 128, BF16)
    gpu = run_sm90(cp, q, k, v, cu_q, cu_k, layout, None)
    check_against_oracle(gpu, q, k, v, cu_q, cu_k, layout, mask, 64, None)


@pytest.mark.parametrize("d, block", [(128, 64), (64, 128)], ids=str)
def test_neighbour_inf_nan_stays_out(cp, rng, d, block):
    """Tensor copies read whole 64-row boxes, so a tile crossing a sequence's end holds the next sequence's rows:
    NaN / inf keys and values there (and queries before a sequence) must not reach this sequence's output."""
    heads, kv_heads = 4, 2
    layout, mask = rule_problem(1024, heads, kv_heads, block, 2, 3)
    q_lens, k_lens = [200, 70, 150], [230, 70, 300]  # sequence ends mid-tile
    q, k, v, cu_q, cu_k = make_inputs(rng, q_lens, k_lens, heads, kv_heads, d, BF16)
    poisoned = 1  # sequence 1 is all NaN / inf; its neighbours must not notice
    for arr, cu, val in ((k, cu_k, np.nan), (v, cu_k, np.inf), (q, cu_q, np.nan)):
        lo, hi = cu[poisoned], cu[poisoned + 1]
        arr[lo:hi] = val
    gpu = run_sm90(cp, q, k, v, cu_q, cu_k, layout, None)
    clean = [i for i in range(len(q_lens)) if i != poisoned]
    rtol, atol = TOLERANCES[np.dtype(BF16)]
    for i in clean:
        sub = lambda a, cu: a[cu[i]:cu[i + 1]]  # noqa: E731
        want = run_path(cp, _prefill_cuda, sub(q, cu_q), sub(k, cu_k), sub(v, cu_k), [0, q_lens[i]],
                        [0, k_lens[i]], layout, None)
        got = gpu[cu_q[i]:cu_q[i + 1]].astype(np.float64)
        assert np.isfinite(got).all(), f"sequence {i}: its neighbour's NaN / inf leaked in"
        np.testing.assert_allclose(got, want.astype(np.float64), rtol=rtol, atol=atol)


def test_broadcast_head_stride_falls_back(cp, rng):
    """A k/v head stride of 0 (one kv head broadcast to two) cannot be a tensor map: supports() says no, and the
    public call runs the sm_80 kernel and still gives the right answer."""
    import cubsattn

    layout, mask = rule_problem(256, 4, 2, 64, 2, 2)
    q, k1, v1, cu_q, cu_k = make_inputs(rng, [150], [150], 4, 1, 64, FP16)
    k = cp.broadcast_to(cp.asarray(k1), (150, 2, 64))
    v = cp.broadcast_to(cp.asarray(v1), (150, 2, 64))
    assert not _prefill_sm90.supports(cp.asarray(q), k, v, layout)
    got = cubsattn.blocksparse_prefill(cp.asarray(q), k, v, cu_q, cu_k, layout).get()
    want = run_path(cp, _prefill_cuda, q, np.repeat(k1, 2, axis=1), np.repeat(v1, 2, axis=1), cu_q, cu_k,
                    layout, None)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="tensor copies"):
        _prefill_sm90.prefill(cp.asarray(q), k, v, np.asarray(cu_q), np.asarray(cu_k), layout, 0.1,
                              cp.empty(q.shape, q.dtype))


# ---- properties -----------------------------------------------------------------------------------------------

def test_deterministic(cp, rng):
    layout, _ = rule_problem(2048, 8, 2, 64, 4, 4)
    q, k, v, cu_q, cu_k = make_inputs(rng, [1500, 400], [1500, 400], 8, 2, 128, BF16)
    a = run_sm90(cp, q, k, v, cu_q, cu_k, layout, None)
    b = run_sm90(cp, q, k, v, cu_q, cu_k, layout, None)
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype, d, block", [(BF16, 128, 64), (FP16, 64, 128), (BF16, 64, 64), (FP16, 128, 128)],
                         ids=str)
def test_matches_sm80_path(cp, rng, dtype, d, block):
    """Both kernels on the same inputs agree within the dtype tolerance (not bitwise: different MMA orders)."""
    layout, _ = rule_problem(4096, 8, 2, block, 5, 4)
    q, k, v, cu_q, cu_k = make_inputs(rng, [3000, 17, 600], [3000, 40, 1100], 8, 2, d, dtype)
    a = run_sm90(cp, q, k, v, cu_q, cu_k, layout, 1 / d)
    b = run_path(cp, _prefill_cuda, q, k, v, cu_q, cu_k, layout, 1 / d)
    rtol, atol = TOLERANCES[np.dtype(dtype)]
    np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=rtol, atol=atol)


def test_fused_qkv_views(cp, rng):
    """q/k/v as strided slices of one fused [T, H + 2 H_kv, D] array give the same bits as contiguous copies."""
    heads, kv_heads, d = 8, 2, 128
    layout, _ = rule_problem(512, heads, kv_heads, 64, 2, 3)
    qkv = cp.asarray(rng.standard_normal((300, heads + 2 * kv_heads, d)).astype(FP16))
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    cu = np.array([0, 100, 300])
    strided = _prefill_sm90.prefill(q, k, v, cu, cu, layout, 0.1, cp.empty(q.shape, q.dtype))
    dense = _prefill_sm90.prefill(cp.ascontiguousarray(q), cp.ascontiguousarray(k), cp.ascontiguousarray(v), cu, cu,
                                  layout, 0.1, cp.empty(q.shape, q.dtype))
    assert strided.get().tobytes() == dense.get().tobytes()


# ---- support checks -------------------------------------------------------------------------------------------

def test_supports(cp):
    layout64, _ = rule_problem(256, 2, 1, 64, 2, 2)
    layout32, _ = rule_problem(256, 2, 1, 32, 2, 2)
    q = cp.zeros((10, 2, 128), dtype=BF16)
    k = cp.zeros((10, 1, 128), dtype=BF16)
    assert _prefill_sm90.supports(q, k, k, layout64)
    assert not _prefill_sm90.supports(q, k, k, layout32)
    k96 = cp.zeros((10, 1, 96), FP16)
    assert not _prefill_sm90.supports(cp.zeros((10, 2, 96), FP16), k96, k96, layout64)
    assert not _prefill_sm90.supports(cp.zeros((10, 2, 256), FP16)[:, :, ::2], k, k, layout64)
    assert not _prefill_sm90.supports(q, k, cp.zeros((10, 2, 136), BF16)[:, :1, 4:132], layout64)  # 8-byte offset


def test_unsupported_sizes_raise(cp):
    layout32, _ = rule_problem(256, 2, 1, 32, 2, 2)
    q = cp.zeros((10, 2, 64), dtype=FP16)
    k = cp.zeros((10, 1, 64), dtype=FP16)
    cu = np.array([0, 10])
    with pytest.raises(NotImplementedError, match=r"block_size 32 .*supported: \(64, 128\)"):
        _prefill_sm90.prefill(q, k, k, cu, cu, layout32, 0.1, cp.empty_like(q))
    layout64, _ = rule_problem(256, 2, 1, 64, 2, 2)
    q96 = cp.zeros((10, 2, 96), dtype=FP16)
    with pytest.raises(NotImplementedError, match=r"head_size 96 .*supported: \(64, 128\)"):
        _prefill_sm90.prefill(q96, q96[:, :1], q96[:, :1], cu, cu, layout64, 0.1, cp.empty_like(q96))
