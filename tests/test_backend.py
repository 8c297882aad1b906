"""Backend end to end on NumPy (and CuPy where a GPU is present): one-shot prefill == chunked prefill == decode,
in batches that mix all three kinds of sequences; metadata slicing; Impl errors."""

import dataclasses
import math

import numpy as np
import pytest

from cubsattn import BlocksparseParams, PagedAttention
from cubsattn.backend import (BlocksparseFlashAttentionBackend, BlocksparseFlashAttentionImpl,
                              BlocksparseFlashAttentionMetadata)
from cubsattn.block_manager import BlockAllocator
from cubsattn.metadata_builder import BlocksparseMetadataBuilder
from conftest import BF16, FP16, TOLERANCES
from oracle import masked_attention, rule_mask

H, HKV, D = 4, 2, 64
PARAMS = BlocksparseParams(max_seqlen=512, num_heads=H, num_kv_heads=HKV, block_size=16, local_blocks=2,
                           vert_stride=3)


def run_schedule(xp, dtype, rng, plans, *, cache_block=16, num_blocks=64, kv_cache_dtype="auto"):
    """Drive the Impl through a schedule. ``plans``: per sequence a list of chunk sizes (1 = decode step once the
    prompt is in). Returns per-sequence q/k/v and the outputs gathered per position."""
    impl = BlocksparseFlashAttentionImpl(H, D, 1 / D, HKV, None, None, kv_cache_dtype, PARAMS)
    cache_dtype = np.uint8 if kv_cache_dtype != "auto" else dtype
    kv_cache = xp.asarray(np.zeros(PagedAttention.get_kv_cache_shape(num_blocks, cache_block, HKV, D), cache_dtype))
    alloc = BlockAllocator(num_blocks, cache_block)
    builder = BlocksparseMetadataBuilder(alloc, xp=xp)
    seqs = []
    for chunks in plans:
        n = sum(chunks)
        seqs.append(dict(q=rng.standard_normal((n, H, D)).astype(dtype),
                         k=rng.standard_normal((n, HKV, D)).astype(dtype),
                         v=rng.standard_normal((n, HKV, D)).astype(dtype),
                         out=np.full((n, H, D), np.nan, np.float32), done=0, chunks=list(chunks),
                         handle=alloc.add_sequence()))
    while any(s["chunks"] for s in seqs):
        # The first chunk is always a prefill; later chunks of size 1 are decodes, bigger ones prefill chunks.
        prefills = [s for s in seqs if s["chunks"] and (s["done"] == 0 or s["chunks"][0] > 1)]
        decodes = [s for s in seqs if s["chunks"] and all(s is not p for p in prefills)]
        order = prefills + decodes
        m = builder.build([(s["handle"], s["chunks"][0]) for s in prefills], [s["handle"] for s in decodes])
        sl = [slice(s["done"], s["done"] + s["chunks"][0]) for s in order]
        q = np.concatenate([s["q"][x] for s, x in zip(order, sl)]).reshape(-1, H * D)
        k = np.concatenate([s["k"][x] for s, x in zip(order, sl)]).reshape(-1, HKV * D)
        v = np.concatenate([s["v"][x] for s, x in zip(order, sl)]).reshape(-1, HKV * D)
        out = impl.forward(xp.asarray(q), xp.asarray(k), xp.asarray(v), kv_cache, m)
        out = (out if xp is np else out.get()).astype(np.float32).reshape(-1, H, D)
        row = 0
        for s, x in zip(order, sl):
            n = x.stop - x.start
            s["out"][x] = out[row:row + n]
            row += n
            s["done"] += n
            s["chunks"].pop(0)
    return seqs


def oracle_of(seq):
    n = seq["q"].shape[0]
    mask = rule_mask(H, HKV, PARAMS.num_blocks, PARAMS.local_blocks, PARAMS.vert_stride, PARAMS.head_sliding_step)
    cu = np.array([0, n])
    return masked_attention(seq["q"], seq["k"], seq["v"], cu, cu, mask, PARAMS.block_size, 1 / D)


PLANS = [
    [70],                       # one prefill
    [33, 40, 17],               # prefill of a prefix, then two chunked prefills
    [20] + [1] * 15,            # prefill of a prefix, then token-by-token decode
    [5, 1, 1, 30, 1],           # decode steps between chunks
]


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_numpy_backend_schedules_match_oracle(dtype, rng):
    for seq in run_schedule(np, dtype, rng, PLANS):
        rtol, atol = TOLERANCES[dtype]
        np.testing.assert_allclose(seq["out"], oracle_of(seq), rtol=rtol, atol=atol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [FP16, BF16], ids=["fp16", "bf16"])
def test_cupy_backend_schedules_match_oracle(dtype, rng):
    cupy = pytest.importorskip("cupy")
    for seq in run_schedule(cupy, dtype, rng, PLANS):
        rtol, atol = TOLERANCES[dtype]
        np.testing.assert_allclose(seq["out"], oracle_of(seq), rtol=rtol, atol=atol)


def test_metadata_views():
    alloc = BlockAllocator(32, 16)
    a, b, c = (alloc.add_sequence() for _ in range(3))
    builder = BlocksparseMetadataBuilder(alloc)
    builder.build([(a, 10), (b, 3)], [])
    m = builder.build([(a, 7)], [b])
    assert (m.num_prefills, m.num_prefill_tokens, m.num_decode_tokens) == (1, 7, 1)
    p, d = m.prefill_metadata, m.decode_metadata
    table = m.block_tables[0]
    assert p.slot_mapping.tolist() == [table[pos // 16] * 16 + pos % 16 for pos in range(10, 17)]
    assert p.num_decode_tokens == 0
    assert p.query_start_loc.tolist() == [0, 7] and p.seq_start_loc.tolist() == [0, 17]
    assert p.context_lens_tensor.tolist() == [10]
    assert d.slot_mapping.tolist() == [m.block_tables[1, 0] * 16 + 3] and d.seq_lens_tensor.tolist() == [4]
    assert d.query_start_loc is None and d.num_prefills == 0
    assert m.prefill_metadata is p                      # cached


def test_decode_only_and_prefill_only_views_are_none():
    alloc = BlockAllocator(8, 16)
    a = alloc.add_sequence()
    builder = BlocksparseMetadataBuilder(alloc)
    assert builder.build([(a, 4)], []).decode_metadata is None
    assert builder.build([], [a]).prefill_metadata is None


def test_cuda_graph_padding():
    alloc = BlockAllocator(8, 16)
    a = alloc.add_sequence()
    builder = BlocksparseMetadataBuilder(alloc)
    builder.build([(a, 4)], [])
    m = builder.build([], [a], pad_to=4, block_table_width=8)
    assert m.slot_mapping.tolist() == [4, -1, -1, -1] and m.seq_lens_tensor.tolist() == [5, 1, 1, 1]
    assert m.block_tables.shape == (4, 8) and m.use_cuda_graph
    with pytest.raises(ValueError, match="pad_to .* decode-only"):
        builder.build([(a, 2)], [], pad_to=4)


def test_backend_static_api():
    B = BlocksparseFlashAttentionBackend
    assert B.get_name() == "BLOCK_SPARSE_FLASH_ATTN"
    assert B.get_impl_cls() is BlocksparseFlashAttentionImpl
    assert B.get_metadata_cls() is BlocksparseFlashAttentionMetadata
    assert B.get_builder_cls() is BlocksparseMetadataBuilder
    assert B.get_kv_cache_shape(10, 16, 8, 128) == (2, 10, 16 * 8 * 128)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(alibi_slopes=[1.0]), ValueError, "alibi_slopes are not supported"),
    (dict(sliding_window=128), ValueError, "sliding_window is not supported"),
    (dict(logits_soft_cap=30.0), ValueError, "logits_soft_cap is not supported"),
    (dict(attn_type="encoder"), NotImplementedError, "attn_type 'encoder' is not supported"),
    (dict(kv_cache_dtype="int8"), ValueError, "kv_cache_dtype must be one of"),
    (dict(head_size=72), ValueError, "head_size 72 is not supported"),
    (dict(num_heads=8), ValueError, "blocksparse_params has num_heads=4, num_kv_heads=2 but the layer has "
                                    "num_heads=8"),
    (dict(blocksparse_params=None), TypeError, "blocksparse_params must be BlocksparseParams or a dict"),
])
def test_impl_errors(kwargs, exc, match):
    args = dict(num_heads=H, head_size=D, scale=None, num_kv_heads=HKV, alibi_slopes=None, sliding_window=None,
                kv_cache_dtype="auto", blocksparse_params=PARAMS)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        BlocksparseFlashAttentionImpl(**args)


def test_impl_accepts_vllm_dict():
    d = dict(max_seqlen=512, block_size=16, local_blocks=2, vert_stride=3, homo_head=False)
    impl = BlocksparseFlashAttentionImpl(H, D, None, HKV, None, None, "auto", d)
    assert impl.params.num_heads == H and impl.scale == pytest.approx(1 / math.sqrt(D))


def test_forward_rejects_slots_beyond_the_cache(rng):
    impl = BlocksparseFlashAttentionImpl(H, D, None, HKV, None, None, "auto", PARAMS)
    alloc = BlockAllocator(8, 16)                       # the allocator knows 8 blocks ...
    kv_cache = np.zeros(PagedAttention.get_kv_cache_shape(2, 16, HKV, D), np.float16)   # ... the cache has 2
    a = alloc.add_sequence()
    m = BlocksparseMetadataBuilder(alloc).build([(a, 40)], [])
    assert m.max_slot == 39
    q = rng.standard_normal((40, H * D)).astype(np.float16)
    kv = rng.standard_normal((40, HKV * D)).astype(np.float16)
    with pytest.raises(ValueError, match="slot_mapping has slot 39 but the cache has 32 slots"):
        impl.forward(q, kv, kv, kv_cache, m)


def test_graph_runner_buckets():
    from cubsattn.cuda_graph import DecodeGraphRunner

    runner = DecodeGraphRunner(lambda a: a, buckets=(8, 1, 4))
    assert runner.buckets == (1, 4, 8) and runner.bucket_for(3) == 4 and runner.bucket_for(8) == 8
    with pytest.raises(ValueError, match=r"batch 9 exceeds the largest CUDA-graph bucket \(8\)"):
        runner.bucket_for(9)
    with pytest.raises(ValueError, match="bucket 4 is not captured yet"):
        runner.replay(4)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_graph_replay_equals_eager(rng, kv_cache_dtype):
    cupy = pytest.importorskip("cupy")
    from cubsattn.cuda_graph import DecodeGraphRunner

    impl = BlocksparseFlashAttentionImpl(H, D, 1 / D, HKV, None, None, kv_cache_dtype, PARAMS)
    shape = PagedAttention.get_kv_cache_shape(64, 16, HKV, D)
    cache_host = rng.standard_normal(shape).astype(BF16) if kv_cache_dtype == "auto" else \
        rng.integers(0, 120, shape).astype(np.uint8)
    cache = cupy.asarray(cache_host)                    # captured by the graph: a fixed buffer
    alloc = BlockAllocator(64, 16)
    handles = [alloc.add_sequence() for _ in range(3)]
    alloc.append_tokens(handles, [200, 35, 90])
    builder = BlocksparseMetadataBuilder(alloc, xp=cupy)
    template = builder.build([], handles, pad_to=4, block_table_width=32)

    def step(a):
        m = dataclasses.replace(template, slot_mapping=a["slots"], seq_lens_tensor=a["seq_lens"],
                                block_tables=a["tables"])
        return impl.forward(a["q"], a["k"], a["v"], cache, m, output=a["out"])

    runner = DecodeGraphRunner(step, buckets=(4,))
    for i in range(3):
        m = template if i == 0 else builder.build([], handles, pad_to=4, block_table_width=32)
        q = cupy.asarray(rng.standard_normal((4, H * D)).astype(BF16))
        kv = cupy.asarray(rng.standard_normal((4, HKV * D)).astype(BF16))
        inputs = dict(q=q, k=kv, v=kv, slots=m.slot_mapping, seq_lens=m.seq_lens_tensor, tables=m.block_tables,
                      out=cupy.full((4, H * D), np.nan, dtype=BF16))
        cache[...] = cupy.asarray(cache_host)           # eager and replay start from the same cache
        eager = impl.forward(q, kv, kv, cache, m).copy()
        cache[...] = cupy.asarray(cache_host)
        if i < 2:
            replayed = runner(inputs)                    # copies the inputs into the static buffers
        else:
            static = runner.static_inputs(inputs)        # a serving loop writes straight into these
            for name, a in inputs.items():
                static[name][...] = a
            replayed = runner.replay(4).copy()
        assert runner.captured == (4,)
        np.testing.assert_array_equal(replayed[:3].get().astype(np.float32), eager[:3].get().astype(np.float32))
