"""Block-sparse paged decode benchmark: cubsattn's CUDA kernel against torch SDPA dense decode in the same run.

Phi-3-small per rank (BENCHMARKS.md): 32 q heads, 8 kv heads, head_size 128, bf16 cache, cache block 16, sparse block
64, local 16, vert 8, step 1, scale 1/128; physical cache blocks shuffled. Effective bandwidth = the K/V bytes the
sparse rule must read (per sequence and kv head: the union over its query heads of active cache blocks x block bytes,
K and V) / time. SDPA: one query token on contiguous [S, H, L, D] K/V of the same sizes; bandwidth = all K/V bytes /
time. Times are per Python call (events around each call, host overhead included); "graph" columns replay the
same call captured in a CUDA graph (cubsattn and SDPA alike: GPU time only, as a decode step under graph capture
runs). Also: the sparse time with physical blocks in logical order (contig), cubsattn dense (vert_stride 0) on all
bytes, fp8 cache on its (halved) needed bytes, and a split sweep (the heuristic's neighbours, or --sweep's counts).
With --baseline DIR[,DIR...] (checkouts of earlier commits or variants, e.g. `git archive` snapshots), each one's
cuda_src/decode.cu is compiled too and launched through the current launch plans (its DecodeParams and shared-memory
carve-up must match; split counts its block list cannot hold are left out), alternating with the current kernels on
the same inputs: graph-replay ms of all, in one process.
Every cache is far larger than L2. Times: median of CUDA-event-timed runs after warm-up. torch only here.

    python benchmarks/bench_decode.py [--configs 64x8k,16x32k,256x2k,1x128k] [--no-peers] [--no-sweep]
                                      [--sweep 4,5,6,8] [--baseline DIR[,DIR...]]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from _timing import time_cuda

CONFIGS = {"64x8k": (64, 8192), "16x32k": (16, 32768), "256x2k": (256, 2048), "1x128k": (1, 131072)}
HEADS, KV_HEADS, D, CACHE_BS, BLOCK, LOCAL, VERT, STEP = 32, 8, 128, 16, 64, 16, 8, 1


def time_graph(fn, *, repeat=40):
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph: GPU time without host overhead."""
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        fn()  # compiles, caches plans and workspaces outside the capture
        stream.begin_capture()
        fn()
        graph = stream.end_capture()
        for _ in range(3):
            graph.launch(stream)
        times = []
        for _ in range(repeat):
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            stop.record(stream)
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def time_torch(torch, fn, *, graph, repeat=40):
    """Median milliseconds of ``fn()`` (or of one replay of it captured in a torch CUDA graph) between events."""
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        call = g.replay
    else:
        call = fn
    for _ in range(5):
        call()
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def random_fp8(rs, shape):
    """Random E4M3 bytes of moderate magnitude (exponent field < 14, so no NaN) with random signs."""
    import cupy

    bits = rs.randint(0, 0x70, size=shape, dtype=np.int32) | (rs.randint(0, 2, size=shape, dtype=np.int32) << 7)
    return bits.astype(cupy.uint8)


def needed_blocks(seq_len: int) -> int:
    """Cache blocks the rule needs for one sequence, summed over kv heads (union over each group's q heads)."""
    from cubsattn.layout import _rule, stripe_offsets

    group = HEADS // KV_HEADS
    j = np.arange(-(-seq_len // CACHE_BS))
    offsets = stripe_offsets((0, HEADS), STEP, HEADS)
    active = _rule((seq_len - 1) // BLOCK, (j * CACHE_BS // BLOCK)[None, :], offsets[:, None], LOCAL, VERT)
    return int(active.reshape(KV_HEADS, group, -1).any(axis=1).sum())


def baseline_module(root):
    """``(module, block-list capacity)``: ``root``/cuda_src/decode.cu compiled as the library compiles its own (same
    options), with the instantiations this benchmark launches on this device (bf16, D 128: the 16-bit kernel the
    library picks and the fp8 one)."""
    import re
    from pathlib import Path

    import cupy

    from cubsattn import _decode_cuda, _kernels
    from cubsattn._checks import BFLOAT16

    src = Path(root) / "cuda_src"
    text = (src / "decode.cu").read_text()
    options = ("--std=c++17", f"-I{src}", *(f"-I{d}" for d in _kernels.cuda_include_dirs()),
               *_decode_cuda.SOURCE.extra_options)
    ctype, width = _kernels.ctype(BFLOAT16), _decode_cuda.group_width(HEADS // KV_HEADS)
    bulk = int(cupy.cuda.Device().compute_capability) >= _decode_cuda.BULK_MIN_CC
    names = [_decode_cuda._kernel_name(ctype, D, False, width, bulk), _decode_cuda._kernel_name(ctype, D, True, width,
                                                                                                False)]
    capacity = int(re.search(r"kMaxSplitBlocks = (\d+);", text).group(1))
    return cupy.RawModule(code=text, options=options, name_expressions=names), capacity


def ab_graph_ms(baselines, arrays, *, fp8, splits, sparse):
    """Graph-replay ms of the current kernel and of each baseline's (``{label: (module, capacity)}``), twice each,
    alternating: one launch plan (the current launcher's; a baseline gets the shared memory of a full list of its
    kMaxSplitBlocks entries), so only the kernel differs. A baseline whose list cannot hold a split of this plan is
    left out."""
    import cupy

    from cubsattn import _decode_cuda, _kernels

    query, kc, vc, bt, sl, out = arrays
    ctx = int(bt.shape[1]) * CACHE_BS
    rule = dict(local_blocks=LOCAL, vert_stride=VERT, sparse_block=BLOCK) if sparse else dict(
        local_blocks=0, vert_stride=0, sparse_block=1)
    plan = _decode_cuda.plan_of(query, kc, bt, max_seq_len=ctx, context_len=ctx, fp8=fp8, scale=1 / D, k_scale=1.0,
                                v_scale=1.0, tp_rank=0, sliding_step=STEP, num_splits=splits, **rule)
    chunk = int(plan[4]["chunk_blocks"])
    bulk = not fp8 and int(cupy.cuda.Device().compute_capability) >= _decode_cuda.BULK_MIN_CC
    width = _decode_cuda.group_width(HEADS // KV_HEADS)
    name = _decode_cuda._kernel_name(_kernels.ctype(query.dtype), D, fp8, width, bulk)
    plans = {"new": plan}
    for label, (module, capacity) in baselines.items():
        if chunk <= capacity:  # its list: `capacity` entries, whatever the split length
            base = module.get_function(name)
            smem = _decode_cuda.smem_bytes(D, fp8, width, bulk, chunk_blocks=capacity)
            base.max_dynamic_shared_size_bytes = smem
            plans[label] = (base, *plan[1:3], smem, *plan[4:])
    times = {key: [] for key in plans}
    for _ in range(2):
        for key, p in plans.items():
            times[key].append(time_graph(lambda: _decode_cuda.launch_plan(p, query, kc, vc, bt, sl, out)))
    return times


def run(args):
    import cupy

    from cubsattn import _decode_cuda, _kernels
    from cubsattn._checks import BFLOAT16
    from cubsattn.decode import forward_decode

    props = cupy.cuda.runtime.getDeviceProperties(0)
    print(f"device: {props['name'].decode()}  SMs {_kernels.num_sms()}  cupy {cupy.__version__}  dtype bf16  "
          f"heads {HEADS}/{KV_HEADS}  D {D}  cache block {CACHE_BS}  sparse block {BLOCK} local {LOCAL} vert {VERT} "
          f"step {STEP}")
    torch = None
    if not args.no_peers:
        try:
            import torch
            import torch.nn.functional as F
            print(f"torch {torch.__version__}")
        except ImportError:
            print("torch not installed: peers skipped")
    print(f"{'config':>8} {'frac':>5} {'splits':>6} {'sparse ms':>9} {'eff TB/s':>8} {'SDPA ms':>8} {'SDPA TB/s':>9} "
          f"{'ratio':>5} {'graph ms':>8} {'SDPA gr':>8} {'g ratio':>7} {'contig ms':>9} {'dense ms':>8} {'dense TB/s':>10} {'fp8 ms':>7} {'fp8 TB/s':>8}")
    sweeps = []
    ab_rows = []
    baselines = {}
    for root in args.baseline.split(",") if args.baseline else ():
        baselines[root.rstrip("/").split("/")[-1]] = module = baseline_module(root)
        print(f"baseline {root.rstrip('/').split('/')[-1]}: {root}/cuda_src/decode.cu, block list {module[1]} "
              f"(graph ms of two alternating passes per kernel)")
    for name in args.configs.split(","):
        num_seqs, ctx = CONFIGS[name]
        nblk = ctx // CACHE_BS
        num_blocks = num_seqs * nblk
        rs = cupy.random.RandomState(0)
        block_tables = rs.permutation(num_blocks).astype(np.int32).reshape(num_seqs, nblk)
        seq_lens = cupy.full((num_seqs,), ctx, dtype=np.int32)
        query = rs.standard_normal((num_seqs, HEADS, D), dtype=np.float32).astype(BFLOAT16)
        x = 8
        kc = rs.standard_normal((num_blocks, KV_HEADS, D // x, CACHE_BS, x), dtype=np.float32).astype(BFLOAT16)
        vc = rs.standard_normal((num_blocks, KV_HEADS, D, CACHE_BS), dtype=np.float32).astype(BFLOAT16)
        out = cupy.empty_like(query)
        common = (block_tables, seq_lens, ctx)
        sparse_kw = dict(blocksparse_local_blocks=LOCAL, blocksparse_vert_stride=VERT, blocksparse_block_size=BLOCK,
                         blocksparse_head_sliding_step=STEP)

        def call(k, v, dtype="auto", splits=None, sparse=True):
            return lambda: forward_decode(query, k, v, *common, dtype, KV_HEADS, 1 / D, out=out, num_splits=splits,
                                          **(sparse_kw if sparse else {}))

        need_bytes = num_seqs * needed_blocks(ctx) * CACHE_BS * D * 2 * 2
        all_bytes = num_seqs * KV_HEADS * ctx * D * 2 * 2
        splits = _decode_cuda.choose_num_splits(num_seqs, KV_HEADS, ctx, CACHE_BS, _kernels.num_sms())
        t_sparse = time_cuda(call(kc, vc))
        t_graph = time_graph(call(kc, vc))
        # The same with physical blocks in logical order (block table = arange): isolates the cost of scattering.
        common = (cupy.arange(num_blocks, dtype=np.int32).reshape(num_seqs, nblk), seq_lens, ctx)
        t_contig = time_cuda(call(kc, vc))
        common = (block_tables, seq_lens, ctx)
        t_dense = time_cuda(call(kc, vc, sparse=False))
        least = _decode_cuda.min_num_splits(ctx, CACHE_BS)
        counts = [int(c) for c in args.sweep.split(",")] if args.sweep else [
            least, 2 * least, 4 * least, splits // 2, splits, splits * 2, 8 * least, 32 * least, 128 * least]
        counts = sorted({c for c in counts if least <= c <= min(nblk, 1024)})
        if not args.no_sweep:
            for s in counts:
                sweeps.append((name, s, time_cuda(call(kc, vc, splits=s), repeat=15)))
        if baselines:
            arrays = (query, kc, vc, block_tables, seq_lens, out)
            for s in sorted({splits, *counts}):
                ab_rows.append((name, "sparse", s, ab_graph_ms(baselines, arrays, fp8=False, splits=s, sparse=True)))
            ab_rows.append((name, "dense", splits,
                            ab_graph_ms(baselines, arrays, fp8=False, splits=splits, sparse=False)))
        del kc, vc
        cupy.get_default_memory_pool().free_all_blocks()
        k8 = random_fp8(rs, (num_blocks, KV_HEADS, D // 16, CACHE_BS, 16))
        v8 = random_fp8(rs, (num_blocks, KV_HEADS, D, CACHE_BS))
        t_fp8 = time_cuda(call(k8, v8, dtype="fp8"))
        if baselines:
            arrays = (query, k8, v8, block_tables, seq_lens, out)
            for s in sorted({splits, *counts}):
                ab_rows.append((name, "fp8", s, ab_graph_ms(baselines, arrays, fp8=True, splits=s, sparse=True)))
        del k8, v8
        cupy.get_default_memory_pool().free_all_blocks()
        t_sdpa = t_sdpa_graph = float("nan")
        if torch is not None:
            g = torch.Generator(device="cuda").manual_seed(0)
            q_t = torch.randn(num_seqs, HEADS, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
            k_t = torch.randn(num_seqs, KV_HEADS, ctx, D, device="cuda", dtype=torch.bfloat16, generator=g)
            v_t = torch.randn(num_seqs, KV_HEADS, ctx, D, device="cuda", dtype=torch.bfloat16, generator=g)
            sdpa = lambda: F.scaled_dot_product_attention(q_t, k_t, v_t, scale=1 / D, enable_gqa=True)  # noqa: E731
            t_sdpa = time_torch(torch, sdpa, graph=False)
            try:
                t_sdpa_graph = time_torch(torch, sdpa, graph=True)
            except RuntimeError as e:  # report, keep the per-call numbers
                print(f"SDPA graph capture failed: {e}")
            del q_t, k_t, v_t
            torch.cuda.empty_cache()
        eff = need_bytes / t_sparse / 1e9
        sdpa_bw = all_bytes / t_sdpa / 1e9
        graph_ratio = (need_bytes / t_graph) / (all_bytes / t_sdpa_graph)
        print(f"{name:>8} {need_bytes / all_bytes:5.2f} {splits:6d} {t_sparse:9.3f} {eff:8.2f} {t_sdpa:8.3f} "
              f"{sdpa_bw:9.2f} {eff / sdpa_bw:5.2f} {t_graph:8.3f} {t_sdpa_graph:8.3f} {graph_ratio:7.2f} "
              f"{t_contig:9.3f} {t_dense:8.3f} {all_bytes / t_dense / 1e9:10.2f} "
              f"{t_fp8:7.3f} {need_bytes / 2 / t_fp8 / 1e9:8.2f}", flush=True)
        for _, kind, s, t in ab_rows:  # this configuration's baseline comparison, printed now in case a later one fails
            new = statistics.median(t["new"])
            line = " ".join(f" {key} {' '.join(f'{x:.4f}' for x in ts)} (new/{key} {new / statistics.median(ts):.3f})"
                            for key, ts in t.items() if key != "new")
            print(f"    vs baselines, graph ms: {kind:>6} {s:4d} splits  new {' '.join(f'{x:.4f}' for x in t['new'])}"
                  f" {line}", flush=True)
        ab_rows.clear()
        del query, out, block_tables, seq_lens
        cupy.get_default_memory_pool().free_all_blocks()
    if sweeps:
        print("split sweep (sparse bf16): config splits ms")
        for name, s, t in sweeps:
            print(f"  {name:>8} {s:5d} {t:8.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep", help="comma-separated split counts for the sweep (and the baseline comparison)")
    ap.add_argument("--baseline",
                    help="comma-separated checkouts whose decode kernels to compare (label: last path part)")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
