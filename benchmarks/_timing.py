"""GPU timing shared by the benchmark scripts (run as ``python benchmarks/bench_<op>.py``)."""

from __future__ import annotations

import statistics
import time

#: Bytes of the buffer :func:`time_cuda` overwrites before each timed call when ``gpu_only`` (an L2 flush that also
#: keeps the GPU busy, ~0.3 ms on an H200, while the host launches the call).
FLUSH_BYTES = 1 << 30
_flush = None


def time_cuda(fn, *, warmup: int = 5, repeat: int = 40, gpu_only: bool = False) -> float:
    """Median milliseconds of ``fn()`` between CUDA events on the current stream, after ``warmup`` calls.

    By default each call starts on an idle GPU, so the time includes the host work the call does before its first
    launch. ``gpu_only=True`` overwrites a :data:`FLUSH_BYTES` buffer before each call instead: the host launches
    the call while that runs, so the events bracket the call's GPU work only (and every call starts with a cold L2).
    Use :func:`host_ms` to report the host side separately.
    """
    import cupy

    global _flush
    if gpu_only and _flush is None:
        _flush = cupy.empty(FLUSH_BYTES, dtype=cupy.uint8)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        if gpu_only:
            _flush.fill(1)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def host_ms(fn, *, repeat: int = 20) -> float:
    """Median host milliseconds one ``fn()`` call takes to return (argument checks, caches, launches), measured
    while the GPU still works on the previous calls."""
    import cupy

    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    cupy.cuda.get_current_stream().synchronize()
    return statistics.median(times)
