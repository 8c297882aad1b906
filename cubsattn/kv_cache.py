"""Paged KV cache with vLLM's layout: shape, views, write, block copy, swap, fp8 E4M3 quantisation.

One layer's cache is a single array ``kv_cache`` of shape ``(2, num_blocks, block_size * num_kv_heads * head_size)``;
``kv_cache[0]`` holds keys and ``kv_cache[1]`` values. With ``x = 16 // element_size`` (8 for fp16/bf16, 16 for the
uint8 fp8 cache) the two halves are viewed as

- key_cache ``[num_blocks, num_kv_heads, head_size // x, block_size, x]``: ``key_cache[b, h, d // x, o, d % x]`` is
  ``K[token][h][d]`` of the token stored in slot ``b * block_size + o``;
- value_cache ``[num_blocks, num_kv_heads, head_size, block_size]``: ``value_cache[b, h, d, o]`` is ``V[token][h][d]``.

Every function validates its arguments on the host (``cubsattn._checks`` vocabulary), then runs NumPy code for NumPy
arrays or the CUDA kernels of ``cuda_src/kv_cache.cu`` for CuPy arrays, with bit-identical results (except
the sign bit of fp8 NaN codes, which the GPU does not keep).

fp8 (``kv_cache_dtype`` "fp8" or "fp8_e4m3"): the cache is uint8 holding E4M3 (the "fn" variant: max 448, no inf,
NaN = 0x7f/0xff). A value ``x`` is stored as ``saturate(float32(x) / scale)`` rounded to nearest even (NaN stays NaN)
and read back as ``fp8 * scale``. "fp8_e5m2" is rejected.

Example
-------
>>> import numpy as np
>>> kv = np.zeros(get_kv_cache_shape(4, 16, 2, 64), dtype=np.float16)        # 4 blocks of 16 slots
>>> key_cache, value_cache = split_kv_cache(kv, 2, 64)
>>> key_cache.shape, value_cache.shape
((4, 2, 8, 16, 8), (4, 2, 64, 16))
>>> k = np.ones((3, 2, 64), np.float16); v = 2 * k
>>> write_to_paged_cache(k, v, key_cache, value_cache, np.array([35, -1, 17]))   # slot 35 = block 2, offset 3
>>> float(value_cache[2, 1, 5, 3]), float(value_cache[0, 0, 0, 0])
(2.0, 0.0)
"""

from __future__ import annotations

import contextlib
import math
import numbers

import ml_dtypes
import numpy as np

from . import _cache_cuda  # the CUDA launchers; importing them needs no GPU (CuPy is imported at the first launch)
from ._checks import (ATTENTION_DTYPES, GPU_ATTENTION_DTYPES, array_module, as_array, check_array, check_int,
                      check_int_array, dtype_name, to_host)

__all__ = [
    "FP8_E4M3_MAX",
    "KV_CACHE_DTYPES",
    "copy_blocks",
    "empty_host_cache",
    "float_to_fp8_e4m3",
    "fp8_e4m3_to_float",
    "gather_kv",
    "get_kv_cache_shape",
    "kv_cache_element_dtype",
    "split_kv_cache",
    "swap_blocks",
    "write_to_paged_cache",
]

#: accepted values of ``kv_cache_dtype``.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
#: largest finite E4M3 ("fn") value; writes saturate to +-448.
FP8_E4M3_MAX = 448.0
_FP8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
_UINT8 = np.dtype(np.uint8)
# E4M3 code -> float32, indexed by the uint8 code (a table works for NumPy and CuPy alike).
_FP8_TABLE = np.arange(256, dtype=np.uint8).view(_FP8_DTYPE).astype(np.float32)
# fp8 scales are limited to [2^-64, 2^64]: within it the CUDA write's division-free x / scale is exact (kv_cache.cu).
_SCALE_MIN, _SCALE_MAX = 2.0**-64, 2.0**64


# ---------------------------------------------------------------------------------------------------------------
# Shapes and views


def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> tuple[int, int, int]:
    """Shape of one layer's cache: ``(2, num_blocks, block_size * num_kv_heads * head_size)``."""
    num_blocks = check_int("num_blocks", num_blocks, minimum=1)
    block_size = check_int("block_size", block_size, minimum=1)
    num_kv_heads = check_int("num_kv_heads", num_kv_heads, minimum=1)
    head_size = check_int("head_size", head_size, minimum=1)
    return (2, num_blocks, block_size * num_kv_heads * head_size)


def kv_cache_element_dtype(model_dtype, kv_cache_dtype: str = "auto") -> np.dtype:
    """dtype to allocate the cache with: ``model_dtype`` for "auto", uint8 for "fp8"/"fp8_e4m3"."""
    return _UINT8 if _is_fp8(kv_cache_dtype) else np.dtype(model_dtype)


def _is_fp8(kv_cache_dtype: str) -> bool:
    if kv_cache_dtype == "fp8_e5m2":
        raise ValueError("kv_cache_dtype 'fp8_e5m2' is not supported; use 'auto', 'fp8' or 'fp8_e4m3'")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    return kv_cache_dtype != "auto"


def _x(dtype) -> int:
    return 16 // np.dtype(dtype).itemsize


def _check_kv_cache(name: str, kv, *, dtypes=None):
    """A whole-layer cache ``(2, num_blocks, block_elems)``, C-contiguous."""
    check_array(name, kv, ndim=3, dtypes=dtypes)
    if kv.shape[0] != 2:
        raise ValueError(f"{name} must have shape [2, num_blocks, block_size * num_kv_heads * head_size], "
                         f"got {list(kv.shape)}")
    if not kv.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (block offsets are computed from its shape)")


def split_kv_cache(kv_cache, num_kv_heads: int, head_size: int):
    """Key and value views of one layer's cache (no copies; NumPy or CuPy).

    Parameters
    ----------
    kv_cache : array ``(2, num_blocks, block_size * num_kv_heads * head_size)``, C-contiguous, any element dtype.
    num_kv_heads, head_size : int
        ``head_size`` must be a multiple of ``x = 16 // kv_cache.itemsize``.

    Returns
    -------
    key_cache : view ``[num_blocks, num_kv_heads, head_size // x, block_size, x]``
    value_cache : view ``[num_blocks, num_kv_heads, head_size, block_size]``
    """
    _check_kv_cache("kv_cache", kv_cache)
    num_kv_heads = check_int("num_kv_heads", num_kv_heads, minimum=1)
    head_size = check_int("head_size", head_size, minimum=1)
    x = _x(kv_cache.dtype)
    if head_size % x:
        raise ValueError(f"head_size ({head_size}) must be a multiple of x = 16 // element size ({x}) for a "
                         f"{dtype_name(kv_cache.dtype)} cache")
    per_slot = num_kv_heads * head_size
    if kv_cache.shape[2] % per_slot:
        raise ValueError(f"kv_cache.shape[2] ({kv_cache.shape[2]}) must be a multiple of num_kv_heads * head_size "
                         f"({per_slot})")
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2] // per_slot
    key_cache = kv_cache[0].reshape(num_blocks, num_kv_heads, head_size // x, block_size, x)
    value_cache = kv_cache[1].reshape(num_blocks, num_kv_heads, head_size, block_size)
    return key_cache, value_cache


# ---------------------------------------------------------------------------------------------------------------
# fp8 E4M3


def float_to_fp8_e4m3(x, scale: float = 1.0) -> np.ndarray:
    """NumPy quantiser of the fp8 cache: uint8 codes of ``saturate(float32(x) / scale)``, round to nearest even.

    Finite values beyond +-448 (and +-inf) saturate to +-448; NaN stays NaN. Same shape as ``x``.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # inf / NaN inputs are handled below
        f = np.asarray(x).astype(np.float32) / np.float32(scale)
    # Clip first: E4M3fn has no inf, and a plain cast would turn overflow into NaN. np.clip keeps NaN.
    return np.clip(f, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(_FP8_DTYPE).view(np.uint8)


def fp8_e4m3_to_float(codes):
    """float32 values of E4M3 (fn) codes: a uint8 NumPy or CuPy array of any shape -> float32 of the same shape."""
    check_array("codes", codes, dtypes=(_UINT8,))
    if isinstance(codes, np.ndarray):
        return _FP8_TABLE[codes]
    import cupy

    return cupy.asarray(_FP8_TABLE)[codes]


def _scale(name: str, value) -> float:
    """A positive finite float from a number or a one-element NumPy/CuPy array (a CuPy value is read back)."""
    if hasattr(value, "shape"):
        if value.size != 1:
            raise ValueError(f"{name} must be a single value, got shape {list(value.shape)}")
        value = value.reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    if not _SCALE_MIN <= value <= _SCALE_MAX:
        raise ValueError(f"{name} must be in [2**-64, 2**64], got {value}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Write


def write_to_paged_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype: str = "auto",
                         k_scale: float = 1.0, v_scale: float = 1.0, *, check_slots: bool = True) -> None:
    """Scatter each token's keys and values into its cache slot (vLLM's ``reshape_and_cache``); one kernel launch.

    Parameters
    ----------
    key, value : ``[num_tokens, num_kv_heads, head_size]`` fp16 or bf16 (also float32 with NumPy). The token stride
        is free (e.g. slices of a fused qkv array); the last two dimensions must be contiguous.
    key_cache : ``[num_blocks, num_kv_heads, head_size // x, block_size, x]``, from :func:`split_kv_cache`.
    value_cache : ``[num_blocks, num_kv_heads, head_size, block_size]``. Both C-contiguous, dtype = ``key.dtype``
        ("auto") or uint8 (fp8).
    slot_mapping : int32 or int64 ``[num_tokens]``; token ``t`` goes to block ``slot // block_size``, offset
        ``slot % block_size``. Negative slots are padding: skipped, nothing written.
    kv_cache_dtype : "auto", "fp8" or "fp8_e4m3".
    k_scale, v_scale : float in [2**-64, 2**64] (float or one-element array); fp8 stores ``saturate(x / scale)``.
        Ignored for "auto".
    check_slots : bool, keyword-only
        Raise ValueError when a slot is >= ``num_blocks * block_size``. For CuPy input this reads the maximum slot
        back to the host (one device->host synchronisation). Pass False inside CUDA-graph capture when the caller
        guarantees valid slots; the kernel then skips out-of-range slots, so it never writes outside the cache.

    Notes
    -----
    Two tokens with the same slot race on the GPU (one of them wins); NumPy keeps the last.
    """
    key, value, key_cache, value_cache, slot_mapping = (
        as_array(a) for a in (key, value, key_cache, value_cache, slot_mapping))
    xp = array_module(key, value, key_cache, value_cache, slot_mapping)
    fp8 = _is_fp8(kv_cache_dtype)
    dtypes = ATTENTION_DTYPES if xp is np else GPU_ATTENTION_DTYPES
    check_array("key", key, ndim=3, dtypes=dtypes)
    num_tokens, num_heads, head_size = key.shape
    check_array("value", value, dtypes=(key.dtype,), shape=key.shape)
    cache_dtype = _UINT8 if fp8 else np.dtype(key.dtype)
    x = _x(cache_dtype)
    check_array("key_cache", key_cache, ndim=5, dtypes=(cache_dtype,))
    check_array("value_cache", value_cache, ndim=4, dtypes=(cache_dtype,))
    if head_size % x:
        raise ValueError(f"head_size ({head_size}) must be a multiple of x = 16 // element size ({x}) for a "
                         f"{dtype_name(cache_dtype)} cache")
    num_blocks, block_size = value_cache.shape[0], value_cache.shape[3]
    check_array("value_cache", value_cache, shape=(num_blocks, num_heads, head_size, block_size))
    check_array("key_cache", key_cache, shape=(num_blocks, num_heads, head_size // x, block_size, x))
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not cache.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (use the views returned by split_kv_cache)")
    for name, a in (("key", key), ("value", value)) if num_tokens else ():
        # Strides of length-1 dimensions are never used (and NumPy may give them any value).
        isz = a.dtype.itemsize
        if (head_size > 1 and a.strides[2] != isz) or (num_heads > 1 and a.strides[1] != head_size * isz):
            raise ValueError(f"{name} must be contiguous in its last two dimensions [num_kv_heads, head_size]; got "
                             f"strides {tuple(s // isz for s in a.strides)} (elements)")
        if num_tokens > 1 and (a.strides[0] < 0 or a.strides[0] % isz):
            raise ValueError(f"{name}'s token stride must be a non-negative whole number of elements, got "
                             f"{a.strides[0]} bytes")
    check_int_array("slot_mapping", slot_mapping)
    if np.dtype(slot_mapping.dtype) not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise TypeError(f"slot_mapping must be int32 or int64, got {dtype_name(slot_mapping.dtype)}")
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping must have one entry per token ({num_tokens}), got {slot_mapping.shape[0]}")
    k_scale, v_scale = (_scale("k_scale", k_scale), _scale("v_scale", v_scale)) if fp8 else (1.0, 1.0)
    num_slots = num_blocks * block_size
    if (check_slots or xp is np) and num_tokens:
        top = int(slot_mapping.max())
        if top >= num_slots:
            i = int(slot_mapping.argmax())
            raise ValueError(f"slot_mapping[{i}] ({top}) is out of range: the cache has {num_blocks} blocks x "
                             f"{block_size} = {num_slots} slots")

    if xp is np:
        _write_numpy(key, value, key_cache, value_cache, slot_mapping, fp8, k_scale, v_scale)
        return
    if head_size > _cache_cuda.MAX_HEAD_SIZE:
        raise NotImplementedError(f"head_size ({head_size}) > {_cache_cuda.MAX_HEAD_SIZE} is not supported by the "
                                  f"CUDA cache write")
    if num_slots >= 2**31:
        raise NotImplementedError(f"the CUDA cache write indexes slots with int32; the cache has {num_slots} slots")
    if key_cache.data.ptr % 16:
        raise ValueError("key_cache must be 16-byte aligned (its chunks are written as 16-byte vectors)")
    _cache_cuda.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, fp8=fp8, k_scale=k_scale,
                                  v_scale=v_scale)


def _write_numpy(key, value, key_cache, value_cache, slot_mapping, fp8, k_scale, v_scale):
    block_size = value_cache.shape[3]
    slots = slot_mapping.astype(np.int64)
    tokens = np.flatnonzero(slots >= 0)
    blk, off = np.divmod(slots[tokens], block_size)
    k, v = key[tokens], value[tokens]
    if fp8:
        k, v = float_to_fp8_e4m3(k, k_scale), float_to_fp8_e4m3(v, v_scale)
    # Advanced indices (blk, off) around slices: the indexed result is [n_tokens, H, D // x, x] / [n_tokens, H, D].
    key_cache[blk, :, :, off, :] = k.reshape(len(tokens), *key_cache.shape[1:3], key_cache.shape[4])
    value_cache[blk, :, :, off] = v


# ---------------------------------------------------------------------------------------------------------------
# Block copies


def _check_pairs(name: str, block_mapping) -> np.ndarray:
    """An integer ``[N, 2]`` array (NumPy or CuPy; CuPy is read back to the host) as int64 NumPy."""
    check_int_array(name, block_mapping, ndim=2)
    if block_mapping.shape[1] != 2:
        raise ValueError(f"{name} must have shape [num_pairs, 2] of (src, dst) block ids, got "
                         f"{list(block_mapping.shape)}")
    return to_host(block_mapping).astype(np.int64)


def _check_ids(name: str, ids: np.ndarray, num_blocks: int, what: str) -> None:
    bad = np.flatnonzero((ids < 0) | (ids >= num_blocks))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}[{i}] {what} block id ({int(ids[i])}) is out of range [0, {num_blocks})")


def copy_blocks(kv_caches, block_mapping) -> None:
    """Copy whole key and value blocks ``src -> dst`` in every layer's cache (one kernel launch for CuPy).

    Parameters
    ----------
    kv_caches : list of arrays ``(2, num_blocks, block_elems)``, one per layer, all of one shape and dtype, all
        NumPy or all CuPy, C-contiguous.
    block_mapping : integer ``[num_pairs, 2]`` of (src, dst) block ids, NumPy or CuPy (a CuPy mapping is read back
        to the host for validation: one synchronisation). Destinations must be distinct and must not be sources,
        so that the parallel copies have one well-defined result.
    """
    if not isinstance(kv_caches, (list, tuple)):
        raise TypeError(f"kv_caches must be a list of per-layer caches, got {type(kv_caches).__name__}")
    pairs = _check_pairs("block_mapping", block_mapping)
    if not kv_caches:
        return
    xp = array_module(*kv_caches)
    ref = kv_caches[0]
    for i, kv in enumerate(kv_caches):
        _check_kv_cache(f"kv_caches[{i}]", kv, dtypes=(ref.dtype,))
        if kv.shape != ref.shape:
            raise ValueError(f"kv_caches[{i}] has shape {list(kv.shape)}, but kv_caches[0] has {list(ref.shape)}")
    num_blocks = ref.shape[1]
    src, dst = pairs[:, 0], pairs[:, 1]
    _check_ids("block_mapping", src, num_blocks, "source")
    _check_ids("block_mapping", dst, num_blocks, "destination")
    # O(num_blocks + pairs) counting instead of sorting: this runs on the host before every launch.
    dst_count = np.bincount(dst, minlength=num_blocks)
    if pairs.shape[0] and dst_count.max() > 1:
        raise ValueError(f"block_mapping destinations must be distinct; block {int(np.argmax(dst_count > 1))} is a "
                         f"destination more than once")
    both = np.flatnonzero(dst_count[src] > 0)
    if both.size:
        raise ValueError(f"block_mapping: block {int(src[both[0]])} is both a source and a destination (the copies "
                         f"run in parallel; split the mapping into ordered steps)")
    if pairs.shape[0] == 0:
        return
    if xp is np:
        for kv in kv_caches:
            kv[:, dst] = kv[:, src]
        return
    if ref.shape[2] * ref.itemsize % 16:
        raise ValueError(f"a cache block must be a multiple of 16 bytes for the CUDA copy, got "
                         f"{ref.shape[2] * ref.itemsize}")
    _cache_cuda.copy_blocks(kv_caches, pairs)


def _runs(src: np.ndarray, dst: np.ndarray):
    """Split ordered pairs into runs where both src and dst ids step by +1: (src0, dst0, length) each."""
    if src.size == 0:
        return []
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [src.size]]))
    return list(zip(src[starts].tolist(), dst[starts].tolist(), lengths.tolist()))


def swap_blocks(src_kv_cache, dst_kv_cache, block_mapping) -> None:
    """Copy whole blocks between two caches: device<->host, device->device, or host->host.

    Parameters
    ----------
    src_kv_cache, dst_kv_cache : ``(2, num_blocks, block_elems)`` caches, C-contiguous, same dtype and
        ``block_elems``; the block counts may differ. Each is NumPy (host; see :func:`empty_host_cache` for pinned
        memory) or CuPy. They must be distinct arrays (use :func:`copy_blocks` within one cache).
    block_mapping : integer ``[num_pairs, 2]`` of (src, dst) block ids, NumPy (as in vLLM) or CuPy.

    Notes
    -----
    Pairs are applied in order (a repeated destination keeps the last). Runs of consecutive ids on both sides are
    coalesced into one ``cudaMemcpyAsync`` per run and half (key, value), on the current stream. Copies involving
    pinned host memory are asynchronous: synchronise the stream before reading the host cache or reusing it.
    Unlike vLLM, host->host is allowed (a NumPy copy), so the CPU backend can swap too.
    """
    check_array("src_kv_cache", src_kv_cache, ndim=3)
    _check_kv_cache("src_kv_cache", src_kv_cache)
    _check_kv_cache("dst_kv_cache", dst_kv_cache, dtypes=(src_kv_cache.dtype,))
    if src_kv_cache.shape[2] != dst_kv_cache.shape[2]:
        raise ValueError(f"src_kv_cache and dst_kv_cache must have the same block geometry: block sizes "
                         f"{src_kv_cache.shape[2]} and {dst_kv_cache.shape[2]} elements differ")
    pairs = _check_pairs("block_mapping", block_mapping)
    src, dst = pairs[:, 0], pairs[:, 1]
    _check_ids("block_mapping", src, src_kv_cache.shape[1], "source")
    _check_ids("block_mapping", dst, dst_kv_cache.shape[1], "destination")
    src_host, dst_host = isinstance(src_kv_cache, np.ndarray), isinstance(dst_kv_cache, np.ndarray)
    for name, a, host in (("src_kv_cache", src_kv_cache, src_host), ("dst_kv_cache", dst_kv_cache, dst_host)):
        if not host and not type(a).__module__.startswith("cupy"):
            raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray, got {type(a).__name__}")
    same = (np.shares_memory(src_kv_cache, dst_kv_cache) if src_host and dst_host
            else not (src_host or dst_host) and src_kv_cache.data.ptr == dst_kv_cache.data.ptr)
    if same:
        raise ValueError("src_kv_cache and dst_kv_cache are the same cache; use copy_blocks within one cache")
    if pairs.shape[0] == 0:
        return
    if src_host and dst_host:
        dst_kv_cache[:, dst] = src_kv_cache[:, src]
        return
    import cupy

    runtime = cupy.cuda.runtime
    kind = (runtime.memcpyHostToDevice if src_host else runtime.memcpyDeviceToHost if dst_host
            else runtime.memcpyDefault)  # default: peer copies between two devices work too
    gpu = dst_kv_cache if src_host else src_kv_cache

    def address(a, host):
        return a.ctypes.data if host else a.data.ptr

    block_bytes = src_kv_cache.shape[2] * src_kv_cache.itemsize
    src_base, dst_base = address(src_kv_cache, src_host), address(dst_kv_cache, dst_host)
    with gpu.device:
        stream = cupy.cuda.get_current_stream().ptr
        for s0, d0, n in _runs(src, dst):
            for half in (0, 1):
                runtime.memcpyAsync(dst_base + (half * dst_kv_cache.shape[1] + d0) * block_bytes,
                                    src_base + (half * src_kv_cache.shape[1] + s0) * block_bytes,
                                    n * block_bytes, kind, stream)


def empty_host_cache(shape, dtype, *, pinned: bool = True) -> np.ndarray:
    """An uninitialised NumPy cache ``shape`` (e.g. :func:`get_kv_cache_shape`) for swapping.

    With ``pinned`` (default) and CuPy available it lives in page-locked memory (``cupyx.empty_pinned``), so
    :func:`swap_blocks` copies run asynchronously at full PCIe/NVLink speed; otherwise it is ordinary pageable memory.
    """
    if pinned:
        try:
            import cupyx

            return cupyx.empty_pinned(shape, dtype=dtype)
        except Exception:  # no CuPy or no driver: pageable memory still works
            pass
    return np.empty(shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Reading back (for tests and the NumPy decode path)


def gather_kv(key_cache, value_cache, block_table_row, seq_len: int, *, kv_cache_dtype: str = "auto",
              k_scale: float = 1.0, v_scale: float = 1.0):
    """One sequence's keys and values read back out of the caches, as float32 on the caches' side (NumPy or CuPy).

    Parameters
    ----------
    key_cache : ``[num_blocks, num_kv_heads, head_size // x, block_size, x]``, NumPy or CuPy
    value_cache : ``[num_blocks, num_kv_heads, head_size, block_size]``, same array module
    block_table_row : integer ``[>= ceil(seq_len / block_size)]``, same array module: the sequence's block ids in
        order (a CuPy row is read back to the host to check the ids: one synchronisation).
    seq_len : int >= 0, number of tokens to read (positions ``0 .. seq_len - 1``).
    kv_cache_dtype, k_scale, v_scale : as for :func:`write_to_paged_cache`; fp8 codes are decoded and multiplied by
        the scale in float32 (the kernels then round to the model dtype).

    Returns
    -------
    k, v : float32 ``[seq_len, num_kv_heads, head_size]``, NumPy or CuPy like the inputs (CuPy: on their device)
    """
    for name, a in (("key_cache", key_cache), ("value_cache", value_cache), ("block_table_row", block_table_row)):
        if not (isinstance(a, np.ndarray) or type(a).__module__.startswith("cupy")):
            raise TypeError(f"gather_kv takes NumPy arrays; {name} is {type(a).__module__}.{type(a).__name__} "
                            f"(CuPy arrays work too, all on one side)")
    xp = array_module(key_cache, value_cache, block_table_row)
    fp8 = _is_fp8(kv_cache_dtype)
    check_array("key_cache", key_cache, ndim=5, dtypes=(_UINT8,) if fp8 else ATTENTION_DTYPES)
    num_blocks, heads, _, block_size, x = key_cache.shape
    head_size = key_cache.shape[2] * x
    check_array("value_cache", value_cache, dtypes=(key_cache.dtype,), shape=(num_blocks, heads, head_size, block_size))
    check_int_array("block_table_row", block_table_row)
    seq_len = check_int("seq_len", seq_len, minimum=0)
    used = -(-seq_len // block_size)
    if block_table_row.shape[0] < used:
        raise ValueError(f"block_table_row has {block_table_row.shape[0]} entries, but seq_len {seq_len} needs "
                         f"{used} blocks of {block_size}")
    ids = to_host(block_table_row[:used]).astype(np.int64)
    _check_ids("block_table_row", ids, num_blocks, "cache")
    with _device_of(key_cache):
        ids = xp.asarray(ids)
        # [used, H, D/x, bs, x] -> [used, bs, H, D/x, x] and [used, H, D, bs] -> [used, bs, H, D]
        k = key_cache[ids].transpose(0, 3, 1, 2, 4).reshape(used * block_size, heads, head_size)[:seq_len]
        v = value_cache[ids].transpose(0, 3, 1, 2).reshape(used * block_size, heads, head_size)[:seq_len]
        if fp8:
            scales = np.float32(_scale("k_scale", k_scale)), np.float32(_scale("v_scale", v_scale))
            return fp8_e4m3_to_float(k) * scales[0], fp8_e4m3_to_float(v) * scales[1]
        return k.astype(np.float32), v.astype(np.float32)


def _device_of(a):
    """Context making ``a``'s device current (CuPy), or a no-op (NumPy)."""
    return a.device if not isinstance(a, np.ndarray) else contextlib.nullcontext()
