"""Paged KV cache benchmark: write_to_paged_cache and copy_blocks against a device-to-device copy of the same bytes.

Bandwidth = (bytes read + bytes written) / time. The copy baseline is cudaMemcpy D2D moving the same total (half
read, half written), timed in the same run. Write: 64k tokens x 8 kv heads x 128, cache block 16, slots of a
block-shuffled prefill (each block filled by 16 consecutive tokens, blocks in random order) and fully random slots.
copy_blocks: 10k (src, dst) pairs of one layer, random disjoint blocks. swap_blocks: 2k blocks to pinned host memory
and back. Peer: a PyTorch advanced-indexing scatter of the same write (what a pure-PyTorch backend would do).
Times are medians of CUDA-event-timed runs after warm-up; inputs are several times larger than L2.

    python benchmarks/bench_cache.py [--no-peers]
"""

from __future__ import annotations

import argparse

import cupy
import ml_dtypes
import numpy as np

from cubsattn import kv_cache as kvc

BF16 = np.dtype(ml_dtypes.bfloat16)
TOKENS, KV_HEADS, HEAD, BS = 65536, 8, 128, 16


def gpu_ms(fn, *, warmup=3, repeat=20) -> float:
    for _ in range(warmup):
        fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def copy_ms(nbytes: int) -> float:
    """Median time of a D2D cudaMemcpy of ``nbytes`` (moves 2 * nbytes)."""
    a = cupy.empty(nbytes, dtype=cupy.uint8)
    b = cupy.empty_like(a)
    a[...] = 1
    runtime = cupy.cuda.runtime
    return gpu_ms(lambda: runtime.memcpyAsync(b.data.ptr, a.data.ptr, nbytes, runtime.memcpyDeviceToDevice,
                                              cupy.cuda.get_current_stream().ptr))


def row(name, ms, moved, copy):
    bw = moved / ms / 1e9
    ref = moved / copy / 1e9
    print(f"| {name:48s} | {ms:8.3f} | {bw:8.0f} | {ref:8.0f} | {bw / ref:5.2f} |", flush=True)


def bench_write(peers: bool):
    rng = np.random.default_rng(0)
    nb = TOKENS // BS + 64
    key = cupy.asarray(rng.standard_normal((TOKENS, KV_HEADS, HEAD), np.float32).astype(BF16))
    value = cupy.asarray(rng.standard_normal((TOKENS, KV_HEADS, HEAD), np.float32).astype(BF16))
    perm = rng.permutation(nb)[: TOKENS // BS]
    pos = np.arange(TOKENS)
    layouts = {"prefill (block-shuffled)": perm[pos // BS] * BS + pos % BS,
               "random slots": rng.permutation(nb * BS)[:TOKENS]}
    elems = TOKENS * KV_HEADS * HEAD
    for kv_dtype in ("auto", "fp8"):
        cache_dt = kvc.kv_cache_element_dtype(BF16, kv_dtype)
        kv = cupy.zeros(kvc.get_kv_cache_shape(nb, BS, KV_HEADS, HEAD), dtype=cache_dt)
        kc, vc = kvc.split_kv_cache(kv, KV_HEADS, HEAD)
        moved = 2 * elems * (2 + cache_dt.itemsize)  # K and V: bf16 read + cache element written
        copy = copy_ms(moved // 2)
        for name, slots in layouts.items():
            s = cupy.asarray(slots.astype(np.int64))
            ms = gpu_ms(lambda: kvc.write_to_paged_cache(key, value, kc, vc, s, kv_dtype, 0.5, 0.5,
                                                         check_slots=False))
            row(f"write bf16->{'bf16' if kv_dtype == 'auto' else 'fp8 '} {name}", ms, moved, copy)
        s = cupy.asarray(layouts["prefill (block-shuffled)"].astype(np.int64))
        ms = gpu_ms(lambda: kvc.write_to_paged_cache(key, value, kc, vc, s, kv_dtype, 0.5, 0.5))
        row(f"  same, check_slots=True (host sync)", ms, moved, copy)
        if peers and kv_dtype == "auto":
            torch_scatter(key, value, kc, vc, s, moved, copy)
        del kv, kc, vc


def torch_scatter(key, value, kc, vc, slots, moved, copy):
    try:
        import torch
    except ImportError:
        print("| torch not installed: peer skipped |")
        return
    k, v = torch.from_dlpack(key), torch.from_dlpack(value)
    tkc, tvc, ts = torch.from_dlpack(kc), torch.from_dlpack(vc), torch.from_dlpack(slots)
    blk, off = ts // BS, ts % BS
    x = tkc.shape[-1]

    def scatter():
        tkc[blk, :, :, off, :] = k.view(TOKENS, KV_HEADS, HEAD // x, x)
        tvc[blk, :, :, off] = v

    row("peer: torch index_put scatter (bf16)", gpu_ms(scatter), moved, copy)


def bench_copy_blocks():
    rng = np.random.default_rng(1)
    pairs_n = 10_000
    for dt, name in ((BF16, "bf16"), (np.dtype(np.uint8), "fp8 ")):
        nb = 2 * pairs_n + 16
        kv = cupy.zeros(kvc.get_kv_cache_shape(nb, BS, KV_HEADS, HEAD), dtype=dt)
        perm = rng.permutation(nb)
        pairs = np.stack([perm[:pairs_n], perm[pairs_n: 2 * pairs_n]], axis=1)
        pairs_d = cupy.asarray(pairs)
        moved = 2 * (2 * pairs_n * kv.shape[2] * kv.itemsize)  # K and V blocks, read + written
        copy = copy_ms(moved // 2)
        ms = gpu_ms(lambda: kvc.copy_blocks([kv], pairs))
        row(f"copy_blocks {name} 10k pairs, host mapping", ms, moved, copy)
        ms = gpu_ms(lambda: kvc.copy_blocks([kv], pairs_d))
        row(f"copy_blocks {name} 10k pairs, device mapping (sync)", ms, moved, copy)
        del kv


def bench_swap():
    n = 2048
    shape = kvc.get_kv_cache_shape(n, BS, KV_HEADS, HEAD)
    gpu = cupy.zeros(shape, dtype=BF16)
    host = kvc.empty_host_cache(shape, BF16)
    fwd = np.stack([np.arange(n), np.arange(n)], axis=1)
    scattered = np.stack([np.arange(n), np.random.default_rng(2).permutation(n)], axis=1)
    nbytes = gpu.nbytes
    for name, mapping in (("consecutive (1 run)", fwd), ("scattered (2048 runs)", scattered)):
        d2h = gpu_ms(lambda: kvc.swap_blocks(gpu, host, mapping), repeat=5)
        h2d = gpu_ms(lambda: kvc.swap_blocks(host, gpu, mapping), repeat=5)
        print(f"| swap {name:42s} | D2H {d2h:7.3f} ms = {nbytes / d2h / 1e6:6.1f} GB/s | H2D {h2d:7.3f} ms = "
              f"{nbytes / h2d / 1e6:6.1f} GB/s |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    print(f"device: {props['name'].decode()}; CuPy {cupy.__version__}; model dtype bf16; "
          f"{TOKENS} tokens x {KV_HEADS} kv heads x {HEAD}, cache block {BS}")
    print("| op | ms | GB/s | copy GB/s | ratio |")
    print("|---|---|---|---|---|")
    bench_write(not args.no_peers)
    bench_copy_blocks()
    bench_swap()


if __name__ == "__main__":
    main()
