"""Tensor-parallel cubsattn across GPUs with CuPy's NCCL bindings: one process per GPU.

Rank ``r`` of ``N`` owns query heads ``BlocksparseParams(..., tp_rank=r, tp_size=N).active_head_range`` and kv heads
``[r * H_kv/N, (r + 1) * H_kv/N)`` (column-parallel qkv projection), its own paged KV caches and block allocator, and
a row-parallel slice of the output projection; the partial outputs are summed with an NCCL all-reduce after every
layer. Rank 0 also runs the same stack with all heads on its GPU and checks that the results agree.

    python examples/tensor_parallel.py --tp 2

Keep NVLink multicast off where the machine asks for it: ``NCCL_NVLS_ENABLE=0`` (set below if unset).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import time

import numpy as np


def worker(rank: int, world: int, uid, args, results):
    import cupy
    from cupy.cuda import nccl

    from cubsattn.demo import PHI3_SMALL, SMALL, AttentionStack

    cupy.cuda.Device(rank).use()
    comm = nccl.NcclCommunicator(world, uid, rank)
    stream = cupy.cuda.get_current_stream()

    def all_reduce(y):
        # Synchronise the device around the collective: the sum must see y complete, and nothing may read out before
        # NCCL has written it. (A production stack would order one explicit stream for both CuPy and NCCL instead.)
        if y.dtype != np.float32 or not y.flags.c_contiguous:
            raise TypeError(f"all_reduce takes contiguous float32 arrays, got {y.dtype} (contiguous: "
                            f"{y.flags.c_contiguous})")
        out = cupy.empty_like(y)
        cupy.cuda.Device().synchronize()
        comm.allReduce(y.data.ptr, out.data.ptr, y.size, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream.ptr)
        cupy.cuda.Device().synchronize()
        comm.check_async_error()          # NCCL reports transport failures asynchronously
        return out

    # Self-test of the collective before the model: rank r contributes r + 1 everywhere.
    probe = all_reduce(cupy.full((1024, 1024), rank + 1, dtype=np.float32))
    want = world * (world + 1) / 2
    if not bool((probe == want).all()):
        raise RuntimeError(f"rank {rank}: NCCL all-reduce self-test failed: got values "
                           f"{cupy.unique(probe)[:4].tolist()}, want {want}")

    cfg = dataclasses.replace(SMALL if args.small else PHI3_SMALL, homo_head_group=args.homo_head_group)
    rng = np.random.default_rng(0)
    prompts = [rng.standard_normal((n, cfg.hidden_size), np.float32) for n in args.prompts]
    steps = rng.standard_normal((args.decode_steps, len(prompts), cfg.hidden_size), np.float32)
    blocks = len(prompts) * (-(-(max(args.prompts) + args.decode_steps) // cfg.cache_block_size)) + 1

    def run(stack):
        handles = [stack.allocator.add_sequence() for _ in prompts]
        t0 = time.perf_counter()
        meta = stack.builder.build(list(zip(handles, args.prompts)), [])
        stack.forward(cupy.asarray(np.concatenate(prompts)), meta)
        stream.synchronize()
        t1 = time.perf_counter()
        last = None
        for x in steps:
            last = stack.forward(cupy.asarray(x), stack.builder.build([], handles))
        stream.synchronize()
        return last.get(), t1 - t0, time.perf_counter() - t1

    sharded = AttentionStack(cfg, cupy, blocks, tp_rank=rank, tp_size=world, all_reduce=all_reduce)
    run(sharded)                                                       # warm-up: compiles kernels
    sharded = AttentionStack(cfg, cupy, blocks, tp_rank=rank, tp_size=world, all_reduce=all_reduce)
    out, prefill_s, decode_s = run(sharded)
    print(f"rank {rank}/{world}: heads {sharded.impls[0].params.active_head_range}, prefill {prefill_s * 1e3:.1f} ms, "
          f"decode {args.decode_steps} steps {decode_s * 1e3:.1f} ms", flush=True)
    results[rank] = out
    if rank == 0:
        single, p1, d1 = run(AttentionStack(cfg, cupy, blocks))
        print(f"single GPU, all heads: prefill {p1 * 1e3:.1f} ms, decode {d1 * 1e3:.1f} ms", flush=True)
        results["single"] = single


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2, help="number of GPUs / ranks")
    parser.add_argument("--prompts", type=int, nargs="+", default=[2048, 1000, 300])
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--small", action="store_true", help="the small demo shape instead of Phi-3-small's")
    parser.add_argument("--homo-head-group", action="store_true", help="stripes slide per kv head")
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    import cupy
    from cupy.cuda import nccl

    if cupy.cuda.runtime.getDeviceCount() < args.tp:
        print(f"needs {args.tp} GPUs, found {cupy.cuda.runtime.getDeviceCount()}")
        return 1
    uid = nccl.get_unique_id()
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=worker, args=(r, args.tp, uid, args, results)) for r in range(args.tp)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            print("a rank failed")
            return 1
        ranks = [results[r] for r in range(args.tp)]
        single = results["single"]
    agree = all(np.array_equal(r, ranks[0]) for r in ranks)
    err = float(np.abs(ranks[0] - single).max() / np.abs(single).max())
    ok = agree and err < 5e-2
    print(f"ranks agree: {agree}; tensor-parallel vs single GPU: max relative difference {err:.2e} "
          f"({'OK' if ok else 'FAILED'})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
