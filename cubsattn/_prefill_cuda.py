"""Launchers for cuda_src/prefill.cu and prefill_paged.cu: support checks, the cached tile schedule, one launch.

:func:`prefill` is called by :func:`cubsattn.blocksparse_prefill` after its generic validation. Host work per call is
a cache lookup keyed by the cu_seqlens bytes (the schedule is built once with NumPy and uploaded), the stride checks,
and the launch. :func:`prefill_paged` launches the paged-K/V kernel for :func:`cubsattn.blocksparse_prefill_paged`
(chunked prefill / prefix caching over vLLM's paged KV cache) after that function's validation.
"""

from __future__ import annotations

import collections
import math

import numpy as np

from . import _kernels
from .layout import BlockSparseLayout

#: Head sizes compiled into prefill.cu.
HEAD_SIZES = (64, 80, 96, 128, 256)
#: Sparse block sizes the kernel supports (powers of two: the key walk and masks use shifts).
BLOCK_SIZES = (16, 32, 64, 128)
#: CTA tile per head size: (BLOCK_M query rows, WARPS, BLOCK_N keys per K/V tile). With 4 warps of 32 rows each,
#: every K/V fragment read from shared memory feeds two MMAs: on an H200 (Phi-3-small, bf16, D=128) 128x64 with 4
#: warps gave 223 / 247 / 276 useful TF/s on prefill-4k / 16k / 64k (ptxas spills 52 bytes per thread), against
#: 206 / 225 / 250 for the spill-free 128x32; 128x64 with 8 warps of 16 rows and 64x64 with 4 warps ran 20-25%
#: slower (benchmarks/RESULTS.md). D = 96 uses 32-key tiles (64 spills more); D = 256 keeps 16 rows per warp (its
#: fp32 output accumulator alone is 128 registers per thread) and 32-key tiles (shared memory under 164 KB, sm_80).
TILES = {64: (128, 4, 64), 80: (128, 4, 64), 96: (128, 4, 32), 128: (128, 4, 64), 256: (64, 4, 32)}

_DTYPES = tuple(_kernels.CTYPE)


def kernel_name(dtype, head_size: int, tile: tuple[int, int, int]) -> str:
    """Template instantiation name of the kernel for ``dtype`` / ``head_size`` / ``tile`` (see TILES)."""
    return f"blocksparse_prefill<{_kernels.ctype(dtype)}, {head_size}, {', '.join(str(x) for x in tile)}>"


#: (head_size, tile) pairs compiled: the defaults, plus D=128 alternatives for ``bench_prefill.py --tile``.
INSTANTIATIONS = tuple((d, TILES[d]) for d in HEAD_SIZES) + tuple(
    (128, t) for t in ((128, 8, 64), (128, 4, 32), (64, 4, 64)))

SOURCE = _kernels.register(_kernels.KernelSource(
    "prefill.cu", tuple(kernel_name(dt, d, t) for dt in _DTYPES for d, t in INSTANTIATIONS)))

#: Cache block sizes the paged kernel reads: powers of two >= 8 (an 8-slot value chunk never crosses a block).
CACHE_BLOCK_SIZES = (8, 16, 32, 64, 128, 256)
#: Tiles of the paged kernel (the default tiles; TILES may be changed for benchmarking the contiguous kernel).
PAGED_TILES = dict(TILES)
_FP8_CTYPE = "unsigned char"


def paged_kernel_name(dtype, fp8: bool, head_size: int) -> str:
    """Instantiation name of the paged kernel for query ``dtype``, cache kind and ``head_size``."""
    ct = _kernels.ctype(dtype)
    tile = ", ".join(str(x) for x in PAGED_TILES[head_size])
    return f"blocksparse_prefill_paged<{ct}, {_FP8_CTYPE if fp8 else ct}, {head_size}, {tile}>"


PAGED_SOURCE = _kernels.register(_kernels.KernelSource(
    "prefill_paged.cu", tuple(paged_kernel_name(dt, fp8, d) for dt in _DTYPES for fp8 in (False, True)
                              for d in HEAD_SIZES)))


def _smem_bytes(head_size: int, tile: tuple[int, int, int], itemsize: int, *, paged: bool = False) -> int:
    """Dynamic shared memory of one CTA: Q tile + 2 stages of K and V, rows padded by 8 elements (Config).

    Paged: a V stage holds either V rows ``[BLOCK_N][D + 8]`` or cached V^T rows ``[D][BLOCK_N + 8]``.
    """
    block_m, _, block_n = tile
    v_stage = max(block_n * (head_size + 8), head_size * (block_n + 8)) if paged else block_n * (head_size + 8)
    return ((block_m + 2 * block_n) * (head_size + 8) + 2 * v_stage) * itemsize


# ---- tile schedule -----------------------------------------------------------------------------------------------

_SCHEDULES: collections.OrderedDict = collections.OrderedDict()
_SCHEDULE_CACHE_SIZE = 64


def tile_schedule(cu_q: np.ndarray, cu_k: np.ndarray, block_m: int) -> np.ndarray:
    """Query tiles of a batch, heaviest first: int32 ``[num_tiles, 2]`` of (sequence, first absolute position).

    Tiles are aligned to absolute positions (multiples of ``block_m``), so a tile's rows fall in whole CSR rows;
    sequence ``i`` contributes the tiles covering its query positions ``[k_len - q_len, k_len)``. The order is by
    descending key span (tile end), a proxy for work that is exact in order for causal and local-strided layouts.
    """
    q_lens = np.diff(cu_q)
    k_lens = np.diff(cu_k)
    past = k_lens - q_lens
    first = past // block_m
    counts = np.where(q_lens > 0, (k_lens - 1) // block_m - first + 1, 0)
    seq = np.repeat(np.arange(q_lens.size, dtype=np.int64), counts)
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    start = (np.arange(seq.size, dtype=np.int64) - offsets + first[seq]) * block_m
    span = np.minimum(start + block_m, k_lens[seq])
    order = np.argsort(-span, kind="stable")
    return np.stack([seq[order], start[order]], axis=1).astype(np.int32)


def _device_schedule(cupy, cu_q: np.ndarray, cu_k: np.ndarray, block_m: int):
    """``(num_tiles, tiles, cu_q, cu_k)`` as device int32 views of one cached upload
    ``[2 * num_tiles + 2 * (batch + 1)]``."""
    key = (cupy.cuda.Device().id, block_m, cu_q.tobytes(), cu_k.tobytes())
    entry = _SCHEDULES.get(key)
    if entry is not None:
        _SCHEDULES.move_to_end(key)
    else:
        tiles = tile_schedule(cu_q, cu_k, block_m)
        host = np.concatenate([tiles.ravel(), cu_q.astype(np.int32), cu_k.astype(np.int32)])
        entry = _SCHEDULES[key] = (cupy.asarray(host), tiles.shape[0])
        if len(_SCHEDULES) > _SCHEDULE_CACHE_SIZE:
            _SCHEDULES.popitem(last=False)
    schedule, num_tiles = entry
    end_q = 2 * num_tiles + cu_q.shape[0]
    return num_tiles, schedule[:2 * num_tiles], schedule[2 * num_tiles:end_q], schedule[end_q:]


def _positive_scale(q, scale: float, strides: list):
    """``(q, strides, scale * log2 e as float32)`` for kernels that need a positive scale (they fold it into one
    FFMA inside exp2 and keep -inf masks). Scale 0 runs as 1e-30: every finite score then gives 2^0 = 1 exactly in
    fp32, i.e. a uniform average. A negative scale runs on -q (a temporary copy; ``strides[0]`` updated) with
    ``|scale|``."""
    if scale < 0:
        q = (-q.astype(np.float32)).astype(q.dtype)
        strides = [_element_strides("q", q), *strides[1:]]
    return q, strides, np.float32(abs(scale) * math.log2(math.e) if scale != 0 else 1e-30)


# ---- checks ------------------------------------------------------------------------------------------------------

def _element_strides(name: str, a) -> tuple[int, int]:
    """(token, head) strides in elements of a 3-D array whose rows can be read with 16-byte copies.

    Raises ValueError unless the last dim is contiguous, both other strides are non-negative multiples of 8
    elements and the data pointer is 16-byte aligned (e.g. q/k/v slices of a fused ``[T, H + 2 H_kv, D]`` qkv).
    """
    item = a.dtype.itemsize
    s_tok, s_head, s_dim = (int(s) for s in a.strides)
    if a.shape[2] > 1 and s_dim != item:
        raise ValueError(f"{name} must have a contiguous last dimension (head_size), got strides {a.strides} "
                         f"bytes for shape {list(a.shape)}")
    for what, s in (("token", s_tok), ("head", s_head)):
        if s < 0 or s % (8 * item):
            raise ValueError(f"{name} {what} stride ({s // item if s % item == 0 else s / item} elements) must be "
                             f"a non-negative multiple of 8 elements (16-byte rows)")
        if s // item >= 2**31:  # the kernel multiplies positions by 32-bit strides
            raise ValueError(f"{name} {what} stride ({s // item} elements) must be < 2**31")
    if a.data.ptr % 16:
        raise ValueError(f"{name} data pointer must be 16-byte aligned, got address {a.data.ptr:#x}")
    return s_tok // item, s_head // item


def check_supported(head_size: int, block_size: int) -> None:
    """NotImplementedError for head sizes / block sizes prefill.cu is not compiled for."""
    if head_size not in HEAD_SIZES:
        raise NotImplementedError(f"head_size {head_size} is not compiled for the CUDA prefill kernel; "
                                  f"supported: {HEAD_SIZES}")
    if block_size not in BLOCK_SIZES:
        raise NotImplementedError(f"block_size {block_size} is not supported by the CUDA prefill kernel; "
                                  f"supported: {BLOCK_SIZES}")


# ---- launch ------------------------------------------------------------------------------------------------------

def prefill(q, k, v, cu_q: np.ndarray, cu_k: np.ndarray, layout: BlockSparseLayout, scale: float, out):
    """Fill ``out [T_q, H_q, D]`` (CuPy, q's dtype) with block-sparse attention and return it.

    Arguments were validated by :func:`cubsattn.blocksparse_prefill`; ``cu_q`` / ``cu_k`` are host int64
    ``[batch + 1]``, ``scale`` the softmax scale. Raises NotImplementedError / ValueError before any launch for
    unsupported head or block sizes and unusable strides.
    """
    import cupy

    num_q_tokens, num_heads, head_size = q.shape
    num_kv_heads = k.shape[1]
    block_size = layout.block_size
    check_supported(head_size, block_size)
    strides = [_element_strides(name, a) for name, a in (("q", q), ("k", k), ("v", v), ("out", out))]
    if max(int(cu_q[-1]), int(cu_k[-1])) >= 2**31:
        raise ValueError(f"at most 2**31 - 1 tokens per call, got {int(cu_q[-1])} queries and {int(cu_k[-1])} keys")
    if num_q_tokens == 0:
        return out
    tile = TILES[head_size]
    block_m, warps = tile[:2]
    num_tiles, tiles, dev_cu_q, dev_cu_k = _device_schedule(cupy, cu_q, cu_k, block_m)
    if num_tiles == 0:
        return out
    indptr, indices = layout.csr(cupy)

    smem = _smem_bytes(head_size, tile, q.dtype.itemsize)
    kernel = _kernels.get_function(SOURCE.filename, kernel_name(q.dtype, head_size, tile), dynamic_smem=smem)
    q, strides, scale_log2 = _positive_scale(q, scale, strides)
    (q_tok, q_head), (k_tok, k_head), (v_tok, v_head), (o_tok, o_head) = strides
    kernel((num_tiles * num_heads,), (warps * 32,),
           (q, np.int64(q_tok), np.int32(q_head),
            k, np.int64(k_tok), np.int32(k_head),
            v, np.int64(v_tok), np.int32(v_head),
            out, np.int64(o_tok), np.int32(o_head),
            tiles, dev_cu_q, dev_cu_k, indptr, indices,
            np.int32(num_heads), np.int32(num_heads // num_kv_heads), np.int32(layout.num_blocks),
            np.int32(indices.shape[1]), np.int32(block_size), scale_log2),
           shared_mem=smem)
    return out


# ---- paged K/V (chunked prefill / prefix caching) ----------------------------------------------------------------

def prefill_paged(q, k_new, v_new, key_cache, value_cache, block_tables, tables_host, cu_q, cu_k, layout,
                        scale, out, fp8, k_scale, v_scale):
    import cupy

    num_tokens, num_heads, head_size = q.shape
    num_kv_heads = k_new.shape[1]
    block_size = layout.block_size
    cache_block = key_cache.shape[3]
    check_supported(head_size, block_size)
    if cache_block not in CACHE_BLOCK_SIZES:
        raise NotImplementedError(f"cache block_size {cache_block} is not supported by the paged CUDA prefill "
                                  f"kernel; supported: {CACHE_BLOCK_SIZES}")
    if out is None:
        out = cupy.empty_like(q)
    strides = [_element_strides(name, a) for name, a in (("q", q), ("k_new", k_new), ("v_new", v_new), ("out", out))]
    for name, a in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (split_kv_cache views of a whole-layer cache are)")
        if a.data.ptr % 16:
            raise ValueError(f"{name} data pointer must be 16-byte aligned, got address {a.data.ptr:#x}")
    if int(cu_k[-1]) >= 2**31:
        raise ValueError(f"at most 2**31 - 1 keys per call (context + new), got {int(cu_k[-1])}")
    if num_tokens == 0:
        return out
    tile = PAGED_TILES[head_size]
    block_m, warps = tile[:2]
    num_tiles, tiles, dev_cu_q, dev_cu_k = _device_schedule(cupy, cu_q, cu_k, block_m)
    if num_tiles == 0:
        return out
    batch = cu_q.shape[0] - 1
    indptr, indices = layout.csr(cupy)
    if (isinstance(block_tables, cupy.ndarray) and block_tables.dtype == np.int32
            and block_tables.flags.c_contiguous):
        dev_tables = block_tables
    else:
        dev_tables = cupy.asarray(np.ascontiguousarray(tables_host, dtype=np.int32))
    if dev_tables.shape[1] == 0:  # no context anywhere: the kernel never reads the table
        dev_tables = cupy.zeros((batch, 1), np.int32)

    smem = _smem_bytes(head_size, tile, q.dtype.itemsize, paged=True)
    kernel = _kernels.get_function(PAGED_SOURCE.filename, paged_kernel_name(q.dtype, fp8, head_size),
                                   dynamic_smem=smem)
    q, strides, scale_log2 = _positive_scale(q, scale, strides)
    (q_tok, q_head), (k_tok, k_head), (v_tok, v_head), (o_tok, o_head) = strides
    kernel((num_tiles * num_heads,), (warps * 32,),
           (q, np.int64(q_tok), np.int32(q_head),
            k_new, np.int64(k_tok), np.int32(k_head),
            v_new, np.int64(v_tok), np.int32(v_head),
            out, np.int64(o_tok), np.int32(o_head),
            key_cache, value_cache, dev_tables, np.int32(dev_tables.shape[1]),
            np.int64(num_kv_heads * head_size * cache_block), np.int32(head_size * cache_block),
            np.int32(cache_block.bit_length() - 1), np.float32(k_scale), np.float32(v_scale),
            tiles, dev_cu_q, dev_cu_k, indptr, indices,
            np.int32(num_heads), np.int32(num_heads // num_kv_heads), np.int32(layout.num_blocks),
            np.int32(indices.shape[1]), np.int32(block_size), scale_log2),
           shared_mem=smem)
    return out
