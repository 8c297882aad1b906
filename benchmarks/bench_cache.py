"""Paged KV cache benchmark: write_to_paged_cache and copy_blocks against a device-to-device copy of the same bytes.

Bandwidth = (bytes read + bytes written) / kernel time; for the write, K and V read from the input (bf16) plus K
and V written to the cache (bf16 or fp8). The copy baseline is cudaMemcpy D2D moving the same total (half read, half
written), timed in the same run. Kernel time: CUDA events around 20 back-to-back launches of the kernel alone
(validated arguments), divided by 20. "API" rows: host wall time per public call including its host validation (and
device->host reads where documented), synchronised after each call. Write: 64k tokens x 8 kv heads x 128, cache
block 16; slots of a block-shuffled prefill (each block filled by 16 consecutive tokens, blocks in random order), of
packed chunked-prefill sequences (random lengths, each starting mid-block) and fully random slots. Decode-sized
writes: 1 to 4096 tokens, each alone in its own cache block (random block, random offset), and as prefill: kernel
time of both write kernels from CUDA events around ONE launch queued behind a 256 MB copy (so the host's launch time
is not in it), median of 50; for 64 and 256 tokens alone also the public call's wall time (the library sends
<= SCATTER_MAX_TOKENS tokens to the per-token kernel). copy_blocks: 10k (src, dst) pairs of one layer, random
disjoint blocks. swap_blocks: 2k blocks to pinned host memory and back. Peer: a PyTorch advanced-indexing scatter of
the same write (what a pure-PyTorch backend would do). Times are medians of CUDA-event-timed runs after warm-up;
inputs are several times larger than L2.

    python benchmarks/bench_cache.py [--no-peers]
"""

from __future__ import annotations

import argparse
import time

import cupy
import ml_dtypes
import numpy as np

from cubsattn import _cache_cuda, _kernels
from cubsattn import kv_cache as kvc

BF16 = np.dtype(ml_dtypes.bfloat16)
TOKENS, KV_HEADS, HEAD, BS = 65536, 8, 128, 16


def gpu_ms(fn, *, warmup=3, repeat=20) -> float:
    """Median over 5 samples of (event time of ``repeat`` back-to-back calls) / repeat, in ms."""
    for _ in range(warmup):
        fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    samples = []
    for _ in range(5):
        start.record()
        for _ in range(repeat):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, stop) / repeat)
    return float(np.median(samples))


def api_ms(fn, *, repeat=20) -> float:
    """Host wall time per call, synchronising after each, in ms."""
    fn()
    cupy.cuda.get_current_stream().synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
        cupy.cuda.get_current_stream().synchronize()
    return (time.perf_counter() - t) / repeat * 1e3


def event_us(fn, *, samples=50) -> float:
    """Median GPU time of one ``fn()`` in us: events around it, queued behind a 256 MB device copy so that the GPU
    does not wait for the host's launch."""
    nbytes = 256 << 20
    a, b = cupy.empty(nbytes, dtype=cupy.uint8), cupy.empty(nbytes, dtype=cupy.uint8)
    runtime, stream = cupy.cuda.runtime, cupy.cuda.get_current_stream()
    fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(samples):
        runtime.memcpyAsync(b.data.ptr, a.data.ptr, nbytes, runtime.memcpyDeviceToDevice, stream.ptr)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3)
    return float(np.median(times))


def copy_ms(nbytes: int) -> float:
    """Time of a D2D cudaMemcpy of ``nbytes`` (moves 2 * nbytes)."""
    a = cupy.empty(nbytes, dtype=cupy.uint8)
    b = cupy.empty_like(a)
    a[...] = 1
    runtime = cupy.cuda.runtime
    return gpu_ms(lambda: runtime.memcpyAsync(b.data.ptr, a.data.ptr, nbytes, runtime.memcpyDeviceToDevice,
                                              cupy.cuda.get_current_stream().ptr))


def row(name, ms, moved, copy):
    bw = moved / ms / 1e6
    ref = moved / copy / 1e6
    print(f"| {name:52s} | {ms:8.3f} | {bw:6.0f} | {ref:6.0f} | {bw / ref:5.2f} |", flush=True)


def bench_write(peers: bool):
    rng = np.random.default_rng(0)
    nb = TOKENS // BS + 512  # room for the packed layout's partly used blocks
    key = cupy.asarray(rng.standard_normal((TOKENS, KV_HEADS, HEAD), np.float32).astype(BF16))
    value = cupy.asarray(rng.standard_normal((TOKENS, KV_HEADS, HEAD), np.float32).astype(BF16))
    perm = rng.permutation(nb)[: TOKENS // BS]
    pos = np.arange(TOKENS)
    layouts = {"prefill (block-shuffled)": perm[pos // BS] * BS + pos % BS,
               "packed chunked prefill": packed_prefill_slots(rng, nb),
               "random slots": rng.permutation(nb * BS)[:TOKENS]}
    elems = TOKENS * KV_HEADS * HEAD
    for kv_dtype in ("auto", "fp8"):
        cache_dt = kvc.kv_cache_element_dtype(BF16, kv_dtype)
        kv = cupy.zeros(kvc.get_kv_cache_shape(nb, BS, KV_HEADS, HEAD), dtype=cache_dt)
        kc, vc = kvc.split_kv_cache(kv, KV_HEADS, HEAD)
        moved = 2 * elems * (2 + cache_dt.itemsize)  # K and V: bf16 read + cache element written
        copy = copy_ms(moved // 2)
        label = "bf16->bf16" if kv_dtype == "auto" else "bf16->fp8"
        for name, slots in layouts.items():
            s = cupy.asarray(slots.astype(np.int64))
            ms = gpu_ms(lambda: _cache_cuda.reshape_and_cache(key, value, kc, vc, s, fp8=kv_dtype == "fp8",
                                                              k_scale=0.5, v_scale=0.5))
            row(f"write {label} {name}", ms, moved, copy)
        s = cupy.asarray(layouts["random slots"].astype(np.int64))
        ms = gpu_ms(lambda: _cache_cuda.launch_tokens(key, value, kc, vc, s, fp8=kv_dtype == "fp8", k_scale=0.5,
                                                      v_scale=0.5))
        row(f"write {label} random slots, per-token kernel", ms, moved, copy)
        s = cupy.asarray(layouts["prefill (block-shuffled)"].astype(np.int64))
        for check in (False, True):
            ms = api_ms(lambda: kvc.write_to_paged_cache(key, value, kc, vc, s, kv_dtype, 0.5, 0.5,
                                                         check_slots=check))
            row(f"  API write_to_paged_cache, check_slots={check}", ms, moved, copy)
        if peers and kv_dtype == "auto":
            torch_scatter(key, value, kc, vc, s, moved, copy)
        del kv, kc, vc


def bench_decode():
    """Decode steps' writes (64 and 256 tokens alone in their blocks), and both kernels over growing token counts."""
    rng = np.random.default_rng(3)
    nb = 8192
    print(f"\n| decode-sized write, {KV_HEADS} kv heads x {HEAD}, cache block {BS} | kernel us (events) | "
          f"public call us, check_slots=False / True |")
    print("|---|---|---|")
    for kv_dtype in ("auto", "fp8"):
        label = "bf16" if kv_dtype == "auto" else "fp8"
        kv = cupy.zeros(kvc.get_kv_cache_shape(nb, BS, KV_HEADS, HEAD), dtype=kvc.kv_cache_element_dtype(BF16,
                                                                                                         kv_dtype))
        kc, vc = kvc.split_kv_cache(kv, KV_HEADS, HEAD)
        fp8 = kv_dtype == "fp8"
        for t in (1, 16, 64, 128, 256, 512, 1024, 2048, 4096):
            key = cupy.asarray(rng.standard_normal((t, KV_HEADS, HEAD), np.float32).astype(BF16))
            value = cupy.asarray(rng.standard_normal((t, KV_HEADS, HEAD), np.float32).astype(BF16))
            blocks = rng.permutation(nb)[:t]
            alone = cupy.asarray(blocks * BS + rng.integers(0, BS, t))
            pos = np.arange(t)
            prefill = cupy.asarray(blocks[pos // BS] * BS + pos % BS)
            for name, s in (("alone in its block", alone), ("prefill", prefill)):
                if t < BS and name == "prefill":
                    continue
                us = {k: event_us(lambda: launch(key, value, kc, vc, s, fp8=fp8, k_scale=0.5, v_scale=0.5))
                      for k, launch in (("tokens", _cache_cuda.launch_tokens), ("tiles", _cache_cuda.launch_tiles))}
                api = ""
                if t in (64, 256) and name.startswith("alone"):
                    def call(check):
                        return lambda: kvc.write_to_paged_cache(key, value, kc, vc, s, kv_dtype, 0.5, 0.5,
                                                                check_slots=check)
                    api = " / ".join(f"{api_ms(call(c), repeat=200) * 1e3:.1f}" for c in (False, True))
                print(f"| {label} {t} tokens, {name}: per-token kernel / tile kernel | {us['tokens']:.1f} / "
                      f"{us['tiles']:.1f} | {api} |", flush=True)
        del kv, kc, vc


def packed_prefill_slots(rng, num_blocks):
    """Sequences of 64..2047 new tokens each after a cached context of 0..15 tokens (chunked prefill): each starts
    mid-block at a random token position, in blocks of its own (shuffled), up to TOKENS tokens in all."""
    perm, slots, used, b = rng.permutation(num_blocks), [], 0, 0
    while used < TOKENS:
        n, ctx = min(int(rng.integers(64, 2048)), TOKENS - used), int(rng.integers(0, BS))
        p = np.arange(ctx, ctx + n)
        table = perm[b: b + -(-(ctx + n) // BS)]
        b += table.size
        slots.append(table[p // BS] * BS + p % BS)
        used += n
    return np.concatenate(slots)


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

    row("  peer: torch index_put scatter, same write", gpu_ms(scatter, repeat=5), moved, copy)


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
        # The kernel alone, on the table _cache_cuda.copy_blocks uploads: [key ptr, value ptr, pairs...].
        table = cupy.asarray(np.concatenate([[kv.data.ptr, kv[1].data.ptr], pairs.reshape(-1)]).astype(np.int64))
        kernel = _kernels.get_function(_cache_cuda.SOURCE.filename, "copy_blocks")
        block_vecs = np.int64(kv.shape[2] * kv.itemsize // 16)
        ms = gpu_ms(lambda: kernel((pairs_n, 2), (256,), (table, np.int32(1), block_vecs)))
        row(f"copy_blocks {name} 10k pairs (kernel)", ms, moved, copy)
        ms = api_ms(lambda: kvc.copy_blocks([kv], pairs))
        row("  API copy_blocks, host mapping", ms, moved, copy)
        ms = api_ms(lambda: kvc.copy_blocks([kv], pairs_d))
        row("  API copy_blocks, device mapping (read back)", ms, moved, copy)
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
        d2h = api_ms(lambda: kvc.swap_blocks(gpu, host, mapping), repeat=3)
        h2d = api_ms(lambda: kvc.swap_blocks(host, gpu, mapping), repeat=3)
        print(f"| swap {name:42s} | D2H {d2h:7.3f} ms = {nbytes / d2h / 1e6:6.1f} GB/s | H2D {h2d:7.3f} ms = "
              f"{nbytes / h2d / 1e6:6.1f} GB/s |", flush=True)


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
    bench_decode()
    bench_copy_blocks()
    bench_swap()


if __name__ == "__main__":
    main()
