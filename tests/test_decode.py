"""Block-sparse paged decode, NumPy backend: against a float64 oracle that gathers K/V token by token through the
block tables and applies the sparse rule at sparse-block granularity; plus every argument error.

The helpers here (``make_case``, ``oracle``, ``random_config``) are shared with tests/test_decode_gpu.py.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from conftest import BF16, FP16, FP32, TOLERANCES
from cubsattn import PagedAttention
from cubsattn import _decode_cuda
from cubsattn.decode import forward_decode
from cubsattn.layout import _rule, stripe_offsets

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


# ---------------------------------------------------------------------------------------------------------------
# Cases and the oracle


def make_case(rng, *, dtype=FP16, fp8=False, head_size=64, block_size=16, num_kv_heads=2, group=2, seq_lens=(37,),
              sparse_block=32, local_blocks=2, vert_stride=3, step=1, tp_rank=0, scale=None, k_scale=1.0,
              v_scale=1.0, spare_blocks=3, pad_cols=2):
    """Inputs of one forward_decode call, caches in vLLM layout with shuffled physical blocks.

    Cache slots that hold no token are NaN, and block-table columns past a sequence's end hold garbage ids (some
    out of range), so reading either shows up in the output.
    """
    seq_lens = np.asarray(seq_lens, dtype=np.int32)
    num_seqs = seq_lens.size
    num_heads = num_kv_heads * group
    cache_dtype = np.dtype(np.uint8) if fp8 else np.dtype(dtype)
    x = 16 // cache_dtype.itemsize
    need = -(-seq_lens.astype(np.int64) // block_size)
    num_blocks = int(need.sum()) + spare_blocks
    width = int(need.max(initial=0)) + pad_cols
    phys = rng.permutation(num_blocks)
    block_tables = rng.integers(-3, 2 * num_blocks + 3, size=(num_seqs, max(width, 1))).astype(np.int32)
    store = FP8 if fp8 else np.dtype(dtype)
    kc = np.full((num_blocks, num_kv_heads, head_size // x, block_size, x), np.nan, dtype=store)
    vc = np.full((num_blocks, num_kv_heads, head_size, block_size), np.nan, dtype=store)
    used = 0
    for s, length in enumerate(seq_lens):
        block_tables[s, :need[s]] = phys[used:used + need[s]]
        used += need[s]
        t = np.arange(length)
        blk, off = block_tables[s, t // block_size], t % block_size
        k = rng.standard_normal((length, num_kv_heads, head_size))
        v = rng.standard_normal((length, num_kv_heads, head_size))
        if fp8:  # stored values are value / scale, as vLLM's cache write does
            k, v = k / k_scale, v / v_scale
        kc[blk, :, :, off, :] = k.reshape(length, num_kv_heads, head_size // x, x).astype(store)
        vc[blk, :, :, off] = v.astype(store)
    if fp8:
        kc, vc = kc.view(np.uint8), vc.view(np.uint8)
    query = rng.standard_normal((num_seqs, num_heads, head_size)).astype(dtype)
    return dict(query=query, key_cache=kc, value_cache=vc, block_tables=block_tables, seq_lens=seq_lens,
                max_seq_len=int(seq_lens.max(initial=1)) + 5, kv_cache_dtype="fp8" if fp8 else "auto",
                num_kv_heads=num_kv_heads, scale=scale, k_scale=k_scale, v_scale=v_scale, tp_rank=tp_rank,
                blocksparse_local_blocks=local_blocks, blocksparse_vert_stride=vert_stride,
                blocksparse_block_size=sparse_block, blocksparse_head_sliding_step=step)


def oracle(case) -> np.ndarray:
    """float64 decode attention, gathering every token through the block table; written from SPEC section 8."""
    q = case["query"].astype(np.float64)
    kc, vc = case["key_cache"], case["value_cache"]
    fp8 = case["kv_cache_dtype"] != "auto"
    if fp8:
        kc = kc.view(FP8).astype(np.float64) * case["k_scale"]
        vc = vc.view(FP8).astype(np.float64) * case["v_scale"]
    else:
        kc, vc = kc.astype(np.float64), vc.astype(np.float64)
    num_seqs, num_heads, head_size = q.shape
    num_kv_heads, block_size = kc.shape[1], vc.shape[3]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_size) if case["scale"] is None else case["scale"]
    vert, big_b, local = (case["blocksparse_vert_stride"], case["blocksparse_block_size"],
                          case["blocksparse_local_blocks"])
    step, tp = case["blocksparse_head_sliding_step"], case["tp_rank"]
    out = np.zeros(q.shape)
    for s in range(num_seqs):
        length = int(case["seq_lens"][s])
        if length == 0:
            continue
        t = np.arange(length)
        blk, off = case["block_tables"][s, t // block_size], t % block_size
        k = kc[blk, :, :, off, :].reshape(length, num_kv_heads, head_size)
        v = vc[blk, :, :, off]
        for h in range(num_heads):
            kvh = h // group
            keep = np.ones(length, dtype=bool)
            if vert > 1:
                qb, kb = (length - 1) // big_b, t // big_b
                offset = (tp * num_heads + h) * step + 1 if step >= 0 else (tp * num_kv_heads + kvh) * (-step) + 1
                keep = (qb - kb < local) | ((kb + offset) % vert == 0)
            logits = k[keep, kvh] @ q[s, h] * scale
            p = np.exp(logits - logits.max())
            out[s, h] = p @ v[keep, kvh] / p.sum()
    return out


def random_config(rng) -> dict:
    """Keyword arguments of make_case spanning the coverage of the decode issue (small sizes)."""
    block_size = int(rng.choice([8, 16, 32]))
    lens = rng.integers(1, 700, size=int(rng.integers(1, 5)))
    lens[rng.integers(lens.size)] = int(rng.choice([1, block_size, 64, 65, 700]))
    return dict(dtype=[FP16, BF16][rng.integers(2)], fp8=bool(rng.random() < 0.3),
                head_size=int(rng.choice([64, 80, 96, 128, 256])), block_size=block_size,
                num_kv_heads=int(rng.integers(1, 4)), group=int(rng.integers(1, 9)), seq_lens=lens,
                sparse_block=block_size * int(rng.choice([1, 2, 4])), local_blocks=int(rng.integers(1, 4)),
                vert_stride=int(rng.choice([0, 1, 2, 3, 4, 8])), step=int(rng.choice([0, 1, 2, -1, -2])),
                tp_rank=int(rng.choice([0, 0, 1, 3])), k_scale=float(rng.choice([1.0, 0.5, 2.0])),
                v_scale=float(rng.choice([1.0, 0.25, 1.5])), scale=[None, 0.1][rng.integers(2)])


def assert_close(got, want, dtype):
    rtol, atol = TOLERANCES[np.dtype(dtype)]
    got = np.asarray(got, dtype=np.float64)
    assert np.isfinite(got).all(), "output has NaN/inf"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def run(case, **kw):
    args = dict(case)
    return forward_decode(*[args.pop(k) for k in ("query", "key_cache", "value_cache", "block_tables", "seq_lens",
                                                  "max_seq_len", "kv_cache_dtype", "num_kv_heads", "scale")],
                          **args, **kw)


# ---------------------------------------------------------------------------------------------------------------
# NumPy backend against the oracle

CASES = [
    dict(),
    dict(dtype=BF16, head_size=128, group=4, seq_lens=(1, 64, 300), sparse_block=64, local_blocks=2, vert_stride=4),
    dict(dtype=FP32, head_size=80, block_size=8, sparse_block=8, seq_lens=(129, 5)),
    dict(head_size=96, block_size=32, sparse_block=32, group=8, num_kv_heads=1, step=-1, tp_rank=2),
    dict(dtype=BF16, fp8=True, k_scale=0.5, v_scale=2.0, head_size=256, group=3, seq_lens=(200, 33)),
    dict(fp8=True, k_scale=1.5, v_scale=0.5, vert_stride=0, seq_lens=(90,)),
    dict(step=0, vert_stride=2, local_blocks=1, seq_lens=(500, 17, 250)),
    dict(step=-2, vert_stride=3, tp_rank=1, group=1, num_kv_heads=3, seq_lens=(400,)),
    dict(scale=0.0, seq_lens=(40,)),
    dict(seq_lens=(0, 20)),
]


@pytest.mark.parametrize("kw", CASES, ids=[str(i) for i in range(len(CASES))])
def test_numpy_matches_oracle(rng, kw):
    case = make_case(rng, **kw)
    out = np.full(case["query"].shape, np.nan, dtype=case["query"].dtype)
    got = run(case, out=out)
    assert got is out
    assert_close(got, oracle(case), case["query"].dtype)


@pytest.mark.parametrize("seed", range(12))
def test_numpy_random_configs(seed):
    rng = np.random.default_rng(1000 + seed)
    case = make_case(rng, **random_config(rng))
    assert_close(run(case), oracle(case), case["query"].dtype)


def test_skipped_blocks_are_never_used(rng):
    # Poison the cache blocks that no head may see: the output must not change (and stay finite).
    case = make_case(rng, head_size=64, group=1, num_kv_heads=1, seq_lens=(640,), sparse_block=64, local_blocks=2,
                     vert_stride=4, step=0, block_size=16)
    base = run(case)
    kb = np.arange(10)
    keep = (9 - kb < 2) | ((kb + 1) % 4 == 0)        # homo layout: offset 1 for every head
    for b in np.nonzero(~keep)[0]:
        for j in range(4 * b, 4 * b + 4):              # cache blocks of sparse block b
            case["key_cache"][case["block_tables"][0, j]] = np.nan
            case["value_cache"][case["block_tables"][0, j]] = np.nan
    np.testing.assert_array_equal(run(case), base)


def test_paged_attention_exposes_decode():
    assert PagedAttention.get_supported_head_sizes() == [64, 80, 96, 128, 256]
    assert PagedAttention.forward_decode is forward_decode


# ---------------------------------------------------------------------------------------------------------------
# Split heuristic and launch geometry (pure host code)


@pytest.mark.parametrize("num_seqs,context,want", [(256, 2048, 1), (64, 8192, 1), (16, 32768, 2), (1, 131072, 33)])
def test_split_heuristic_fills_one_wave(num_seqs, context, want):
    # BENCHMARKS.md's decode configurations on 132 SMs: a split sequence gets the most splits whose CTAs fit one wave
    # of two per SM; 1 split when the unsplit CTAs already fill it.
    splits = _decode_cuda.choose_num_splits(num_seqs, 8, context, 16, 132)
    assert splits == want
    assert num_seqs * 8 * splits <= 132 * 2 or splits == 1
    assert math.ceil(math.ceil(context / 16) / splits) <= _decode_cuda.MAX_SPLIT_BLOCKS


def test_split_heuristic_respects_block_list_capacity():
    for bs in (8, 16, 32):
        for context in (1, 7, 4096, 4097, 131072):
            splits = _decode_cuda.choose_num_splits(512, 8, context, bs, 132)
            assert math.ceil(math.ceil(context / bs) / splits) <= _decode_cuda.MAX_SPLIT_BLOCKS
            assert splits >= 1


def split_ranges(length, *, num_splits, chunk, block_size, group, kvh, num_kv_heads, tp_rank, local_blocks,
                 vert_stride, sparse_block, step):
    """decode.cu's ``split_range`` with BALANCE (the fp8 kernel's splits) in Python: the cache-block range [x, y) of
    every split of one sequence."""
    nblk = -(-length // block_size)
    used = min(num_splits, -(-nblk // chunk))
    if used <= 1:
        return [(0, nblk)] * used + [(0, 0)] * (num_splits - used)
    vs, cbps, win0, pattern = 1, 1, 0, [0]
    if 1 < vert_stride <= 32:
        vs, cbps = vert_stride, sparse_block // block_size
        win0 = max(0, (length - 1) // sparse_block - local_blocks + 1)
        h0 = tp_rank * num_kv_heads * group + kvh * group
        offsets = stripe_offsets((h0, h0 + group), step, num_kv_heads * group, num_kv_heads)
        pattern = [r for r in range(vs) if any((r + o) % vs == 0 for o in offsets)]
    m = len(pattern)
    before = cbps * ((win0 // vs) * m + sum(r < win0 % vs for r in pattern))
    total = before + nblk - win0 * cbps

    def boundary(s):
        t = total * s // used
        if t >= before:
            return win0 * cbps + t - before
        c, part = divmod(t, cbps)
        return ((c // m) * vs + pattern[c % m]) * cbps + part

    ranges = [(0 if s == 0 else boundary(s), boundary(s + 1)) for s in range(used)]
    return ranges + [(0, 0)] * (num_splits - used)


@pytest.mark.parametrize("kw", [
    dict(block_size=16, sparse_block=64, local_blocks=16, vert_stride=8, step=1, group=4),  # Phi-3-small
    dict(block_size=8, sparse_block=64, local_blocks=4, vert_stride=16, step=0, group=4),
    dict(block_size=32, sparse_block=32, local_blocks=2, vert_stride=3, step=-1, group=3, tp_rank=1),
    dict(block_size=16, sparse_block=128, local_blocks=1, vert_stride=32, step=5, group=8),
    dict(block_size=16, sparse_block=16, local_blocks=2, vert_stride=2, step=1, group=2),  # every block needed
    dict(block_size=16, sparse_block=64, local_blocks=3, vert_stride=40, step=1, group=4),  # > 32: equal ranges
    dict(block_size=8, sparse_block=1, local_blocks=0, vert_stride=0, step=0, group=2),  # dense
])
def test_split_ranges_balance_needed_blocks(kw):
    # Every split of a sequence needs the same number of cache blocks (to within one) under the sparse rule, at most
    # chunk <= MAX_SPLIT_BLOCKS, and the splits tile the sequence's blocks in order.
    kw = dict(dict(num_kv_heads=2, tp_rank=0), **kw)
    bs, sb, vs = kw["block_size"], kw["sparse_block"], kw["vert_stride"]
    h = kw["num_kv_heads"] * kw["group"]
    for context, num_splits in ((32768, 4), (32768, 7), (131072, 33), (9000, 5), (4096, 2), (700, 3)):
        num_splits = max(num_splits, _decode_cuda.min_num_splits(context, bs))
        ctx_blocks = -(-context // bs)
        chunk = -(-ctx_blocks // num_splits)
        assert chunk <= _decode_cuda.MAX_SPLIT_BLOCKS
        lengths = {1, 2, bs, bs + 1, sb * kw["local_blocks"], sb * kw["local_blocks"] + 1, context - 1, context}
        lengths |= set(np.random.default_rng(context).integers(1, context + 1, size=40).tolist())
        for length in sorted(n for n in lengths if 1 <= n <= context):
            nblk = -(-length // bs)
            j = np.arange(nblk)
            for kvh in range(kw["num_kv_heads"]):
                ranges = split_ranges(length, num_splits=num_splits, chunk=chunk, kvh=kvh, **kw)
                spans = [(x, y) for x, y in ranges if x < y]
                assert [x for x, _ in spans] == [0] + [y for _, y in spans[:-1]] and spans[-1][1] == nblk
                if vs > 1:
                    offsets = stripe_offsets((kvh * kw["group"] + h * kw["tp_rank"],
                                              (kvh + 1) * kw["group"] + h * kw["tp_rank"]), kw["step"], h,
                                             kw["num_kv_heads"])
                    need = _rule((length - 1) // sb, (j * bs // sb)[None, :], offsets[:, None], kw["local_blocks"],
                                 vs).any(axis=0)
                else:
                    need = np.ones(nblk, dtype=bool)
                used = min(num_splits, -(-nblk // chunk))
                counts = [int(need[x:y].sum()) for x, y in ranges[:used]]
                assert max(counts) <= chunk
                if vs <= 32:  # else equal ranges of blocks, not of needed blocks
                    assert max(counts) - min(counts) <= 1, (length, kvh, counts)


def test_shared_memory_fits_hopper_and_ampere():
    for fp8 in (False, True):
        for d in _decode_cuda.HEAD_SIZES:
            for g in _decode_cuda.GROUP_WIDTHS:
                assert _decode_cuda.smem_bytes(d, fp8, g) <= 163 * 1024  # A100's opt-in limit is 163 KB


def test_params_dtype_mirrors_the_kernel_struct():
    # The kernels take their scalars as one DecodeParams passed by value: the launcher's structured dtype must list
    # the same fields, in the same order, with the same 4-byte types (so neither side has padding).
    import re

    from cubsattn import _kernels

    text = (_kernels.CUDA_SRC / "decode.cu").read_text()
    body = re.search(r"struct DecodeParams \{(.*?)\n\};", text, re.S).group(1)
    fields = []
    for line in body.splitlines():
        decl = line.split("//")[0].strip().rstrip(";")
        if decl:
            ctype, names = decl.split(None, 1)
            fields += [(name.strip(), ctype) for name in names.split(",")]
    want = {"int": np.dtype(np.int32), "float": np.dtype(np.float32)}
    dtype = _decode_cuda.PARAMS_DTYPE
    assert [name for name, _ in fields] == list(dtype.names)
    assert all(dtype.fields[name][0] == want[ctype] for name, ctype in fields)
    assert dtype.itemsize == 4 * len(fields)
    assert f"sizeof(DecodeParams) == {len(fields)} * 4" in text


def test_bulk_kernel_shared_memory():
    # sm_90 only: the per-block opt-in limit is 227 KB; head sizes up to 128 keep two CTAs (+1 KB reserved each) on
    # one SM's 228 KB.
    for d in _decode_cuda.HEAD_SIZES:
        smem = _decode_cuda.smem_bytes(d, False, 8, bulk=True)
        assert smem <= 232448
        if d <= 128:
            assert 2 * (smem + 1024) <= 228 * 1024


# ---------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("change,exc,match", [
    (dict(alibi_slopes=np.ones(4)), ValueError, "alibi_slopes must be None"),
    (dict(kv_cache_dtype="int8"), ValueError, "kv_cache_dtype must be one of"),
    (dict(kv_cache_dtype="fp8_e5m2"), NotImplementedError, "fp8_e5m2"),
    (dict(kv_cache_dtype="fp8"), TypeError, "key_cache has dtype float16, but kv_cache_dtype='fp8'"),
    (dict(num_kv_heads=3), ValueError, r"key_cache must have shape \[\*, 3, 8, 16, 8\]"),
    (dict(max_seq_len=30), ValueError, r"seq_lens\[0\] \(37\) must be <= max_seq_len \(30\)"),
    (dict(max_seq_len=0), ValueError, "max_seq_len must be >= 1"),
    (dict(blocksparse_block_size=24), ValueError, r"blocksparse_block_size \(24\) must be a positive multiple of "
                                                  r"the cache block_size \(16\)"),
    (dict(blocksparse_local_blocks=0), ValueError, "blocksparse_local_blocks must be >= 1"),
    (dict(tp_rank=-1), ValueError, "tp_rank must be >= 0"),
    (dict(scale="a"), TypeError, "scale must be a real number"),
    (dict(k_scale=float("nan"), kv_cache_dtype="fp8"), None, None),
    (dict(num_splits=0), ValueError, "num_splits must be >= 1"),
])
def test_argument_errors(rng, change, exc, match):
    case = make_case(rng)
    if exc is None:  # k_scale check is reached only with an fp8 cache: build one
        case = make_case(rng, fp8=True)
        case["k_scale"] = float("nan")
        exc, match = ValueError, "k_scale must be finite"
    else:
        case.update(change)
    with pytest.raises(exc, match=match):
        run(case)


def test_shape_and_dtype_errors(rng):
    case = make_case(rng)
    bad = dict(case, query=case["query"].astype(np.int32))
    with pytest.raises(TypeError, match="query has dtype int32"):
        run(bad)
    bad = dict(case, query=case["query"][:, :, :32])
    with pytest.raises(NotImplementedError, match=r"head_size 32 is not compiled; supported: \[64, 80, 96, 128, 256\]"):
        run(bad)
    bad = dict(case, query=np.concatenate([case["query"]] * 3, axis=1)[:, :3])  # 3 heads, 2 kv heads
    with pytest.raises(ValueError, match=r"num_heads \(3\) must be a multiple of num_kv_heads \(2\)"):
        run(bad)
    with pytest.raises(ValueError, match=r"key_cache must have shape \[\*, 2, 8, 8, 8\], got \[6, 2, 8, 16, 8\]"):
        run(dict(case, value_cache=case["value_cache"][:, :, :, :8]))
    with pytest.raises(ValueError, match=r"value_cache must have shape \[6, 2, 64, 16\], got \[6, 2, 32, 16\]"):
        run(dict(case, value_cache=case["value_cache"][:, :, :32]))
    bad = dict(case, seq_lens=np.array([37, 5]))
    with pytest.raises(ValueError, match=r"seq_lens must have shape \[1\]"):
        run(bad)
    bad = dict(case, block_tables=case["block_tables"][:, :2])
    with pytest.raises(ValueError, match=r"needs 3 cache blocks but block_tables has 2 columns"):
        run(bad)
    bt = case["block_tables"].copy()
    bt[0, 1] = 10_000
    with pytest.raises(ValueError, match=r"block_tables\[0, 1\] \(10000\) must be in \[0, num_blocks = 6\)"):
        run(dict(case, block_tables=bt))
    with pytest.raises(ValueError, match=r"seq_lens\[0\] \(-1\) must be >= 0"):
        run(dict(case, seq_lens=np.array([-1], dtype=np.int32)))
    with pytest.raises(TypeError, match="block_tables must have an integer dtype"):
        run(dict(case, block_tables=case["block_tables"].astype(np.float32)))
    with pytest.raises(ValueError, match=r"out must have shape \[1, 4, 64\]"):
        run(case, out=np.empty((1, 4, 32), dtype=np.float16))
    with pytest.raises(TypeError, match="out has dtype float32"):
        run(case, out=np.empty((1, 4, 64), dtype=np.float32))
    with pytest.raises(ValueError, match=r"cache block_size \(value_cache.shape\[3\] = 4\) must be one of"):
        run(dict(case, value_cache=case["value_cache"][..., :4]))
