"""The CUDA prefill kernel (cuda_src/prefill.cu) against the float64 oracle, the NumPy backend, and its own errors.

Every GPU output buffer is poisoned with NaN before the launch. Tolerances: TOLERANCES[dtype] against the float64
oracle, and (flash-attn rule) max error <= 2x the NumPy backend's max error on the same fp16/bf16 inputs + a small
epsilon.
"""

import math

import numpy as np
import pytest

from cubsattn import (BlockSparseLayout, BlocksparseParams, LocalStridedBlockSparseAttn, _prefill_cuda,
                      blocksparse_prefill)
from conftest import BF16, FP16, TOLERANCES
from test_prefill_numpy import make_batch as make_inputs
from oracle import masked_attention, rule_mask

pytestmark = pytest.mark.gpu

HEAD_SIZES = (64, 80, 96, 128, 256)
BLOCK_SIZES = (16, 32, 64, 128)


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


# ---- problem construction -------------------------------------------------------------------------------------

def sliding_step(total_heads, total_kv, vert, homo, group):
    """SPEC section 2, written out independently of cubsattn.params."""
    if homo:
        return 0
    if group:
        return -max(1, int(vert / total_kv))
    return max(1, int(vert / total_heads))


def rule_problem(max_seqlen, heads, kv_heads, block, local, vert, *, homo=False, group=False, tp_rank=0,
                 tp_size=1):
    """(layout, oracle block mask) for one tensor-parallel rank of the local-strided rule."""
    p = BlocksparseParams(max_seqlen, heads, kv_heads, block, local, vert, homo, group, tp_rank=tp_rank,
                          tp_size=tp_size)
    nb = -(-max_seqlen // block)
    step = sliding_step(heads * tp_size, kv_heads * tp_size, vert, homo, group)
    mask = rule_mask(heads * tp_size, kv_heads * tp_size, nb, local, vert, step,
                     heads=range(tp_rank * heads, (tp_rank + 1) * heads))
    return BlockSparseLayout.from_params(p), mask


def custom_problem(rng, max_seqlen, heads, block, empty_rows):
    """A random causal block mask with the diagonal in every non-empty row; ``empty_rows`` rows per head empty."""
    nb = -(-max_seqlen // block)
    mask = np.tril(rng.random((heads, nb, nb)) < 0.5)
    idx = np.arange(nb)
    mask[:, idx, idx] = True
    for h in range(heads):
        mask[h, rng.choice(nb, size=min(empty_rows, nb), replace=False)] = False
    return BlockSparseLayout.from_mask(mask, block, max_seqlen=max_seqlen), mask


def run_gpu(cp, q, k, v, cu_q, cu_k, layout, sm_scale, *, use_out=True, kernel="sm80"):
    """The sm_80 kernel (this file's subject; on Hopper "auto" would pick the sm_90a kernel, tested in
    test_prefill_sm90_gpu.py) on a NaN-poisoned out buffer (or out=None); returns the host result."""
    dq, dk, dv = cp.asarray(q), cp.asarray(k), cp.asarray(v)
    out = None
    if use_out:
        out = cp.asarray(np.full(q.shape, np.nan, dtype=q.dtype))
    res = blocksparse_prefill(dq, dk, dv, cp.asarray(cu_q), cp.asarray(cu_k), layout, sm_scale=sm_scale, out=out,
                              kernel=kernel)
    if use_out:
        assert res is out
    return res.get()


def check_against_oracle(gpu, q, k, v, cu_q, cu_k, layout, mask, block, sm_scale):
    """Oracle tolerance, flash-attn 2x rule against the NumPy backend, and GPU == NumPy backend."""
    dtype = q.dtype
    rtol, atol = TOLERANCES[np.dtype(dtype)]
    scale = 1 / math.sqrt(q.shape[2]) if sm_scale is None else sm_scale
    want = masked_attention(q, k, v, cu_q, cu_k, mask, block, scale)
    assert gpu.dtype == dtype and gpu.shape == q.shape
    got = gpu.astype(np.float64)
    assert np.isfinite(got).all(), "NaN/inf in the output (unwritten rows keep the NaN poison)"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    ref = blocksparse_prefill(q, k, v, cu_q, cu_k, layout, sm_scale=sm_scale).astype(np.float64)
    err_gpu = np.abs(got - want).max(initial=0.0)
    err_ref = np.abs(ref - want).max(initial=0.0)
    assert err_gpu <= 2 * err_ref + atol / 4, f"GPU error {err_gpu:.3g} > 2 x NumPy backend error {err_ref:.3g}"
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


# ---- curated cases --------------------------------------------------------------------------------------------

CASES = [
    # id, dtype, head_size, block, heads, kv_heads, local, vert, q_lens, k_lens, sm_scale
    ("phi3-like-bf16", BF16, 128, 64, 8, 2, 4, 8, [700, 300], [700, 300], 1 / 128),
    ("fp16-d64-b16-onetoken", FP16, 64, 16, 4, 4, 2, 3, [1, 70, 1, 33], [1, 70, 1, 33], None),
    ("bf16-d80-b32-mqa", BF16, 80, 32, 8, 1, 2, 4, [257], [257], None),
    ("fp16-d96-b128-gqa8", FP16, 96, 128, 8, 1, 1, 2, [600], [600], 0.2),
    ("bf16-d256-b64-gqa2", BF16, 256, 64, 4, 2, 2, 3, [321, 64], [321, 64], None),
    ("fp16-d256-b16-chunked", FP16, 256, 16, 2, 1, 2, 4, [5, 90], [150, 200], None),
    ("fp16-d128-b128-chunked", FP16, 128, 128, 4, 2, 1, 3, [1, 130, 300], [500, 400, 300], None),
    ("bf16-d64-b32-scale0", BF16, 64, 32, 4, 2, 2, 2, [100, 45], [100, 45], 0.0),
    ("fp16-d128-b16-dense", FP16, 128, 16, 4, 2, 1, 1, [200], [200], None),
    ("bf16-d96-b16-q0", BF16, 96, 16, 4, 4, 3, 2, [0, 40, 0], [10, 77, 0], None),
    ("fp16-d80-b64-negative-scale", FP16, 80, 64, 4, 2, 2, 3, [300, 20], [300, 50], -0.15),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_curated(cp, case, rng):
    _, dtype, d, block, heads, kv_heads, local, vert, q_lens, k_lens, sm_scale = case
    layout, mask = rule_problem(1024, heads, kv_heads, block, local, vert)
    q, k, v, cu_q, cu_k = make_inputs(rng, q_lens, k_lens, heads, kv_heads, d, dtype)
    gpu = run_gpu(cp, q, k, v, cu_q, cu_k, layout, sm_scale)
    check_against_oracle(gpu, q, k, v, cu_q, cu_k, layout, mask, block, sm_scale)


# ---- random configurations ------------------------------------------------------------------------------------

def random_case(seed):
    """One random problem: dtype, head size, block size, GQA ratio, varlen batch, layout kind, scale."""
    r = np.random.default_rng(seed)
    dtype = (FP16, BF16)[seed % 2]
    d = HEAD_SIZES[seed % 5]
    block = BLOCK_SIZES[(seed // 5) % 4]
    kv_heads = int(r.choice([1, 1, 2, 3]))
    ratio = int(r.choice([1, 2, 4, 8]))
    kind = ("rule", "tp", "homo", "group", "custom")[(seed // 2) % 5]
    max_seqlen = int(r.choice([block * 6, 520, 768]))
    batch = int(r.integers(1, 5))
    k_lens = r.integers(1, max_seqlen + 1, batch)
    k_lens[r.integers(batch)] = r.choice([1, max_seqlen, block * int(r.integers(1, 4)) + int(r.integers(1, 16))])
    k_lens = np.minimum(k_lens, max_seqlen)
    chunked = seed % 3 == 0
    q_lens = np.minimum(k_lens, r.integers(1, max_seqlen + 1, batch)) if chunked else k_lens.copy()
    sm_scale = (None, 0.11, None, 1.0)[seed % 4]
    return dict(dtype=dtype, d=d, block=block, heads=kv_heads * ratio, kv_heads=kv_heads, kind=kind,
                max_seqlen=max_seqlen, q_lens=q_lens, k_lens=k_lens, sm_scale=sm_scale,
                local=int(r.integers(1, 5)), vert=int(r.integers(1, 6)), seed=seed)


RANDOM = [random_case(s) for s in range(48)]


@pytest.mark.parametrize("c", RANDOM, ids=[f"r{c['seed']:02d}-{c['kind']}-d{c['d']}-b{c['block']}-"
                                            f"h{c['heads']}x{c['kv_heads']}" for c in RANDOM])
def test_random(cp, c):
    rng = np.random.default_rng(10_000 + c["seed"])
    heads, kv_heads, block = c["heads"], c["kv_heads"], c["block"]
    if c["kind"] == "custom":
        layout, mask = custom_problem(rng, c["max_seqlen"], heads, block, empty_rows=2)
    else:
        tp_size = 2 if c["kind"] == "tp" else 1
        layout, mask = rule_problem(c["max_seqlen"], heads, kv_heads, block, c["local"], c["vert"],
                                    homo=c["kind"] == "homo", group=c["kind"] == "group", tp_rank=tp_size - 1,
                                    tp_size=tp_size)
    q, k, v, cu_q, cu_k = make_inputs(rng, c["q_lens"], c["k_lens"], heads, kv_heads, c["d"], c["dtype"])
    gpu = run_gpu(cp, q, k, v, cu_q, cu_k, layout, c["sm_scale"], use_out=c["seed"] % 7 != 3)
    check_against_oracle(gpu, q, k, v, cu_q, cu_k, layout, mask, block, c["sm_scale"])


def test_custom_mask_empty_rows_are_zero(cp, rng):
    mask = np.tril(np.ones((2, 6, 6), bool))
    mask[0, 2] = False                      # head 0, block row 2 empty -> zeros
    mask[1, 4, :4] = False                  # head 1, row 4: diagonal only
    layout = BlockSparseLayout.from_mask(mask, 32)
    q, k, v, cu_q, cu_k = make_inputs(rng, [180], [180], 2, 1, 64, FP16)
    gpu = run_gpu(cp, q, k, v, cu_q, cu_k, layout, None)
    assert (gpu[64:96, 0] == 0).all()
    check_against_oracle(gpu, q, k, v, cu_q, cu_k, layout, mask, 32, None)


# ---- properties -----------------------------------------------------------------------------------------------

def test_deterministic(cp, rng):
    layout, _ = rule_problem(2048, 8, 2, 64, 4, 4)
    q, k, v, cu_q, cu_k = make_inputs(rng, [1500, 400], [1500, 400], 8, 2, 128, BF16)
    a = run_gpu(cp, q, k, v, cu_q, cu_k, layout, None)
    b = run_gpu(cp, q, k, v, cu_q, cu_k, layout, None)
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("d", [64, 128])
def test_fused_qkv_views(cp, rng, d):
    """q/k/v as strided slices of one fused [T, H + 2 H_kv, D] array give the same bits as contiguous copies."""
    heads, kv_heads = 8, 2
    layout, _ = rule_problem(512, heads, kv_heads, 32, 2, 3)
    qkv = cp.asarray(rng.standard_normal((300, heads + 2 * kv_heads, d)).astype(FP16))
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    cu = cp.asarray(np.array([0, 100, 300], np.int32))
    strided = blocksparse_prefill(q, k, v, cu, cu, layout)
    dense = blocksparse_prefill(cp.ascontiguousarray(q), cp.ascontiguousarray(k), cp.ascontiguousarray(v), cu, cu,
                                layout)
    assert strided.get().tobytes() == dense.get().tobytes()
    out_view = cp.asarray(np.full((300, 2 * heads, d), np.nan, dtype=FP16))[:, ::2]   # strided out= buffer
    blocksparse_prefill(q, k, v, cu, cu, layout, out=out_view)
    assert out_view.get().tobytes() == dense.get().tobytes()


def test_module_call_matches_numpy(cp, rng):
    attn = LocalStridedBlockSparseAttn(8, 1024, local_blocks=3, vert_stride=4, block_size=64)
    q, k, v, _, cu_k = make_inputs(rng, [400, 77], [400, 77], 8, 4, 128, BF16)
    host = attn(q, k, v, cu_k, sm_scale=1 / 128)
    dev = attn(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(cu_k), sm_scale=1 / 128)
    rtol, atol = TOLERANCES[BF16]
    np.testing.assert_allclose(dev.get().astype(np.float64), host.astype(np.float64), rtol=rtol, atol=atol)


# ---- support checks -------------------------------------------------------------------------------------------

def test_unsupported_head_size(cp):
    layout, _ = rule_problem(256, 2, 1, 16, 2, 2)
    q = cp.zeros((10, 2, 32), dtype=FP16)
    k = cp.zeros((10, 1, 32), dtype=FP16)
    cu = cp.asarray(np.array([0, 10], np.int32))
    with pytest.raises(NotImplementedError, match=r"head_size 32 .*supported: \(64, 80, 96, 128, 256\)"):
        blocksparse_prefill(q, k, k, cu, cu, layout)


def test_unsupported_block_size(cp):
    layout, _ = rule_problem(480, 2, 1, 48, 2, 2)
    q = cp.zeros((10, 2, 64), dtype=FP16)
    k = cp.zeros((10, 1, 64), dtype=FP16)
    cu = cp.asarray(np.array([0, 10], np.int32))
    with pytest.raises(NotImplementedError, match=r"block_size 48 .*supported: \(16, 32, 64, 128\)"):
        blocksparse_prefill(q, k, k, cu, cu, layout)


def test_rejected_strides(cp):
    layout, _ = rule_problem(256, 2, 1, 16, 2, 2)
    cu = cp.asarray(np.array([0, 10], np.int32))
    k = cp.zeros((10, 1, 64), dtype=FP16)
    q_pad = cp.zeros((10, 2, 68), dtype=FP16)[:, :, :64]        # head stride 68 elements
    with pytest.raises(ValueError, match="q head stride .*multiple of 8 elements"):
        blocksparse_prefill(q_pad, k, k, cu, cu, layout)
    q_gap = cp.zeros((10, 2, 128), dtype=FP16)[:, :, ::2]        # last dim not contiguous
    with pytest.raises(ValueError, match="q must have a contiguous last dimension"):
        blocksparse_prefill(q_gap, k, k, cu, cu, layout)
    k_odd = cp.zeros((10 * 64 + 1,), dtype=FP16)[1:].reshape(10, 1, 64)  # 2-byte aligned
    with pytest.raises(ValueError, match="k data pointer must be 16-byte aligned"):
        blocksparse_prefill(cp.zeros((10, 2, 64), dtype=FP16), k_odd, k, cu, cu, layout)


def test_schedule_heavy_first_and_aligned():
    cu_q = np.array([0, 100, 101, 101, 400])
    cu_k = np.array([0, 100, 301, 310, 610])
    tiles = _prefill_cuda.tile_schedule(cu_q, cu_k, 64)
    # seq 0: positions 0..99 -> tiles 0, 64; seq 1: position 200 -> tile 192; seq 2: none; seq 3: 1..299 -> 5 tiles
    assert sorted(map(tuple, tiles.tolist())) == [(0, 0), (0, 64), (1, 192), (3, 0), (3, 64), (3, 128), (3, 192),
                                                  (3, 256)]
    k_len = np.diff(cu_k)[tiles[:, 0]]
    span = np.minimum(tiles[:, 1] + 64, k_len)
    assert (np.diff(span) <= 0).all()


ALTERNATIVE_TILES = [(d, t) for d, t in _prefill_cuda.INSTANTIATIONS if _prefill_cuda.TILES[d] != t]


@pytest.mark.parametrize("head_size, tile", ALTERNATIVE_TILES, ids=str)
@pytest.mark.parametrize("block", [16, 128])
def test_alternative_tiles(cp, rng, monkeypatch, head_size, tile, block):
    """The non-default compiled tiles (benchmark alternatives) are correct too."""
    monkeypatch.setitem(_prefill_cuda.TILES, head_size, tile)
    layout, mask = rule_problem(768, 8, 2, block, 2, 3)
    q, k, v, cu_q, cu_k = make_inputs(rng, [300, 1, 200], [500, 1, 200], 8, 2, head_size, BF16)
    gpu = run_gpu(cp, q, k, v, cu_q, cu_k, layout, None)
    check_against_oracle(gpu, q, k, v, cu_q, cu_k, layout, mask, block, None)
