"""Launchers for cuda_src/kv_cache.cu: reshape_and_cache and copy_blocks on CuPy arrays.

Callers (cubsattn.kv_cache) validate every argument first; these functions only compute launch geometry.
"""

from __future__ import annotations

import functools

import numpy as np

from . import _kernels

#: tokens per tile of reshape_and_cache (kTileTokens in kv_cache.cu).
TILE_TOKENS = 16
#: batches of at most this many tokens go to reshape_and_cache_tokens (one thread per token chunk, one load phase):
#: decode steps. Larger ones go to the tile kernel, which stores whole row pieces for runs of consecutive slots.
#: H200 (e4f25fb), 8 kv heads x 128, bf16, kernel us per-token / tile kernel: tokens alone in their blocks 16.8 /
#: 18.5 (256 tokens), 33.1 / 37.8 (512); consecutive (prefill) slots 10.1 / 6.4 (256), 15.8 / 7.0 (512). 256 covers
#: decode batches of up to 256 sequences and keeps prefill chunks of more tokens on the tile kernel.
SCATTER_MAX_TOKENS = 256
#: largest head_size the write kernel takes (the largest decode supports).
MAX_HEAD_SIZE = 256
_THREADS = 256


def _write_name(kernel: str, dtype, fp8: bool, slot_dtype) -> str:
    slot = "int" if np.dtype(slot_dtype) == np.int32 else "long long"
    return f"cubsattn::{kernel}<{_kernels.ctype(dtype)}, {'true' if fp8 else 'false'}, {slot}>"


SOURCE = _kernels.register(_kernels.KernelSource(
    "kv_cache.cu",
    tuple(_write_name(k, dt, fp8, sd) for k in ("reshape_and_cache", "reshape_and_cache_tokens")
          for dt in _kernels.CTYPE for fp8 in (False, True) for sd in (np.int32, np.int64))
    + ("copy_blocks",),
))


@functools.cache
def _function(name: str, device_id: int):
    """Kernel ``name`` on device ``device_id``, looked up once: a decode step's write is host-bound."""
    return _kernels.get_function(SOURCE.filename, name)


@functools.cache
def _resident_ctas(name: str, device_id: int) -> int:
    """CTAs of kernel ``name`` resident on the whole device at once (the persistent grid size)."""
    from cupy.cuda import driver

    per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(_function(name, device_id).kernel.ptr, _THREADS, 0)
    return max(1, per_sm) * _kernels.num_sms()


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, *, fp8: bool, k_scale: float,
                      v_scale: float) -> None:
    """Scatter ``key``/``value`` ``[T, H, D]`` (token-strided) into the caches; slots < 0 or out of range skipped.

    Needs ``num_blocks * block_size < 2**31`` and 16-byte aligned caches (checked by the caller). Picks the kernel
    by ``T`` alone (no look at the slots, so no device synchronisation).
    """
    if key.shape[0] == 0:
        return
    launch = launch_tokens if key.shape[0] <= SCATTER_MAX_TOKENS else launch_tiles
    launch(key, value, key_cache, value_cache, slot_mapping, fp8=fp8, k_scale=k_scale, v_scale=v_scale)


def _common_args(key, value, value_cache, fp8, k_scale, v_scale):
    """(kernel arguments after slot_mapping up to v_inv, vector_loads) shared by both write kernels."""
    num_tokens, num_heads, head_size = key.shape
    isz = key.dtype.itemsize
    # 16-byte loads need every row start aligned; otherwise the kernels fall back to element loads.
    aligned = all(p % 16 == 0 for p in (key.data.ptr, value.data.ptr, key.strides[0], value.strides[0]))
    block_size = value_cache.shape[3]
    # fp8 divides by the scale through a multiply by RN(1 / scale) plus an fma correction (see kv_cache.cu).
    k_scale, v_scale = np.float32(k_scale), np.float32(v_scale)
    return ((np.int64(key.strides[0] // isz), np.int64(value.strides[0] // isz), np.int32(num_tokens),
             np.int32(num_heads), np.int32(head_size), np.int32(block_size),
             np.int32(value_cache.shape[0] * block_size), k_scale, np.float32(1) / k_scale, v_scale,
             np.float32(1) / v_scale), np.int32(aligned))


def launch_tokens(key, value, key_cache, value_cache, slot_mapping, *, fp8: bool, k_scale: float,
                  v_scale: float) -> None:
    """reshape_and_cache_tokens: one thread per (token, 16-byte key cache chunk); ``T`` >= 1."""
    import cupy

    num_tokens, num_heads, head_size = key.shape
    args, aligned = _common_args(key, value, value_cache, fp8, k_scale, v_scale)
    kernel = _function(_write_name("reshape_and_cache_tokens", key.dtype, fp8, slot_mapping.dtype),
                       cupy.cuda.runtime.getDevice())
    items = num_tokens * (num_heads * head_size // (16 if fp8 else 8))
    kernel((-(-items // _THREADS),), (_THREADS,),
           (key, value, key_cache, value_cache, slot_mapping, *args, aligned))


def launch_tiles(key, value, key_cache, value_cache, slot_mapping, *, fp8: bool, k_scale: float,
                 v_scale: float) -> None:
    """reshape_and_cache: persistent CTAs over 16-token tiles; ``T`` >= 1."""
    import cupy

    num_tokens, num_heads, head_size = key.shape
    args, aligned = _common_args(key, value, value_cache, fp8, k_scale, v_scale)
    block_size = value_cache.shape[3]
    # Whole 8-slot value row segments are single 16-byte (fp8: 8-byte) stores when they are aligned.
    vector_rows = block_size % 8 == 0 and value_cache.data.ptr % (8 * value_cache.itemsize) == 0
    name = _write_name("reshape_and_cache", key.dtype, fp8, slot_mapping.dtype)
    device_id = cupy.cuda.runtime.getDevice()
    kernel = _function(name, device_id)
    tiles = -(-num_tokens // TILE_TOKENS)
    resident = _resident_ctas(name, device_id)
    # Too few tiles to fill the GPU: split each tile's chunks into `parts` ranges, down to 16 key chunks (one round
    # of 256 threads for two halves) per part.
    key_chunks = num_heads * head_size // (16 if fp8 else 8)
    parts = 1
    while tiles * parts < resident and key_chunks % (2 * parts) == 0 and key_chunks // (2 * parts) >= 16:
        parts *= 2
    grid = min(tiles * parts, resident)
    kernel((grid,), (_THREADS,),
           (key, value, key_cache, value_cache, slot_mapping, *args, aligned, np.int32(vector_rows),
            np.int32(parts)))


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
