"""Tensor maps (TMA descriptors) for the Hopper prefill kernel (cuda_src/prefill_sm90.cu).

The kernel copies Q/K/V tiles with ``cp.async.bulk.tensor``, which reads a 128-byte tensor map that the driver's
``cuTensorMapEncodeTiled`` encodes on the host (called here through ctypes: CuPy does not wrap it). A call's maps
live in device memory and the kernel takes their address (a map kernel parameter would need 64-byte alignment in
the parameter block, which CuPy's argument packing does not promise). Maps are cached per (device, arrays' pointers,
shapes, strides, dtype), so repeated calls on the same buffers upload nothing.
"""

from __future__ import annotations

import collections
import ctypes
import sys

import numpy as np

#: CUtensorMapDataType codes of the dtypes the kernel runs (CU_TENSOR_MAP_DATA_TYPE_FLOAT16 / _BFLOAT16).
_DATA_TYPES = {"float16": 6, "bfloat16": 9}
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_256B = 3
_OOB_FILL_ZEROS = 0
#: Bytes of one CUtensorMap and its alignment.
MAP_BYTES = 128
_MAP_ALIGN = 64
#: Box of one copy: 64 elements (128 bytes, the swizzle span) of one head for 64 consecutive tokens.
BOX_COLS = 64
BOX_ROWS = 64

_ENCODE = None
_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 64


def _encoder():
    """The driver's cuTensorMapEncodeTiled (CUDA 12.0+ drivers export it)."""
    global _ENCODE
    if _ENCODE is None:
        lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
        fn = lib.cuTensorMapEncodeTiled
        u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
        _ENCODE = fn
    return _ENCODE


def _tma_strides(a) -> tuple[int, int]:
    """(head, token) strides of ``a [tokens, heads, D]`` in bytes as the map takes them: the array's own, except
    along an axis of extent 1, whose stride is never used and may be anything (0 included), where it is replaced by
    a valid one (a multiple of 16 bytes)."""
    tokens, heads, dim = a.shape
    row = dim * a.dtype.itemsize
    head = int(a.strides[1]) if heads > 1 else row
    token = int(a.strides[0]) if tokens > 1 else heads * row
    return head, token


def tma_compatible(a) -> bool:
    """True when ``a [tokens, heads, D]`` (fp16/bf16, last dim contiguous) can be described by a tensor map: head
    and token strides positive multiples of 16 bytes below 2**40 (after :func:`_tma_strides`), data pointer
    16-byte aligned, D a multiple of 64."""
    if a.dtype.name not in _DATA_TYPES or a.shape[2] % BOX_COLS:
        return False
    return a.data.ptr % 16 == 0 and all(0 < s < 2**40 and s % 16 == 0 for s in _tma_strides(a))


def _encode(a, out: np.ndarray) -> None:
    """Encode the map of ``a [tokens, heads, D]`` (3-D {D, heads, tokens}, box {64, 1, 64}, 128-byte swizzle,
    zeros outside the tensor) into the 128 bytes ``out``."""
    tokens, heads, dim = a.shape
    head_stride, token_stride = _tma_strides(a)
    dims = (ctypes.c_uint64 * 3)(dim, heads, max(tokens, 1))
    strides = (ctypes.c_uint64 * 2)(head_stride, token_stride)
    box = (ctypes.c_uint32 * 3)(BOX_COLS, 1, BOX_ROWS)
    element_strides = (ctypes.c_uint32 * 3)(1, 1, 1)
    rc = _encoder()(out.ctypes.data, _DATA_TYPES[a.dtype.name], 3, ctypes.c_void_p(a.data.ptr), dims, strides,
                    box, element_strides, _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZEROS)
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {rc}) for an array of shape {list(a.shape)}, "
                           f"strides {list(a.strides)} bytes, dtype {a.dtype.name}")


def tensor_maps(cupy, *arrays):
    """Device buffer holding the tensor maps of ``arrays`` (each ``[tokens, heads, D]`` and accepted by
    :func:`tma_compatible`), 128 bytes each, in order; cached per device and the arrays' pointers, shapes, strides
    and dtypes (a map describes exactly those)."""
    key = (cupy.cuda.Device().id,) + tuple((a.data.ptr, a.shape, a.strides, a.dtype.name) for a in arrays)
    maps = _CACHE.get(key)
    if maps is not None:
        _CACHE.move_to_end(key)
        return maps
    raw = np.zeros(MAP_BYTES * len(arrays) + _MAP_ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % _MAP_ALIGN
    host = raw[start:start + MAP_BYTES * len(arrays)]
    for i, a in enumerate(arrays):
        _encode(a, host[i * MAP_BYTES:(i + 1) * MAP_BYTES])
    maps = _CACHE[key] = cupy.asarray(host)  # device allocations are at least 256-byte aligned
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return maps
