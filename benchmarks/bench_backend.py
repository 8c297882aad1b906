"""Backend costs on the GPU: host overhead of one decode step, and CUDA-graph replay vs the kernels' own time.

1. Host overhead: building the metadata of a 256-sequence decode step (allocator + one H2D transfer) and dispatching
   one layer's forward (cache write + decode launch), timed on the host while the GPU runs asynchronously.
2. decode-64x8k (Phi-3-small, bf16, cache block 16): eager forward vs graph replay vs the kernels alone.

Options: ``--host-only`` (part 1 only), ``--profile`` (cProfile of the build and the dispatch), ``--ops`` (host cost
of the CuPy calls a step is made of, to see what the total is made of on this machine).
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
    shape = PagedAttention.get_kv_cache_shape(blocks, CACHE_BS, HKV, D)
    # Gigabytes of cache: every block gets the same random contents (generating them all on the host takes minutes).
    cache = cupy.empty(shape, dtype=BF16)
    cache[...] = cupy.asarray(rng.standard_normal(shape[2], np.float32).astype(BF16))
    alloc = BlockAllocator(blocks, CACHE_BS)
    handles = [alloc.add_sequence() for _ in range(batch)]
    alloc.append_tokens(handles, context)
    builder = BlocksparseMetadataBuilder(alloc, xp=cupy)
    q = cupy.asarray(rng.standard_normal((batch, H * D), np.float32).astype(BF16))
    kv = cupy.asarray(rng.standard_normal((batch, HKV * D), np.float32).astype(BF16))
    return impl, cache, alloc, builder, handles, q, kv


def _median_us(times) -> float:
    return float(np.median(times[10:])) * 1e6


def _time_steps(impl, builder, handles, q, kv, cache, out, steps, *, idle=False, new_list=False):
    """Median host us of (build, forward) over ``steps`` decode steps; ``idle``: synchronise before each step (no
    queueing behind earlier steps), else every 16 steps; ``new_list``: pass the handles as a new (equal) list each
    step, made outside the timed part, as a scheduler building its batch anew would."""
    times_build, times_fwd = [], []
    for i in range(steps):
        if idle or i % 16 == 0:
            cupy.cuda.get_current_stream().synchronize()
        batch = list(handles) if new_list else handles
        t0 = time.perf_counter()
        meta = builder.build([], batch)
        t1 = time.perf_counter()
        impl.forward(q, kv, kv, cache, meta, output=out)
        t2 = time.perf_counter()
        times_build.append(t1 - t0)
        times_fwd.append(t2 - t1)
    cupy.cuda.get_current_stream().synchronize()
    return _median_us(times_build), _median_us(times_fwd)


def host_overhead(batch=256, context=2048, steps=200):
    impl, cache, alloc, builder, handles, q, kv = setup(batch, context, 4 * steps + 200)
    out = cupy.empty_like(q)
    b, f = _time_steps(impl, builder, handles, q, kv, cache, out, steps)
    print(f"host overhead, decode step of {batch} sequences: build metadata {b:.0f} us + dispatch one layer "
          f"{f:.0f} us = {b + f:.0f} us (target <= 100 us)")
    b, f = _time_steps(impl, builder, handles, q, kv, cache, out, 100, idle=True)
    print(f"  same, GPU idle at each step start: build {b:.0f} us + dispatch {f:.0f} us = {b + f:.0f} us")
    b, f = _time_steps(impl, builder, handles, q, kv, cache, out, 100, new_list=True)
    print(f"  same, a new (equal) list of handles each step: build {b:.0f} us + dispatch {f:.0f} us = {b + f:.0f} us")
    b, f = _time_steps(impl, builder, np.array(handles), q, kv, cache, out, 100)
    print(f"  same, handles in a NumPy array instead of a list: build {b:.0f} us + dispatch {f:.0f} us = "
          f"{b + f:.0f} us")
    # Builds back to back (no forward between them: warmer caches than a serving loop gives).
    host = BlocksparseMetadataBuilder(alloc)
    times = []
    for _ in range(100):
        t0 = time.perf_counter()
        host.build([], handles)
        times.append(time.perf_counter() - t0)
    print(f"  build with NumPy metadata (host only, no transfer), builds back to back: {_median_us(times):.0f} us")
    if PROFILE:
        import cProfile
        import pstats

        env = dict(impl=impl, q=q, kv=kv, cache=cache, out=out, builder=builder, handles=handles,
                   meta=builder.build([], handles))
        for name, stmt in (("build", "for _ in range(100): builder.build([], handles)"),
                           ("forward", "for _ in range(100): impl.forward(q, kv, kv, cache, meta, output=out)")):
            cupy.cuda.get_current_stream().synchronize()
            cProfile.runctx(stmt, globals(), env, f"/tmp/{name}.prof")
            print(f"--- cProfile: 100 x {name}")
            pstats.Stats(f"/tmp/{name}.prof").sort_stats("tottime").print_stats(12)
        cupy.cuda.get_current_stream().synchronize()
    if OPS:
        host_ops(impl, cache, builder, handles, q, kv, out)


def _per_call_us(fn, n=2000) -> float:
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
        cupy.cuda.get_current_stream().synchronize()
    return best * 1e6


def host_ops(impl, cache, builder, handles, q, kv, out):
    """Host microseconds of the CuPy calls a decode step is made of (best of 5 loops)."""
    from cubsattn import _cache_cuda, _decode_cuda

    a = cupy.empty(40000, dtype=np.int32)
    pinned = cupy.cuda.alloc_pinned_memory(a.nbytes)
    stream = cupy.cuda.get_current_stream()
    event = cupy.cuda.Event(block=False, disable_timing=True)
    meta = builder.build([], handles)
    plan = next(iter(impl._plans.values()))
    key_cache, value_cache = PagedAttention.split_kv_cache(cache, HKV, D)
    k3, q3, o3 = kv.reshape(-1, HKV, D), q.reshape(-1, H, D), out.reshape(-1, H, D)
    rt = cupy.cuda.runtime
    ops = [
        ("slice a[10:300]", lambda: a[10:300]),
        ("reshape a[:36864].reshape(256, 144)", lambda: a[:36864].reshape(256, 144)),
        ("view a[:512].view(int64)", lambda: a[:512].view(np.int64)),
        ("int index cache[0]", lambda: cache[0]),
        ("cupy.ndarray from memptr", lambda: cupy.ndarray((256,), np.int32, a.data + 1024)),
        ("cupy.empty(40000 int32)", lambda: cupy.empty(40000, dtype=np.int32)),
        ("cupy.empty_like(q)", lambda: cupy.empty_like(q)),
        ("getDevice", rt.getDevice),
        ("get_current_stream", cupy.cuda.get_current_stream),
        ("memcpyAsync 147 KB pinned", lambda: rt.memcpyAsync(a.data.ptr, pinned.ptr, 147456,
                                                             rt.memcpyHostToDevice, stream.ptr)),
        ("event.record", lambda: event.record(stream)),
        ("event.done", lambda: event.done),
        ("cupy.asarray(numpy 147 KB)", lambda: cupy.asarray(np.empty(36864, np.int32))),
        ("write launch (stored plan)", lambda: _cache_cuda.launch_write(plan[-2], k3, k3, key_cache, value_cache,
                                                                        meta.slot_mapping)),
        ("decode launch (stored plan)", lambda: _decode_cuda.launch_plan(plan[-1], q3, key_cache, value_cache,
                                                                         meta.block_tables, meta.seq_lens_tensor,
                                                                         o3)),
        ("plan key (_decode_plan_key)", lambda: impl._decode_plan_key(q, kv, kv, cache, meta, 1.0, 1.0, out)),
    ]
    print("--- host cost of single calls (us, best of 5 loops)")
    for name, fn in ops:
        n = 200 if "launch" in name else 2000
        print(f"  {name:40s} {_per_call_us(fn, n):7.2f}")


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
OPS = "--ops" in sys.argv

if __name__ == "__main__":
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    print(f"device: {name}, CuPy {cupy.__version__}, bf16")
    host_overhead()
    if "--host-only" not in sys.argv:
        graph_replay()
