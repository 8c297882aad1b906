"""Command line: ``python -m cubsattn demo | info | bench``."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _device_choice(requested: str):
    """(array module, label) for ``--device auto|cpu|gpu``."""
    from . import gpu_available

    if requested == "cpu" or (requested == "auto" and not gpu_available()):
        return np, "cpu (NumPy backend)"
    if not gpu_available():
        raise SystemExit("--device gpu: no CUDA device or CuPy found (see `python -m cubsattn info`)")
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    return cupy, f"gpu ({name}, CuPy {cupy.__version__})"


def demo(args) -> int:
    """Layout picture and a prefill check against a float64 reference, then a Phi-3-small-shaped stack of layers
    prefilling prompts and decoding through the paged cache (GPU if present, else NumPy at a smaller size)."""
    import ml_dtypes

    from . import BlockSparseLayout, BlocksparseParams, blocksparse_prefill
    from .reference import prefill_reference

    xp, where = _device_choice(args.device)
    # Phi-3-small's pattern (local 16, stride 8, step 1) scaled down so the NumPy backend runs in about a second.
    params = BlocksparseParams(max_seqlen=1024, num_heads=8, num_kv_heads=2, block_size=16, local_blocks=4,
                               vert_stride=4)
    layout = BlockSparseLayout.from_params(params)
    seq_lens = [300, 181, 64]
    print(f"cubsattn demo on {where}")
    print(f"params: {params}")
    print(layout.to_text(heads=[0, 1], max_blocks=20))
    total = sum(seq_lens)
    density = sum(layout.allowed_pairs(n) for n in seq_lens) / sum(params.num_heads * n * (n + 1) // 2
                                                                   for n in seq_lens)
    print(f"\nbatch: {len(seq_lens)} prompts of {seq_lens} tokens; attended (q, k) pairs vs causal: "
          f"{density:.3f} (sparsity {1 - density:.3f})")

    rng = np.random.default_rng(0)
    dtype = np.dtype(ml_dtypes.bfloat16)
    q = rng.standard_normal((total, params.num_heads, 64)).astype(dtype)
    k = rng.standard_normal((total, params.num_kv_heads, 64)).astype(dtype)
    v = rng.standard_normal((total, params.num_kv_heads, 64)).astype(dtype)
    cu = np.concatenate(([0], np.cumsum(seq_lens))).astype(np.int32)
    scale = 1.0 / 64                                  # Phi-3-small uses 1/head_size, not 1/sqrt(head_size)
    qd, kd, vd = (xp.asarray(a) for a in (q, k, v))
    blocksparse_prefill(qd, kd, vd, cu, cu, layout, sm_scale=scale)          # warm-up (compiles on a GPU)
    t = time.perf_counter()
    out = blocksparse_prefill(qd, kd, vd, cu, cu, layout, sm_scale=scale)
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()
        out = out.get()
    elapsed = time.perf_counter() - t
    sparse_ref = prefill_reference(q, k, v, cu, cu, layout, scale)
    dense_ref = prefill_reference(q, k, v, cu, cu, None, scale)
    err = np.abs(out.astype(np.float64) - sparse_ref).max()
    diff = np.abs(sparse_ref - dense_ref).max()
    print(f"prefill [{total}, {params.num_heads}, 64] bf16: {elapsed * 1e3:.1f} ms")
    print(f"max |cubsattn - float64 block-sparse reference| = {err:.2e}  (bf16 rounding ~ 4e-3)")
    print(f"max |block-sparse - dense causal| reference     = {diff:.2e}  (what the sparsity changes)")
    ok = err < 2e-2
    print("check:", "OK" if ok else "FAILED")
    if args.layers_only:
        return 0 if ok else 1

    from .demo import PHI3_SMALL, SMALL, run_demo

    print()
    if xp is np:
        stack_ok = run_demo(SMALL, xp, [200, 130, 64], args.decode_steps or 16)
    else:
        stack_ok = run_demo(PHI3_SMALL, xp, [4096, 2048, 1000, 500], args.decode_steps or 64)
    return 0 if ok and stack_ok else 1


def info(args) -> int:
    """Versions, devices and where kernels come from."""
    import ml_dtypes

    from . import __version__, _kernels, gpu_available

    print(f"cubsattn {__version__}; numpy {np.__version__}; ml_dtypes {ml_dtypes.__version__}; "
          f"python {sys.version.split()[0]}")
    print(f"kernel sources: {_kernels.CUDA_SRC}")
    try:
        import cupy

        print(f"CuPy {cupy.__version__}")
        print(f"CUDA headers for NVRTC: {_kernels.cuda_include_dirs() or 'NOT FOUND'}")
    except ImportError:
        print("CuPy: not installed (NumPy backend only); install with pip install -e '.[cuda12]' or '.[cuda13]'")
        return 0
    if not gpu_available():
        print("GPU: none visible (NumPy backend only)")
        return 0
    import os

    from cupy.cuda import nvrtc, runtime

    print(f"CUDA runtime {runtime.runtimeGetVersion()}, driver {runtime.driverGetVersion()}, "
          f"NVRTC {nvrtc.getVersion()}")
    for i in range(runtime.getDeviceCount()):
        p = runtime.getDeviceProperties(i)
        print(f"device {i}: {p['name'].decode()}, compute capability {p['major']}.{p['minor']}, "
              f"{p['multiProcessorCount']} SMs, {p['totalGlobalMem'] / 2**30:.0f} GiB")
    cache = os.environ.get("CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))
    n = len(os.listdir(cache)) if os.path.isdir(cache) else 0
    print(f"CuPy kernel cache: {cache} ({n} entries)")
    return 0


def bench(args) -> int:
    """Run the benchmark scripts of benchmarks/ one after another, streaming their tables."""
    import subprocess
    from pathlib import Path

    from . import gpu_available

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    scripts = sorted(root.glob("bench_*.py")) if root.is_dir() else []
    if args.only:
        scripts = [s for s in scripts if any(o in s.stem for o in args.only)]
    if not scripts:
        print(f"no benchmark scripts found under {root} (they ship with the source checkout)")
        return 1
    if not gpu_available():
        print("benchmarks need a CUDA device (see `python -m cubsattn info`)")
        return 1
    status = 0
    for i, script in enumerate(scripts, 1):
        print(f"[{i}/{len(scripts)}] {script.name}", flush=True)
        status |= subprocess.run([sys.executable, str(script)], check=False).returncode
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cubsattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a small block-sparse prefill and check it against a float64 reference")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--decode-steps", type=int, default=None, help="tokens to decode per sequence")
    p.add_argument("--layers-only", action="store_true", help="only the layout and prefill check")
    p.set_defaults(func=demo)
    p = sub.add_parser("info", help="print versions, devices and the kernel cache state")
    p.set_defaults(func=info)
    p = sub.add_parser("bench", help="run the benchmark scripts (GPU) and print their tables")
    p.add_argument("only", nargs="*", help="substrings selecting scripts, e.g. prefill decode")
    p.set_defaults(func=bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
