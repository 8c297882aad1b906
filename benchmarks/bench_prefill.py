"""Block-sparse prefill benchmark: cubsattn's CUDA kernel against torch SDPA (dense causal) and FlexAttention.

Columns "cubsattn" = the sm_80 mma.sync kernel (``blocksparse_prefill(kernel="sm80")``); "sm90" = the Hopper wgmma
kernel (``blocksparse_prefill(kernel="sm90")``, what ``kernel="auto"`` picks on compute capability 9.0 where it
applies); "sm90 host ms" = the host time of that call (argument checks, cached schedule and tensor maps, launch).

Phi-3-small per rank (BENCHMARKS.md): 32 q heads, 8 kv heads, head_size 128, block 64, local 16, vert 8, step 1,
scale 1/128. Useful TF/s = layout.flops / time (4 * D * allowed pairs); SDPA's TF/s counts its dense causal pairs.
Times are medians of CUDA-event-timed runs after warm-up, of each call's GPU work: a 1 GiB buffer is overwritten
before every timed call (kernels and peers alike), so the host launches the call while the GPU is still busy and
every call starts with a cold L2. torch is used only here, with zero-copy DLPack hand-over.

    python benchmarks/bench_prefill.py [--dtype bf16|fp16] [--head-size 128] [--configs 4k,16k,64k] [--no-peers | --no-flex]
    python benchmarks/bench_prefill.py --startup      # first-use compile time and cached import + first call
    python benchmarks/bench_prefill.py --chunked      # paged-K/V chunked prefill vs the contiguous kernel
    python benchmarks/bench_prefill.py --with-host    # time calls from an idle GPU (the pre-session-7 method)
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import _timing

# Prefill calls are long: fewer repeats than the decode benchmark's.
# GPU time of each call (L2 flushed, the host's launch work outside the events) for every kernel and peer alike;
# the sm_90a call's host time is reported beside it. --with-host times from an idle GPU instead.
time_cuda = functools.partial(_timing.time_cuda, warmup=3, repeat=10, gpu_only=True)

CONFIGS = {"4k": (4, 4096), "16k": (1, 16384), "64k": (1, 65536)}
HEADS, KV_HEADS, BLOCK, LOCAL, VERT = 32, 8, 64, 16, 8


def run(args):
    import cupy

    import cubsattn
    from cubsattn import BlockSparseLayout, BlocksparseParams

    from cubsattn import _prefill_cuda, _prefill_sm90

    dtype = cubsattn._checks.BFLOAT16 if args.dtype == "bf16" else np.dtype(np.float16)
    d = args.head_size
    if args.tile is not None:
        tile = tuple(int(x) for x in args.tile.split(","))
        if (d, tile) not in _prefill_cuda.INSTANTIATIONS:
            raise SystemExit(f"tile {tile} is not compiled for head_size {d}: {_prefill_cuda.INSTANTIATIONS}")
        _prefill_cuda.TILES[d] = tile
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print(f"device: {props['name'].decode()}  cupy {cupy.__version__}  dtype {args.dtype}  head_size {d}  "
          f"heads {HEADS}/{KV_HEADS}  block {BLOCK} local {LOCAL} vert {VERT}  tile {_prefill_cuda.TILES[d]}")
    torch = None
    if not args.no_peers:
        try:
            import torch
            print(f"torch {torch.__version__}")
        except ImportError:
            print("torch not installed: peers skipped")
    scale = 1.0 / d
    header = (f"{'config':>8} {'density':>8} {'cubsattn ms':>12} {'useful TF/s':>12} {'SDPA ms':>9} "
              f"{'SDPA TF/s':>10} {'ratio':>6} {'sm90 ms':>9} {'sm90 TF/s':>10} {'sm90 ratio':>10} {'Flex ms':>9} "
              f"{'Flex TF/s':>10} {'sm90 host ms':>12}")
    print(header)
    for name in args.configs.split(","):
        batch, seqlen = CONFIGS[name]
        params = BlocksparseParams(max(8192, seqlen), HEADS, KV_HEADS, BLOCK, LOCAL, VERT)
        layout = BlockSparseLayout.from_params(params)
        tokens = batch * seqlen
        rs = cupy.random.RandomState(0)
        q = rs.standard_normal((tokens, HEADS, d), dtype=np.float32).astype(dtype)
        k = rs.standard_normal((tokens, KV_HEADS, d), dtype=np.float32).astype(dtype)
        v = rs.standard_normal((tokens, KV_HEADS, d), dtype=np.float32).astype(dtype)
        cu = np.arange(batch + 1, dtype=np.int64) * seqlen  # host offsets: no device-to-host copy per call
        out = cupy.empty_like(q)
        useful = batch * layout.flops(seqlen, d)
        ours_ms = time_cuda(lambda: cubsattn.blocksparse_prefill(q, k, v, cu, cu, layout, sm_scale=scale, out=out,
                                                                 kernel="sm80"))
        ours_tf = useful / ours_ms / 1e9
        sm90_ms = sm90_tf = sm90_host = float("nan")
        if _prefill_sm90.supports(q, k, v, layout):
            sm90 = lambda: cubsattn.blocksparse_prefill(q, k, v, cu, cu, layout, sm_scale=scale, out=out,
                                                        kernel="sm90")
            sm90_ms = time_cuda(sm90)
            sm90_host = _timing.host_ms(sm90)
            sm90_tf = useful / sm90_ms / 1e9
        sdpa_ms = sdpa_tf = flex_ms = flex_tf = float("nan")
        flex_note = ""
        if torch is not None:
            sdpa_ms, sdpa_tf = bench_sdpa(torch, q, k, v, batch, seqlen, scale)
            if not args.no_flex:
                flex_ms, flex_note = bench_flex(torch, q, k, v, batch, seqlen, scale)
                flex_tf = useful / flex_ms / 1e9 if flex_ms == flex_ms else float("nan")
        density = layout.density(seqlen)
        print(f"{name:>8} {density:8.3f} {ours_ms:12.3f} {ours_tf:12.1f} {sdpa_ms:9.3f} {sdpa_tf:10.1f} "
              f"{ours_tf / sdpa_tf:6.2f} {sm90_ms:9.3f} {sm90_tf:10.1f} {sm90_tf / sdpa_tf:10.2f} {flex_ms:9.3f} "
              f"{flex_tf:10.1f} {sm90_host:12.3f} {flex_note}", flush=True)
        del q, k, v, out
        cupy.get_default_memory_pool().free_all_blocks()


def bench_sdpa(torch, q, k, v, batch, seqlen, scale):
    """Dense causal SDPA on [B, H, L, D] views of the same arrays; TF/s on its dense causal work."""
    import torch.nn.functional as F

    def view(x):
        t = torch.from_dlpack(x)
        return t.view(batch, seqlen, t.shape[1], t.shape[2]).transpose(1, 2)

    tq, tk, tv = view(q), view(k), view(v)
    ms = time_cuda(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True,
                                                          scale=scale))
    dense = 4 * q.shape[2] * HEADS * batch * seqlen * (seqlen + 1) // 2
    return ms, dense / ms / 1e9


def bench_flex(torch, q, k, v, batch, seqlen, scale):
    """torch.compile'd flex_attention with the same rule as a mask_mod, block mask built with BLOCK_SIZE=128."""
    step = 1  # get_head_sliding_step(32, 8)

    def mask_mod(b, h, q_idx, kv_idx):
        qb, kb = q_idx // BLOCK, kv_idx // BLOCK
        active = (qb - kb < LOCAL) | ((kb + h * step + 1) % VERT == 0)
        return (q_idx >= kv_idx) & active

    def view(x):
        t = torch.from_dlpack(x)
        return t.view(batch, seqlen, t.shape[1], t.shape[2]).transpose(1, 2)

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(mask_mod, None, HEADS, seqlen, seqlen, device="cuda", BLOCK_SIZE=128)
        flex = torch.compile(flex_attention)
        tq, tk, tv = view(q), view(k), view(v)
        ms = time_cuda(lambda: flex(tq, tk, tv, block_mask=block_mask, enable_gqa=True, scale=scale))
        return ms, ""
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan"), "(FlexAttention: out of memory)"
    except Exception as e:  # report any other failure as it happens, keep the row
        torch.cuda.empty_cache()
        return float("nan"), f"(FlexAttention failed: {type(e).__name__}: {str(e).splitlines()[0][:80]})"


def run_chunked(args):
    """Chunked prefill: 4 sequences of CONTEXT cached + NEW new tokens. The paged kernel (cache block 16, shuffled
    block tables; 16-bit and fp8 caches) against the contiguous kernel on the same packed keys (q_len < k_len)."""
    import cupy

    import cubsattn
    from cubsattn import BlockSparseLayout, BlocksparseParams
    from cubsattn._prefill_cuda import prefill_paged

    batch, context, new, cache_block = 4, 3072, 1024, 16
    dtype = cubsattn._checks.BFLOAT16 if args.dtype == "bf16" else np.dtype(np.float16)
    d = args.head_size
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print(f"device: {props['name'].decode()}  cupy {cupy.__version__}  dtype {args.dtype}  head_size {d}  "
          f"heads {HEADS}/{KV_HEADS}  block {BLOCK} local {LOCAL} vert {VERT}  chunked: {batch} x ({context} cached "
          f"+ {new} new), cache block {cache_block}")
    layout = BlockSparseLayout.from_params(BlocksparseParams(8192, HEADS, KV_HEADS, BLOCK, LOCAL, VERT))
    rs = cupy.random.RandomState(0)
    k_len = context + new

    def normal(*shape):
        return rs.standard_normal(shape, dtype=np.float32).astype(dtype)

    q = normal(batch * new, HEADS, d)
    k_all, v_all = normal(batch * k_len, KV_HEADS, d), normal(batch * k_len, KV_HEADS, d)
    # Host metadata (as the backend has it): no device->host synchronisation inside the timed calls.
    cu_q = np.arange(batch + 1, dtype=np.int32) * new
    cu_k = np.arange(batch + 1, dtype=np.int32) * k_len
    rows = np.concatenate([np.arange(s * k_len + context, (s + 1) * k_len) for s in range(batch)])
    k_new, v_new = k_all[rows], v_all[rows]
    used = context // cache_block
    num_blocks = batch * used
    tables = np.random.default_rng(0).permutation(num_blocks).reshape(batch, used).astype(np.int32)
    contexts = np.full((batch,), context, np.int32)
    out = cupy.empty_like(q)
    useful = batch * layout.flops(k_len, d, q_len=new)
    scale = 1.0 / d

    def caches(fp8):
        x = 16 if fp8 else 8
        kc = rs.standard_normal((num_blocks, KV_HEADS, d // x, cache_block, x), dtype=np.float32)
        vc = rs.standard_normal((num_blocks, KV_HEADS, d, cache_block), dtype=np.float32)
        if fp8:  # E4M3 codes of N(0, 1) values
            import ml_dtypes

            codes = np.dtype(ml_dtypes.float8_e4m3fn)
            return (cupy.asarray(kc.get().astype(codes).view(np.uint8)),
                    cupy.asarray(vc.get().astype(codes).view(np.uint8)))
        return kc.astype(dtype), vc.astype(dtype)

    print(f"{'kernel':>28} {'ms':>8} {'useful TF/s':>12}")
    ms = time_cuda(lambda: cubsattn.blocksparse_prefill(q, k_all, v_all, cu_q, cu_k, layout, sm_scale=scale,
                                                        out=out))
    print(f"{'contiguous (packed keys)':>28} {ms:8.3f} {useful / ms / 1e9:12.1f}", flush=True)
    for kind in ("auto", "fp8"):
        key_cache, value_cache = caches(kind == "fp8")
        ms = time_cuda(lambda: prefill_paged(q, k_new, v_new, key_cache, value_cache, tables, cu_q, contexts,
                                             layout, sm_scale=scale, out=out, kv_cache_dtype=kind,
                                             k_scale=1.0, v_scale=1.0))
        print(f"{'paged, ' + kind + ' cache':>28} {ms:8.3f} {useful / ms / 1e9:12.1f}", flush=True)
        del key_cache, value_cache


_STARTUP_CHILD = """
import time
t0 = time.perf_counter()
import cupy, numpy as np, cubsattn
from cubsattn import BlockSparseLayout, BlocksparseParams
lay = BlockSparseLayout.from_params(BlocksparseParams(8192, 32, 8, 64, 16, 8))
q = cupy.ones((256, 32, 128), dtype=cubsattn._checks.BFLOAT16); k = cupy.ones((256, 8, 128), dtype=q.dtype)
cu = cupy.asarray(np.array([0, 256], np.int32))
t1 = time.perf_counter()
cubsattn.blocksparse_prefill(q, k, k, cu, cu, lay)
cupy.cuda.Device().synchronize()
t2 = time.perf_counter()
print(f"{t2 - t0:.2f} {t2 - t1:.2f}")
"""


def startup():
    """First-use compile (empty CuPy kernel cache) and cached import + first call, each in a fresh process."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, CUPY_CACHE_DIR=cache)
        for label in ("cold cache (NVRTC compile)", "warm cache"):
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", _STARTUP_CHILD], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if res.returncode:
                print(res.stderr)
                raise SystemExit(1)
            total, first = res.stdout.split()
            print(f"{label}: import + first call {total} s (first call {first} s); process wall {wall:.2f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--configs", default="4k,16k,64k")
    p.add_argument("--no-peers", action="store_true", help="skip torch SDPA / FlexAttention")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention only (its compile takes a while)")
    p.add_argument("--tile", help="BLOCK_M,WARPS,BLOCK_N: a compiled alternative tile (see _prefill_cuda)")
    p.add_argument("--startup", action="store_true", help="measure compile and cached-start times instead")
    p.add_argument("--chunked", action="store_true", help="paged chunked prefill vs the contiguous kernel instead")
    p.add_argument("--with-host", action="store_true",
                   help="time each call from an idle GPU instead (its host work before the launch inside the events)")
    args = p.parse_args()
    if args.with_host:
        global time_cuda
        time_cuda = functools.partial(_timing.time_cuda, warmup=3, repeat=10)
    if args.startup:
        startup()
    elif args.chunked:
        run_chunked(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
