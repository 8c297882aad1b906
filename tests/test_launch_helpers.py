"""Host-side launch helpers of the prefill kernels, exercised without a GPU (NumPy stands in for CuPy)."""

import types

import numpy as np

from cubsattn import _prefill_cuda

FAKE_CUPY = types.SimpleNamespace(asarray=np.asarray,
                                  cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0)))


def test_device_schedule_views_and_cache():
    cu_q = np.array([0, 5, 300, 301], dtype=np.int64)
    cu_k = np.array([0, 90, 385, 500], dtype=np.int64)
    num_tiles, tiles, dq, dk = _prefill_cuda._device_schedule(FAKE_CUPY, cu_q, cu_k, 64)
    want = _prefill_cuda.tile_schedule(cu_q, cu_k, 64)
    assert num_tiles == want.shape[0]
    np.testing.assert_array_equal(tiles, want.ravel())
    np.testing.assert_array_equal(dq, cu_q)
    np.testing.assert_array_equal(dk, cu_k)
    again = _prefill_cuda._device_schedule(FAKE_CUPY, cu_q, cu_k, 64)
    assert again[1].base is tiles.base                        # one cached upload, not a new one


def test_positive_scale():
    q = np.ones((2, 1, 8), np.float32)
    strides = [(8, 8), (1, 1)]
    same, s, log2 = _prefill_cuda._positive_scale(q, 0.5, strides)
    assert same is q and s == strides and log2 == np.float32(0.5 * np.log2(np.e))
    assert _prefill_cuda._positive_scale(q, 0.0, strides)[2] == np.float32(1e-30)
