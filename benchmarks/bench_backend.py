"""Backend costs on the GPU: host overhead of one decode step, and CUDA-graph replay vs the kernels' own time.

1. Host overhead: building the metadata of a 256-sequence decode step (allocator + one transfer) and dispatching
   one layer's forward (cache write + decode launch), timed on the host while the GPU runs asynchronously.
2. decode-64x8k (Phi-3-small, bf16, cache block 16): eager forward vs graph replay vs the kernels alone.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import cupy
import ml_dtypes
import numpy as np

from cubsattn import BlocksparseParams, PagedAttention
from cubsattn.backend import BlocksparseFlashAttentionImpl
from cubsattn.block_manager import BlockAllocator
from cubsattn.cuda_graph import DecodeGraphRunner
from cubsattn.metadata_builder import BlocksparseMetadataBuilder

from _timing import time_cuda

BF16 = np.dtype(ml_dtypes.bfloat16)
H, HKV, D, CACHE_BS = 32, 8, 128, 16
PARAMS = BlocksparseParams(max_seqlen=8192, num_heads=H, num_kv_heads=HKV, block_size=64, local_blocks=16,
                           vert_stride=8)


def setup(batch, context, extra_tokens=1):
    """Impl, cache and allocator holding ``batch`` sequences of ``context`` tokens, room for ``extra_tokens`` more."""
    blocks = batch * (-(-(context + extra_tokens) // CACHE_BS)) + 1
    impl = BlocksparseFlashAttentionImpl(H, D, 1 / D, HKV, None, None, "auto", PARAMS)
    rng = np.random.default_rng(0)
    cache = cupy.asarray(rng.standard_normal(PagedAttention.get_kv_cache_shape(blocks, CACHE_BS, HKV, D),
                                             np.float32).astype(BF16))
    alloc = BlockAllocator(blocks, CACHE_BS)
    handles = [alloc.add_sequence() for _ in range(batch)]
    alloc.append_tokens(handles, context)
    builder = BlocksparseMetadataBuilder(alloc, xp=cupy)
    q = cupy.asarray(rng.standard_normal((batch, H * D), np.float32).astype(BF16))
    kv = cupy.asarray(rng.standard_normal((batch, HKV * D), np.float32).astype(BF16))
    return impl, cache, alloc, builder, handles, q, kv


def host_overhead(batch=256, context=2048, steps=200):
    impl, cache, alloc, builder, handles, q, kv = setup(batch, context, steps)
    out = cupy.empty_like(q)
    times_build, times_fwd = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        meta = builder.build([], handles)
        t1 = time.perf_counter()
        impl.forward(q, kv, kv, cache, meta, output=out)
        t2 = time.perf_counter()
        times_build.append(t1 - t0)
        times_fwd.append(t2 - t1)
        if i % 16 == 0:
            cupy.cuda.get_current_stream().synchronize()
    cupy.cuda.get_current_stream().synchronize()
    b, f = np.median(times_build[10:]) * 1e6, np.median(times_fwd[10:]) * 1e6
    if PROFILE:
        import cProfile
        import pstats

        meta = builder.build([], handles)
        cProfile.runctx("for _ in range(100): impl.forward(q, kv, kv, cache, meta, output=out)", globals(),
                        dict(impl=impl, q=q, kv=kv, cache=cache, meta=meta, out=out), "/tmp/forward.prof")
        pstats.Stats("/tmp/forward.prof").sort_stats("tottime").print_stats(15)
    print(f"host overhead, decode step of {batch} sequences: build metadata {b:.0f} us + dispatch one layer "
          f"{f:.0f} us = {b + f:.0f} us (target <= 100 us)")


def graph_replay(batch=64, context=8192 - 1):
    impl, cache, alloc, builder, handles, q, kv = setup(batch, context)
    width = -(-PARAMS.max_seqlen // CACHE_BS)
    meta = builder.build([], handles, pad_to=batch, block_table_width=width)
    out = cupy.empty_like(q)

    def step(a):
        m = dataclasses.replace(meta, slot_mapping=a["slots"], seq_lens_tensor=a["seq_lens"],
                                block_tables=a["tables"])
        return impl.forward(a["q"], a["k"], a["v"], cache, m, output=a["out"])

    inputs = dict(q=q, k=kv, v=kv, slots=meta.slot_mapping, seq_lens=meta.seq_lens_tensor,
                  tables=meta.block_tables, out=out)
    runner = DecodeGraphRunner(step, buckets=(batch,))
    eager = time_cuda(lambda: step(inputs))
    runner.static_inputs(inputs)                        # capture; a serving loop writes its inputs into these
    replay = time_cuda(lambda: runner.replay(batch))
    replay_copy = time_cuda(lambda: runner(inputs))
    from cubsattn import decode as dec

    key_cache, value_cache = PagedAttention.split_kv_cache(cache, HKV, D)
    k3 = kv.reshape(batch, HKV, D)

    def kernels_only():   # the same two launches the step makes: cache write, then decode
        PagedAttention.write_to_paged_cache(k3, k3, key_cache, value_cache, meta.slot_mapping, "auto",
                                            check_slots=False)
        dec.forward_decode(q.reshape(batch, H, D), key_cache, value_cache, meta.block_tables, meta.seq_lens_tensor,
                           PARAMS.max_seqlen, "auto", HKV, 1 / D, None, 1.0, 1.0, 0, PARAMS.local_blocks,
                           PARAMS.vert_stride, PARAMS.block_size, PARAMS.head_sliding_step,
                           out=out.reshape(batch, H, D))

    kernels = time_cuda(kernels_only)
    same = bool(cupy.array_equal(runner(inputs), step(inputs)))
    print(f"decode-64x8k one layer: eager {eager * 1e3:.1f} us, graph replay {replay * 1e3:.1f} us (with input "
          f"copies and output copy {replay_copy * 1e3:.1f} us), kernels alone (cache write + decode) "
          f"{kernels * 1e3:.1f} us (replay / kernels = {replay / kernels:.3f}); replay == eager: {same}")


PROFILE = "--profile" in sys.argv

if __name__ == "__main__":
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    print(f"device: {name}, CuPy {cupy.__version__}, bf16")
    host_overhead()
    graph_replay()
