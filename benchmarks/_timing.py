"""GPU timing shared by the benchmark scripts (run as ``python benchmarks/bench_<op>.py``)."""

from __future__ import annotations

import statistics


def time_cuda(fn, *, warmup: int = 5, repeat: int = 40) -> float:
    """Median milliseconds of ``fn()`` between CUDA events on the current stream, after ``warmup`` calls."""
    import cupy

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)
