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
#: small decode steps, where a tile kernel CTA would have few of its 16 tokens to store. Larger ones go to the tile
#: kernel. H200 (c1d0a2c), 8 kv heads x 128, kernel us per-token / tile kernel, tokens alone in their blocks: bf16
#: 5.1 / 5.7 (1 token), 6.5 / 6.6 (16), 6.9 / 6.8 (64), 9.2 / 7.6 (128), 17.7 / 11.6 (256); fp8 5.2 / 6.9 (1),
#: 8.9 / 7.6 (16), 9.0 / 7.8 (64), 9.2 / 7.9 (128). Up to 64 tokens the GPU times are within ~1 us and the per-token
#: launcher is the leaner host path.
SCATTER_MAX_TOKENS = 64
#: largest head_size the write kernel takes (the largest decode supports).
MAX_HEAD_SIZE = 256
_THREADS = 256
#: a reshape_and_cache CTA takes the fewest heads holding this many 8-element chunks per token (one head of 128):
#: few heads per CTA keep CTAs in head-major order, so scattered element stores of one head meet in L2. H200, 64k
#: tokens of 8 heads x 128, bf16, 1 / 2 / 8 heads per CTA: random slots 1.11 / 1.44 / 2.00 ms, prefill slots
#: 0.139 / 0.140 / 0.139 ms.
MIN_PART_CHUNKS = 16


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
def _function(name: str, device_id: int, dynamic_smem: int = 0):
    """Kernel ``name`` on device ``device_id`` (launched with ``dynamic_smem`` bytes of dynamic shared memory), looked
    up once: a decode step's write is host-bound."""
    return _kernels.get_function(SOURCE.filename, name, dynamic_smem=dynamic_smem)


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, *, fp8: bool, k_scale: float,
                      v_scale: float) -> None:
    """Scatter ``key``/``value`` ``[T, H, D]`` (token-strided) into the caches; slots < 0 or out of range skipped.

    Needs ``num_blocks * block_size < 2**31`` and 16-byte aligned caches (checked by the caller). Picks the kernel
    by ``T`` alone (no look at the slots, so no device synchronisation).
    """
    if key.shape[0] == 0:
        return
    launch_write(write_plan(key, value, value_cache, slot_mapping, fp8=fp8, k_scale=k_scale, v_scale=v_scale),
                 key, value, key_cache, value_cache, slot_mapping)


def write_plan(key, value, value_cache, slot_mapping, *, fp8: bool, k_scale: float, v_scale: float,
               kernel: str | None = None) -> tuple:
    """``(kernel, grid, block, shared bytes, arguments before the alignment flag, arguments after it)`` of the write
    of ``key``/``value`` ``[T >= 1, H, D]`` into caches shaped like ``value_cache``. Depends on shapes, strides,
    dtypes, the scales and the device only; a caller repeating a write of one signature (the backend's decode fast
    path) keeps it and calls :func:`launch_write`. ``kernel`` ("tokens" / "tiles") overrides the choice by ``T``
    (benchmarks)."""
    import cupy

    num_tokens, num_heads, head_size = key.shape
    args = _common_args(key, value, value_cache, k_scale, v_scale)
    device = cupy.cuda.runtime.getDevice()
    if kernel == "tokens" or (kernel is None and num_tokens <= SCATTER_MAX_TOKENS):
        # reshape_and_cache_tokens: one thread per (token, 16-byte key cache chunk)
        function = _function(_write_name("reshape_and_cache_tokens", key.dtype, fp8, slot_mapping.dtype), device)
        items = num_tokens * (num_heads * head_size // (16 if fp8 else 8))
        return function, (-(-items // _THREADS),), (_THREADS,), 0, args, ()
    # reshape_and_cache: one CTA per (16-token tile, range of heads), staged through shared memory.
    heads = _tile_heads(num_heads, head_size)
    part_chunks = heads * head_size // 8
    # Chunks are staged in 16-byte units XOR-swizzled within aligned groups of up to 8 (the largest power of two
    # dividing part_chunks); 8 chunks of each tensor per thread.
    swizzle_mask = min(8, part_chunks & -part_chunks) - 1
    threads = min(_THREADS, -(-2 * part_chunks // 32) * 32)
    smem = 2 * TILE_TOKENS * part_chunks * 16
    function = _function(_write_name("reshape_and_cache", key.dtype, fp8, slot_mapping.dtype), device, smem)
    # Full 16-slot segments get whole-row 16-byte value stores (the caller guarantees 16-byte aligned caches).
    full_segments = value_cache.shape[3] % TILE_TOKENS == 0
    return (function, (-(-num_tokens // TILE_TOKENS), num_heads // heads), (threads,), smem, args,
            (np.int32(full_segments), np.int32(part_chunks), np.int32(swizzle_mask)))


def launch_write(plan: tuple, key, value, key_cache, value_cache, slot_mapping) -> None:
    """Launch a :func:`write_plan` on these arrays (same signature as the plan's)."""
    kernel, grid, block, smem, args, tail = plan
    # 16-byte loads need every row start aligned (pointers change between calls); otherwise element loads.
    aligned = np.int32((key.data.ptr | value.data.ptr | key.strides[0] | value.strides[0]) & 15 == 0)
    kernel(grid, block, (key, value, key_cache, value_cache, slot_mapping, *args, aligned, *tail), shared_mem=smem)


def launch_tokens(key, value, key_cache, value_cache, slot_mapping, *, fp8: bool, k_scale: float,
                  v_scale: float) -> None:
    """The write through reshape_and_cache_tokens whatever ``T`` (>= 1)."""
    launch_write(write_plan(key, value, value_cache, slot_mapping, fp8=fp8, k_scale=k_scale, v_scale=v_scale,
                            kernel="tokens"), key, value, key_cache, value_cache, slot_mapping)


def launch_tiles(key, value, key_cache, value_cache, slot_mapping, *, fp8: bool, k_scale: float,
                 v_scale: float) -> None:
    """The write through reshape_and_cache (tiles) whatever ``T`` (>= 1)."""
    launch_write(write_plan(key, value, value_cache, slot_mapping, fp8=fp8, k_scale=k_scale, v_scale=v_scale,
                            kernel="tiles"), key, value, key_cache, value_cache, slot_mapping)


def _common_args(key, value, value_cache, k_scale, v_scale) -> tuple:
    """The kernel arguments after slot_mapping up to v_inv, shared by both write kernels."""
    num_tokens, num_heads, head_size = key.shape
    isz = key.dtype.itemsize
    block_size = value_cache.shape[3]
    # fp8 divides by the scale through a multiply by RN(1 / scale) plus an fma correction (see kv_cache.cu).
    k_scale, v_scale = np.float32(k_scale), np.float32(v_scale)
    return (np.int64(key.strides[0] // isz), np.int64(value.strides[0] // isz), np.int32(num_tokens),
            np.int32(num_heads), np.int32(head_size), np.int32(block_size),
            np.int32(value_cache.shape[0] * block_size), k_scale, np.float32(1) / k_scale, v_scale,
            np.float32(1) / v_scale)


@functools.cache
def _tile_heads(num_heads: int, head_size: int) -> int:
    """Heads per reshape_and_cache CTA: the fewest (a divisor of num_heads) covering MIN_PART_CHUNKS chunks."""
    return min((h for h in range(1, num_heads + 1)
                if num_heads % h == 0 and h * head_size // 8 >= MIN_PART_CHUNKS), default=num_heads)


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
