"""Shared fixtures: seeded RNG, GPU skipping, dtype tolerances."""

from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import pytest

import cubsattn

BF16 = np.dtype(ml_dtypes.bfloat16)
FP16 = np.dtype(np.float16)
FP32 = np.dtype(np.float32)

#: (rtol, atol) against a float64 oracle, per input dtype. bf16 has 8 mantissa bits, fp16 11.
TOLERANCES = {FP32: (1e-5, 1e-5), FP16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)}


def pytest_collection_modifyitems(config, items):
    if cubsattn.gpu_available():
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        if n >= 2:
            return
        skip = pytest.mark.skip(reason=f"needs >= 2 CUDA devices, found {n}")
        for item in items:
            if "multi_gpu" in item.keywords:
                item.add_marker(skip)
        return
    skip = pytest.mark.skip(reason="no CUDA device (or CuPy not installed): GPU test skipped")
    for item in items:
        if "gpu" in item.keywords or "multi_gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name, so every test is reproducible on its own and across processes
    (CRC-32, not ``hash``: string hashes change with every interpreter run)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
