"""Launchers for cuda_src/kv_cache.cu: reshape_and_cache and copy_blocks on CuPy arrays.

Callers (cubsattn.kv_cache) validate every argument first; these functions only compute launch geometry.
"""

from __future__ import annotations

import numpy as np

from . import _kernels

#: tokens per CTA of reshape_and_cache (kTileTokens in kv_cache.cu).
TILE_TOKENS = 32
#: largest head_size the write kernel takes (the largest decode supports); its staged tiles use 33 KiB of shared
#: memory, under the 48 KiB available without opt-in.
MAX_HEAD_SIZE = 256
_THREADS = 256


def _write_name(dtype, fp8: bool, slot_dtype) -> str:
    slot = "int" if np.dtype(slot_dtype) == np.int32 else "long long"
    return f"cubsattn::reshape_and_cache<{_kernels.ctype(dtype)}, {'true' if fp8 else 'false'}, {slot}>"


SOURCE = _kernels.register(_kernels.KernelSource(
    "kv_cache.cu",
    tuple(_write_name(dt, fp8, sd) for dt in _kernels.CTYPE for fp8 in (False, True) for sd in (np.int32, np.int64))
    + ("copy_blocks",),
))


def _smem_bytes(head_size: int) -> int:
    key_pitch = (head_size // 8) | 1
    value_pitch = (head_size // 2) | 1
    return TILE_TOKENS * (8 + 16 * key_pitch + 4 * value_pitch)


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, *, fp8: bool, k_scale: float,
                      v_scale: float) -> None:
    """Scatter ``key``/``value`` ``[T, H, D]`` (token-strided) into the caches; slots < 0 or out of range skipped."""
    num_tokens, num_heads, head_size = key.shape
    if num_tokens == 0:
        return
    isz = key.dtype.itemsize
    key_stride, value_stride = key.strides[0] // isz, value.strides[0] // isz
    # 16-byte loads need every row start aligned; otherwise the kernel falls back to element loads.
    aligned = all(p % 16 == 0 for p in (key.data.ptr, value.data.ptr, key.strides[0], value.strides[0]))
    block_size = value_cache.shape[3]
    num_slots = value_cache.shape[0] * block_size
    kernel = _kernels.get_function(SOURCE.filename, _write_name(key.dtype, fp8, slot_mapping.dtype))
    grid = (-(-num_tokens // TILE_TOKENS), num_heads)
    kernel(grid, (_THREADS,),
           (key, value, key_cache, value_cache, slot_mapping, np.int64(key_stride), np.int64(value_stride),
            np.int32(num_tokens), np.int32(num_heads), np.int32(head_size), np.int32(block_size),
            np.int64(num_slots), np.float32(k_scale), np.float32(v_scale), np.int32(aligned)),
           shared_mem=_smem_bytes(head_size))


def copy_blocks(kv_caches, pairs: np.ndarray) -> None:
    """Copy key and value blocks ``pairs[:, 0] -> pairs[:, 1]`` (int64 host ``[P, 2]``) in every layer, one launch."""
    import cupy

    num_pairs = pairs.shape[0]
    if num_pairs == 0 or not kv_caches:
        return
    ref = kv_caches[0]
    half_bytes = ref.shape[1] * ref.shape[2] * ref.itemsize  # bytes of kv[0]; kv[1] starts right after
    pointers = []
    for kv in kv_caches:
        pointers += [kv.data.ptr, kv.data.ptr + half_bytes]
    # One host-to-device upload for the pointer table and the pairs together.
    table = cupy.asarray(np.concatenate([np.asarray(pointers, dtype=np.int64), pairs.reshape(-1).astype(np.int64)]))
    block_vecs = ref.shape[2] * ref.itemsize // 16
    kernel = _kernels.get_function(SOURCE.filename, "copy_blocks")
    kernel((num_pairs, 2 * len(kv_caches)), (_THREADS,), (table, np.int32(len(kv_caches)), np.int64(block_vecs)))
