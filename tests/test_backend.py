"""Backend end to end on NumPy (and CuPy where a GPU is present): one-shot prefill == chunked prefill == decode,
in batches that mix all three kinds of sequences; metadata slicing; Impl errors."""

import dataclasses
import math

import numpy as np
import pytest

from cubsattn import BlocksparseParams, PagedAttention
from cubsattn.backend import (_DEFERRABLE, BlocksparseFlashAttentionBackend, BlocksparseFlashAttentionImpl,
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


def test_metadata_fields_made_on_first_read():
    """A field a builder deferred is made once, on its first read; other missing names raise AttributeError."""
    made = []
    m = BlocksparseFlashAttentionMetadata.__new__(BlocksparseFlashAttentionMetadata)
    m.__dict__.update(_deferred=(lambda state, name: made.append(name) or state[name], {"seq_lens": [3, 4]}))
    assert m.seq_lens == [3, 4] and m.seq_lens == [3, 4] and made == ["seq_lens"]
    with pytest.raises(AttributeError, match="object has no attribute 'query_start_lok'"):
        m.query_start_lok
    with pytest.raises(AttributeError, match="object has no attribute 'num_prefills'"):   # not deferrable
        BlocksparseFlashAttentionMetadata.__new__(BlocksparseFlashAttentionMetadata).num_prefills


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


def expected_metadata(ref, prefills, decodes, pad_to=None, width=None):
    """What a step's metadata must hold, from a twin allocator driven through the general append (array counts)."""
    handles = [h for h, _ in prefills] + list(decodes)
    counts = np.array([n for _, n in prefills] + [1] * len(decodes), dtype=np.int64)
    context, slots, cow, tables = ref.append_step(np.array(handles, dtype=np.int64), counts, width=width)
    pad = 0 if pad_to is None else pad_to - len(handles)
    seq = np.concatenate([context + counts, np.ones(pad, np.int64)])
    counts = np.concatenate([counts, np.ones(pad, np.int64)])
    P, T = len(prefills), int(counts[:len(prefills)].sum())
    return dict(num_prefills=P, num_prefill_tokens=T, num_decode_tokens=len(seq) - P,
                slot_mapping=np.concatenate([slots, np.full(pad, -1)]), seq_lens=seq.tolist(), seq_lens_tensor=seq,
                max_query_len=int(counts.max()), max_prefill_seq_len=int(seq[:P].max(initial=0)),
                max_decode_seq_len=int(seq[P:].max(initial=0)), query_start_loc=np.concatenate([[0], np.cumsum(counts)]),
                seq_start_loc=np.concatenate([[0], np.cumsum(seq)]),
                context_lens_tensor=np.concatenate([context, np.zeros(pad, np.int64)]),
                block_tables=np.concatenate([tables, np.zeros((pad, tables.shape[1]), np.int64)]),
                use_cuda_graph=pad_to is not None, blocks_to_copy=cow, max_slot=int(slots.max()))


def assert_metadata_equal(m, want):
    for name, value in want.items():
        got = getattr(m, name)
        if isinstance(value, np.ndarray):
            got = got if isinstance(got, np.ndarray) else got.get()
            assert got.dtype == (np.int64 if name in ("slot_mapping", "blocks_to_copy") else np.int32), name
            np.testing.assert_array_equal(got, value, err_msg=name)
        else:
            assert got == value, name


def random_builds(xp, rng, steps=150):
    """Random adds, forks, frees, prefill chunks and decode steps (consecutive or scattered handles, CUDA-graph
    padding, fixed table widths) through a builder; yields each step's metadata and its expected fields."""
    alloc, ref = BlockAllocator(400, 8), BlockAllocator(400, 8)
    builder = BlocksparseMetadataBuilder(alloc, xp=xp)
    live = []
    for _ in range(steps):
        op = rng.integers(10)
        if op == 0 or not live:
            live.append(alloc.add_sequence())
            ref.add_sequence()
            continue
        if op == 1:
            parent = live[rng.integers(len(live))]
            live.append(alloc.fork(parent))
            ref.fork(parent)
            continue
        if op in (2, 3) and len(live) > 2:
            h = live.pop(rng.integers(len(live)))
            alloc.free(h)
            ref.free(h)
            continue
        chosen = [live[i] for i in rng.permutation(len(live))[:rng.integers(1, len(live) + 1)]]
        if op == 4:
            prefills = [(h, int(rng.integers(1, 30))) for h in chosen[:2]]
            args = (prefills, chosen[2:])
            kwargs = {}
        else:
            decodes = sorted(chosen) if op % 2 else chosen
            args = ([], decodes)
            kwargs = dict(pad_to=len(decodes) + int(rng.integers(3))) if op == 5 else {}
            if op == 6 and int(ref.seq_lens(decodes).max()) < 60 * 8:
                kwargs["block_table_width"] = 60
        handles = [h for h, _ in args[0]] + list(args[1])
        if alloc.blocks_needed(handles, [n for _, n in args[0]] + [1] * len(args[1])) > alloc.num_free_blocks:
            continue
        yield builder.build(*args, **kwargs), expected_metadata(ref, *args, kwargs.get("pad_to"),
                                                                kwargs.get("block_table_width"))


def test_builder_fields_over_random_schedules(rng):
    for m, want in random_builds(np, rng):
        assert_metadata_equal(m, want)


@pytest.mark.gpu
def test_cupy_builder_fields_over_random_schedules(rng):
    """Device metadata equals the expected fields, checked after all steps were built: more steps than staging
    buffers, so a reused pinned buffer must not have changed an earlier step's arrays."""
    cupy = pytest.importorskip("cupy")
    from cubsattn.metadata_builder import MAX_STAGING_BUFFERS

    steps = list(random_builds(cupy, rng, steps=250))
    assert len(steps) > MAX_STAGING_BUFFERS
    cupy.cuda.get_current_stream().synchronize()
    fields = {f.name for f in dataclasses.fields(BlocksparseFlashAttentionMetadata)}
    for i, (m, want) in enumerate(steps):
        assert isinstance(m.block_tables, cupy.ndarray) and isinstance(m.blocks_to_copy, np.ndarray)
        assert fields <= set(vars(m)) | _DEFERRABLE    # every field is set or made on first read
        assert_metadata_equal(dataclasses.replace(m) if i % 2 else m, want)


@pytest.mark.gpu
def test_dropped_builder_keeps_its_pending_staging_buffer():
    """A builder dropped while its last copy waits behind GPU work keeps that page-locked buffer out of CuPy's pinned
    pool until the copy is done: a same-sized pinned buffer taken and written right after it must not change the
    step's metadata."""
    cupy = pytest.importorskip("cupy")
    import cupyx

    alloc, ref = BlockAllocator(64, 16), BlockAllocator(64, 16)
    handles = [alloc.add_sequence() for _ in range(5)]
    assert [ref.add_sequence() for _ in range(5)] == handles
    for a in (alloc, ref):
        a.append_tokens(handles, [20, 35, 50, 65, 80])
    busy = cupy.ones((4096, 4096), dtype=np.float32)
    for _ in range(8):                                  # tens of milliseconds of queued GPU work
        busy = busy @ busy
    m = BlocksparseMetadataBuilder(alloc, xp=cupy).build([], handles)     # the builder is gone at once
    scribble = cupyx.empty_pinned(1 << 15, dtype=np.int32)                # the ring's smallest buffer size
    scribble[...] = -7
    assert_metadata_equal(m, expected_metadata(ref, [], handles))


def _decode_setup(cupy, rng, kv_cache_dtype, num_seqs=5):
    shape = PagedAttention.get_kv_cache_shape(64, 16, HKV, D)
    host = (rng.standard_normal(shape).astype(BF16) if kv_cache_dtype == "auto"
            else rng.integers(0, 120, shape).astype(np.uint8))
    alloc = BlockAllocator(64, 16)
    handles = [alloc.add_sequence() for _ in range(num_seqs)]
    alloc.append_tokens(handles, rng.integers(20, 150, num_seqs))
    return host, alloc, handles, BlocksparseMetadataBuilder(alloc, xp=cupy)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_planned_decode_equals_checked_path(rng, monkeypatch, kv_cache_dtype):
    """Repeated decode steps take the planned path (no checks, no write_to_paged_cache call) and give the same
    output and cache, bit for bit, as a fresh layer's checked path; a new cache or new scales are honoured, and
    wider block tables are a new signature (checked again)."""
    cupy = pytest.importorskip("cupy")
    from cubsattn import kv_cache as kvc

    calls = []
    checked_write = kvc.write_to_paged_cache
    monkeypatch.setattr(kvc, "write_to_paged_cache", lambda *a, **k: calls.append(1) or checked_write(*a, **k))
    host, alloc, handles, builder = _decode_setup(cupy, rng, kv_cache_dtype)
    impl = BlocksparseFlashAttentionImpl(H, D, 1 / D, HKV, None, None, kv_cache_dtype, PARAMS)
    caches = [cupy.asarray(host), cupy.asarray(host)]
    # The table width is given: the default one (the batch's largest block count) grows whenever the longest of the
    # random lengths crosses a block boundary, which is a new signature. With it left to default, a boundary crossed
    # at step 1, 3 or 4 (about one seed in six) sent that step through the checks: the intermittent failure of this
    # test (the rng fixture's seed hashes the test id, and str hashes differ between processes).
    for step, (scales, cache_index, width) in enumerate([((1.0, 1.0), 0, 12), ((1.0, 1.0), 0, 12),
                                                          ((0.5, 0.25), 0, 12), ((0.5, 0.25), 1, 12),
                                                          ((0.5, 0.25), 1, 12), ((0.5, 0.25), 1, 13)]):
        m = builder.build([], handles, block_table_width=width)
        q = cupy.asarray(rng.standard_normal((len(handles), H * D)).astype(BF16))
        k, v = (cupy.asarray(rng.standard_normal((len(handles), HKV * D)).astype(BF16)) for _ in range(2))
        cache = caches[cache_index]
        reference = cache.copy()
        fresh = BlocksparseFlashAttentionImpl(H, D, 1 / D, HKV, None, None, kv_cache_dtype, PARAMS)
        want = fresh.forward(q, k, v, reference, m, *scales)
        before = len(calls)
        out = cupy.full((len(handles), H * D), np.nan, dtype=BF16)
        got = impl.forward(q, k, v, cache, m, *scales, output=out)
        planned = len(calls) == before
        # The first step, the first one with new scales and the one with wider tables (new signatures) go through
        # the checks; a new cache of the same shape does not need them.
        assert planned == (step in (1, 3, 4)), step
        assert got is out
        np.testing.assert_array_equal(got.get().view(np.uint16), want.get().view(np.uint16))
        np.testing.assert_array_equal(cache.get().view(np.uint8), reference.get().view(np.uint8))


@pytest.mark.gpu
def test_planned_decode_lets_go_of_a_dropped_cache(rng):
    """The planned path keeps the cache's two halves as arrays while the same cache comes back, and drops them with
    the cache (they would keep its memory allocated)."""
    cupy = pytest.importorskip("cupy")
    host, alloc, handles, builder = _decode_setup(cupy, rng, "auto")
    impl = BlocksparseFlashAttentionImpl(H, D, 1 / D, HKV, None, None, "auto", PARAMS)
    cache = cupy.asarray(host)
    q = cupy.asarray(rng.standard_normal((len(handles), H * D)).astype(BF16))
    kv = cupy.asarray(rng.standard_normal((len(handles), HKV * D)).astype(BF16))
    for _ in range(3):
        impl.forward(q, kv, kv, cache, builder.build([], handles, block_table_width=12))
    assert len(impl._cache_views) == 4 and impl._cache_views[2].data.ptr == cache.data.ptr
    del cache
    assert impl._cache_views == []


@pytest.mark.gpu
def test_planned_decode_keeps_user_facing_checks(rng):
    cupy = pytest.importorskip("cupy")
    host, alloc, handles, builder = _decode_setup(cupy, rng, "auto")
    impl = BlocksparseFlashAttentionImpl(H, D, 1 / D, HKV, None, None, "auto", PARAMS)
    cache = cupy.asarray(host)
    n = len(handles)
    q = cupy.asarray(rng.standard_normal((n, H * D)).astype(BF16))
    kv = cupy.asarray(rng.standard_normal((n, HKV * D)).astype(BF16))
    m = builder.build([], handles)
    impl.forward(q, kv, kv, cache, m)
    impl.forward(q, kv, kv, cache, m)                   # planned from now on
    assert impl._plans
    with pytest.raises(ValueError, match="slot_mapping has slot 1024 but the cache has 1024 slots"):
        impl.forward(q, kv, kv, cache, dataclasses.replace(m, max_slot=1024))
    bad = cupy.asarray(np.full(n, 5000, dtype=np.int64))     # hand-made metadata without max_slot: slots read back
    with pytest.raises(ValueError, match=r"slot_mapping\[0\] \(5000\) is out of range"):
        impl.forward(q, kv, kv, cache, dataclasses.replace(m, slot_mapping=bad, max_slot=None))
    with pytest.raises(TypeError, match="output dtype"):
        impl.forward(q, kv, kv, cache, m, output=cupy.empty((n, H * D), dtype=np.float16))
    with pytest.raises(ValueError, match="attn_metadata describes"):
        impl.forward(q[:2], kv[:2], kv[:2], cache, m)
    with pytest.raises(TypeError, match="key_cache has dtype float16"):
        impl.forward(q, kv, kv, cache.view(np.float16), m)


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
