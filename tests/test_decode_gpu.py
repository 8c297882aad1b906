"""Block-sparse paged decode on the GPU: random configurations against the float64 oracle of tests/test_decode.py,
split against non-split, determinism, clamping of bad device inputs, CUDA-graph capture.

``test_sanitizer_subset`` is the small selection run under ``compute-sanitizer`` (memcheck and racecheck).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import BF16, FP16, TOLERANCES
from test_decode import assert_close, make_case, oracle, random_config, run

pytestmark = pytest.mark.gpu


@pytest.fixture(params=["bulk", "mma"])
def kernel(request, monkeypatch):
    """The 16-bit-cache kernel under test: bulk-copy fed (sm_90) or cp.async fed (sm_80; forced here by raising the
    bulk kernel's minimum compute capability). fp8 caches run the CUDA-core kernel either way."""
    import cupy

    from cubsattn import _decode_cuda

    if request.param == "bulk":
        if int(cupy.cuda.Device().compute_capability) < _decode_cuda.BULK_MIN_CC:
            pytest.skip("the bulk-copy kernel needs compute capability >= 9.0")
    else:
        monkeypatch.setattr(_decode_cuda, "BULK_MIN_CC", 10**6)
    return request.param


def to_gpu(case, *, host_lens=False):
    import cupy

    moved = dict(case)
    for k in ("query", "key_cache", "value_cache", "block_tables", "seq_lens"):
        if not (k == "seq_lens" and host_lens):
            moved[k] = cupy.asarray(case[k])
    return moved


def run_gpu(case, **kw):
    """Run on the GPU into a NaN-poisoned output; returns a NumPy copy."""
    import cupy

    out = cupy.full(case["query"].shape, np.nan, dtype=case["query"].dtype)
    got = run(case, out=out, **kw)
    assert got is out
    return out.get()


@pytest.mark.parametrize("seed", range(60))
def test_random_configs(seed, kernel):
    rng = np.random.default_rng(seed)
    case = make_case(rng, **random_config(rng))
    splits = None if seed % 3 else int(rng.integers(2, 7))  # contexts here are short: force splits on a third
    got = run_gpu(to_gpu(case, host_lens=bool(seed % 2)), num_splits=splits)
    assert_close(got, oracle(case), case["query"].dtype)


PHI3 = dict(dtype=BF16, head_size=128, num_kv_heads=2, group=4, block_size=16, sparse_block=64, local_blocks=16,
            vert_stride=8, step=1, scale=1 / 128)


@pytest.mark.parametrize("kw", [
    dict(PHI3, seq_lens=(3000, 1500, 5)),
    dict(PHI3, seq_lens=(8200,), block_size=8, fp8=True, k_scale=0.5, v_scale=2.0),
    dict(dtype=FP16, head_size=80, group=3, block_size=32, sparse_block=32, seq_lens=(2000, 700), step=-1),
], ids=["phi3", "fp8-bs8", "d80-bs32"])
def test_split_and_single_agree(kw, kernel):
    rng = np.random.default_rng(7)
    case = make_case(rng, **kw)
    gpu = to_gpu(case)
    want = oracle(case)
    dtype = case["query"].dtype
    # 1 split needs ceil(8200 / 8) = 1025 blocks > 1024 for the bs-8 case: start at the least allowed count.
    least = 2 if kw.get("block_size") == 8 else 1
    base = run_gpu(gpu, num_splits=least)
    assert_close(base, want, dtype)
    rtol, atol = TOLERANCES[dtype]
    for splits in (least + 1, 5, 16, 64, None):
        got = run_gpu(gpu, num_splits=splits)
        np.testing.assert_allclose(got.astype(np.float64), base.astype(np.float64), rtol=rtol / 2, atol=atol / 2)


@pytest.mark.parametrize("fp8", [False, True], ids=["16bit", "fp8"])
@pytest.mark.parametrize("kw", [
    # Local window 1024 tokens: shorter, equal, straddling the split boundaries, 1 token.
    dict(PHI3, seq_lens=(1, 17, 500, 1024, 1025, 3000, 4097, 6000)),
    dict(dtype=FP16, head_size=64, group=3, block_size=8, sparse_block=32, local_blocks=3, vert_stride=5, step=2,
         tp_rank=1, seq_lens=(2000, 96, 97, 1)),
    dict(PHI3, step=0, vert_stride=16, local_blocks=2, seq_lens=(5000, 130)),            # homo_head: 1 stripe
    dict(PHI3, group=2, num_kv_heads=3, step=-1, tp_rank=2, seq_lens=(3500, 64, 65)),  # slide per kv head
    dict(PHI3, vert_stride=40, local_blocks=2, sparse_block=16, seq_lens=(3000, 700)),  # > 32: equal shares
    dict(PHI3, vert_stride=0, seq_lens=(2500, 3)),                                      # dense
], ids=["phi3", "g3", "homo", "per-kv-head", "vert40", "dense"])
def test_splits_agree_with_one(kw, fp8, kernel):
    # Equal ranges (16-bit caches) and equal shares of the needed blocks (fp8: decode.cu split_range's BALANCE, whose
    # boundaries fall inside or before stripes and inside the local window): every forced count must match the oracle
    # and the one-split result.
    if fp8 and kernel == "mma":
        pytest.skip("fp8 caches run the CUDA-core kernel for either fixture value")
    rng = np.random.default_rng(17)
    case = make_case(rng, fp8=fp8, **kw)
    gpu = to_gpu(case)
    dtype = case["query"].dtype
    base = run_gpu(gpu, num_splits=1)
    assert_close(base, oracle(case), dtype)
    rtol, atol = TOLERANCES[dtype]
    for splits in (2, 3, 4, 7, 16, 33):
        got = run_gpu(gpu, num_splits=splits)
        np.testing.assert_allclose(got.astype(np.float64), base.astype(np.float64), rtol=rtol / 2, atol=atol / 2)


@pytest.mark.parametrize("fp8", [False, True], ids=["16bit", "fp8"])
@pytest.mark.parametrize("kw,splits", [
    (dict(PHI3, head_size=64, num_kv_heads=1, group=2, block_size=8, vert_stride=0, seq_lens=(8192, 7)), 1),
    # vert 2 and 2 heads: every block is needed, so both splits fill the 1024-entry block list exactly.
    (dict(PHI3, head_size=64, num_kv_heads=1, group=2, block_size=8, sparse_block=16, local_blocks=1, vert_stride=2,
          seq_lens=(16384, 16383)), 2),
    # 1 stripe in 32: balanced (fp8), the first split of the 16200-token sequence spans 1788 blocks (more than the
    # list holds) but needs 63 of them.
    (dict(PHI3, head_size=64, num_kv_heads=1, block_size=8, local_blocks=7, vert_stride=32, step=0,
          seq_lens=(16200, 4096, 1)), 2),
], ids=["dense-1024", "all-needed-2x1024", "long-spans"])
def test_block_list_capacity(kw, splits, fp8, kernel):
    # The fewest splits allowed (MAX_SPLIT_BLOCKS needed blocks per split) read every block: nothing is dropped.
    from cubsattn import _decode_cuda

    if fp8 and kernel == "mma":
        pytest.skip("fp8 caches run the CUDA-core kernel for either fixture value")
    rng = np.random.default_rng(19)
    case = make_case(rng, fp8=fp8, **kw)
    context = int(case["seq_lens"].max())  # host seq_lens: the split count is sized from them, not max_seq_len
    assert _decode_cuda.min_num_splits(context, kw["block_size"]) == splits
    assert_close(run_gpu(to_gpu(case, host_lens=True), num_splits=splits), oracle(case), case["query"].dtype)


def test_deterministic(kernel):
    rng = np.random.default_rng(3)
    case = to_gpu(make_case(rng, **dict(PHI3, seq_lens=(5000, 300))))
    first = run_gpu(case, num_splits=9)
    for _ in range(3):
        np.testing.assert_array_equal(run_gpu(case, num_splits=9), first)


def test_long_sequence_128k(kernel):
    rng = np.random.default_rng(11)
    case = make_case(rng, **dict(PHI3, head_size=64, num_kv_heads=1, seq_lens=(131072, 1000)))
    got = run_gpu(to_gpu(case))
    assert_close(got, oracle(case), case["query"].dtype)


def test_device_inputs_are_clamped(kernel):
    # Device seq_lens are never read on the host: values past max_seq_len or the table width are clamped, and
    # block ids outside the cache are ignored, so the kernel never reads outside its inputs.
    import cupy

    rng = np.random.default_rng(5)
    case = make_case(rng, **dict(PHI3, seq_lens=(300, 200), pad_cols=0))
    gpu = to_gpu(case)
    gpu["seq_lens"] = cupy.asarray(np.array([10**9, 200], dtype=np.int32))
    gpu["max_seq_len"] = 280
    clamped = dict(case, seq_lens=np.array([280, 200], dtype=np.int32))
    assert_close(run_gpu(gpu), oracle(clamped), BF16)
    gpu["max_seq_len"] = 10**6  # now the table width (19 blocks = 304 tokens, 4 of them empty NaN slots) bounds it
    assert_close(run_gpu(gpu)[1], oracle(case)[1], BF16)
    bt = case["block_tables"].copy()
    bt[1, 0], bt[1, 3] = 10**6, -7
    gpu["block_tables"] = cupy.asarray(bt)
    assert np.isfinite(run_gpu(gpu)).all()


def test_cuda_graph_capture(kernel):
    import cupy

    rng = np.random.default_rng(9)
    case = to_gpu(make_case(rng, **dict(PHI3, seq_lens=(6000, 2500, 40))))
    want = run_gpu(case, num_splits=4)
    stream = cupy.cuda.Stream(non_blocking=True)
    out = cupy.full(case["query"].shape, np.nan, dtype=case["query"].dtype)
    with stream:
        run(case, out=out, num_splits=4)  # warm-up: compiles, caches the workspace
        out.fill(np.nan)
        stream.begin_capture()
        run(case, out=out, num_splits=4)
        graph = stream.end_capture()
        graph.launch()
        stream.synchronize()
        np.testing.assert_array_equal(out.get(), want)
        # Replays reuse the split tickets: the CTA that merges a row must leave its ticket at zero.
        out.fill(np.nan)
        graph.launch()
    stream.synchronize()
    np.testing.assert_array_equal(out.get(), want)


def test_repeated_calls_skip_checks_not_values(kernel):
    # A repeated argument signature launches without re-validating: device values that change between calls (seq_lens,
    # block tables) are still honoured, and an argument that only compares equal (False == 0) is still checked.
    import cupy

    rng = np.random.default_rng(13)
    case = make_case(rng, **dict(PHI3, seq_lens=(2500, 900)))
    gpu = to_gpu(case)
    first = run_gpu(gpu)
    assert_close(first, oracle(case), BF16)
    np.testing.assert_array_equal(run_gpu(gpu), first)
    shorter = dict(case, seq_lens=np.array([1200, 900], dtype=np.int32))
    gpu["seq_lens"][...] = cupy.asarray(shorter["seq_lens"])
    assert_close(run_gpu(gpu), oracle(shorter), BF16)
    with pytest.raises(TypeError, match="tp_rank must be an integer"):
        run(dict(gpu, tp_rank=False))
    for _ in range(2):  # an unhashable argument that no check reads (k_scale of a 16-bit cache) is just not cached
        np.testing.assert_array_equal(run_gpu(dict(gpu, k_scale=[2.0])), run_gpu(gpu))


def test_gpu_only_errors():
    import cupy

    rng = np.random.default_rng(1)
    case = to_gpu(make_case(rng, group=9, num_kv_heads=1))
    with pytest.raises(NotImplementedError, match=r"num_heads / num_kv_heads \(9\) must be <= 8"):
        run(case)
    case = to_gpu(make_case(rng, seq_lens=(9000,), block_size=8, sparse_block=8))
    with pytest.raises(ValueError, match=r"num_splits \(1\) must be >= 2"):
        run(case, num_splits=1)
    case = to_gpu(make_case(rng))
    q = cupy.asarray(np.asfortranarray(case["query"].get()))
    with pytest.raises(ValueError, match="query's last axis must be contiguous"):
        run(dict(case, query=q))
    with pytest.raises(TypeError, match="mix NumPy"):
        run(dict(case, query=case["query"].get()))


def test_sanitizer_subset(kernel):
    """Small, varied cases (sparse/dense, fp8, splits, clamps) for compute-sanitizer memcheck/racecheck."""
    import cupy

    for seed, kw in enumerate([
        dict(PHI3, seq_lens=(1100, 3)),
        dict(dtype=FP16, fp8=True, head_size=80, block_size=8, sparse_block=16, group=6, seq_lens=(300, 65)),
        dict(dtype=BF16, head_size=256, block_size=32, sparse_block=64, group=8, num_kv_heads=1, vert_stride=0,
             seq_lens=(200,)),
    ]):
        rng = np.random.default_rng(100 + seed)
        case = make_case(rng, **kw)
        gpu = to_gpu(case)
        for splits in (None, 3):
            assert_close(run_gpu(gpu, num_splits=splits), oracle(case), case["query"].dtype)
    gpu["seq_lens"] = cupy.asarray(np.array([10**9], dtype=np.int32))  # clamped to the table (garbage ids past
    run_gpu(gpu)                                                          # the end): memcheck must stay clean
