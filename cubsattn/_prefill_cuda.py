"""Launchers for cuda_src/prefill.cu and prefill_paged.cu: support checks, the cached tile schedule, one launch.

:func:`prefill` is called by :func:`cubsattn.blocksparse_prefill` after its generic validation. Host work per call is
a cache lookup keyed by the cu_seqlens bytes (the schedule is built once with NumPy and uploaded), the stride checks,
and the launch. :func:`prefill_paged` is chunked prefill / prefix caching over vLLM's paged KV cache: it validates
its own arguments, then launches the paged kernel (CuPy) or gathers the contexts (NumPy reference).
"""

from __future__ import annotations

import collections
import math

import numpy as np

from . import _kernels
from . import kv_cache as _kv
from ._checks import (ATTENTION_DTYPES, GPU_ATTENTION_DTYPES, array_module, check_array, check_cu_seqlens,
                      check_int_array, dtype_name, to_host)
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

_SMEM_SET: set = set()
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
    """Cached device int32 array ``[2 * num_tiles + 2 * (batch + 1)]``: tiles, then cu_q, then cu_k."""
    key = (cupy.cuda.Device().id, block_m, cu_q.tobytes(), cu_k.tobytes())
    hit = _SCHEDULES.get(key)
    if hit is not None:
        _SCHEDULES.move_to_end(key)
        return hit
    tiles = tile_schedule(cu_q, cu_k, block_m)
    host = np.concatenate([tiles.ravel(), cu_q.astype(np.int32), cu_k.astype(np.int32)])
    entry = (cupy.asarray(host), tiles.shape[0])
    _SCHEDULES[key] = entry
    if len(_SCHEDULES) > _SCHEDULE_CACHE_SIZE:
        _SCHEDULES.popitem(last=False)
    return entry


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
    schedule, num_tiles = _device_schedule(cupy, cu_q, cu_k, block_m)
    if num_tiles == 0:
        return out
    batch = cu_q.shape[0] - 1
    tiles = schedule[:2 * num_tiles]
    dev_cu_q = schedule[2 * num_tiles:2 * num_tiles + batch + 1]
    dev_cu_k = schedule[2 * num_tiles + batch + 1:]
    indptr, indices = layout.csr(cupy)

    name = kernel_name(q.dtype, head_size, tile)
    kernel = _kernels.get_function(SOURCE.filename, name)
    smem = _smem_bytes(head_size, tile, q.dtype.itemsize)
    key = (cupy.cuda.Device().id, name)
    if key not in _SMEM_SET:  # over 48 KB needs the opt-in attribute (once per kernel and device)
        kernel.max_dynamic_shared_size_bytes = smem
        _SMEM_SET.add(key)
    # The kernel needs scale > 0 (it scales inside exp2 with one FFMA and keeps -inf masks). scale 0 runs as
    # 1e-30: every finite score then gives 2^0 = 1 exactly in fp32, i.e. a uniform average. A negative scale runs
    # on -q (a temporary copy) with |scale|.
    if scale < 0:
        q = (-q.astype(cupy.float32)).astype(q.dtype)
        q_tok, q_head = _element_strides("q", q)
        strides[0] = (q_tok, q_head)
    scale_log2 = np.float32(abs(scale) * math.log2(math.e) if scale != 0 else 1e-30)
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

def prefill_paged(q, k_new, v_new, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens,
                  layout: BlockSparseLayout, *, sm_scale=None, out=None, kv_cache_dtype: str = "auto",
                  k_scale=1.0, v_scale=1.0):
    """Block-sparse prefill whose sequences continue a context already in vLLM's paged KV cache.

    Sequence ``i`` has ``c = context_lens[i]`` cached tokens (positions ``0 .. c-1``, in the cache blocks
    ``block_tables[i, :ceil(c / block_size)]``) and ``n = q_len`` new tokens at positions ``c .. c+n-1`` whose
    queries, keys and values are the rows ``cu_seqlens_q[i] .. cu_seqlens_q[i+1]-1`` of ``q``, ``k_new``, ``v_new``.
    The new queries attend to cached + new keys with ``layout``'s block rule at absolute positions (causal).

    The result equals gathering each context with :func:`cubsattn.kv_cache.gather_kv` (fp8 codes dequantised as
    ``code * scale``), rounding it to q's dtype, appending the new keys and calling
    :func:`cubsattn.blocksparse_prefill` on that packed batch, which is what the NumPy path does. On CuPy the kernel
    reads the context in place through the block tables. New keys come from ``k_new`` / ``v_new``, never from the
    cache, so an fp8 cache quantises only the context (the new tokens may be written to the cache before or after).

    Parameters
    ----------
    q : ``[T, H_q, head_size]`` fp16 / bf16 (fp32 also on NumPy)
    k_new, v_new : ``[T, H_kv, head_size]``, q's dtype: keys / values of the new tokens
    key_cache : ``[num_blocks, H_kv, head_size // x, block_size, x]``; value_cache ``[num_blocks, H_kv, head_size,
        block_size]`` (:func:`cubsattn.kv_cache.split_kv_cache` views). q's dtype for ``kv_cache_dtype="auto"``, uint8
        E4M3 codes for "fp8" / "fp8_e4m3". CUDA: ``block_size`` in CACHE_BLOCK_SIZES.
    block_tables : int ``[batch, max_blocks]`` (NumPy or CuPy), cache block ids per sequence; only the first
        ``ceil(context_lens[i] / block_size)`` entries of row ``i`` are read (and checked).
    cu_seqlens_q : int ``[batch + 1]`` (NumPy or CuPy), cumulative new-token counts.
    context_lens : int ``[batch]`` (NumPy or CuPy), cached tokens per sequence (>= 0).
    layout : BlockSparseLayout with ``num_heads == H_q``; ``context_len + q_len <= layout.max_seqlen``.
    sm_scale : float, optional. None means ``1 / sqrt(head_size)``.
    out : ``[T, H_q, head_size]`` of q's dtype, optional; written in place and returned.
    kv_cache_dtype : "auto", "fp8" or "fp8_e4m3".
    k_scale, v_scale : float > 0, fp8 dequantisation scales (ignored for "auto").

    Returns
    -------
    out : ``[T, H_q, head_size]`` in q's dtype, on q's side.

    Raises ValueError (shapes, lengths, block ids, strides), TypeError (dtypes, mixed NumPy / CuPy data) and, on
    CuPy, NotImplementedError for head / sparse-block / cache-block sizes the kernel is not compiled for, all before
    any launch. The integer arguments are read on the host (one synchronisation each if they live on the GPU).
    """
    xp = array_module(q, k_new, v_new, key_cache, value_cache, out)
    for name, a in (("q", q), ("k_new", k_new), ("v_new", v_new)):
        check_array(name, a, ndim=3)
    check_array("q", q, dtypes=GPU_ATTENTION_DTYPES if xp is not np else ATTENTION_DTYPES)
    num_tokens, num_heads, head_size = q.shape
    num_kv_heads = k_new.shape[1]
    for name, a in (("k_new", k_new), ("v_new", v_new)):
        if a.dtype != q.dtype:
            raise TypeError(f"{name} dtype ({dtype_name(a.dtype)}) must equal q dtype ({dtype_name(q.dtype)})")
        check_array(name, a, shape=(num_tokens, num_kv_heads, head_size))
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads of q ({num_heads}) must be a multiple of num_kv_heads of k_new ({num_kv_heads})")
    cache_dtype = _kv.kv_cache_element_dtype(q.dtype, kv_cache_dtype)  # ValueError for unknown kv_cache_dtype
    fp8 = kv_cache_dtype != "auto"
    x = 16 // cache_dtype.itemsize
    check_array("key_cache", key_cache, ndim=5)
    if key_cache.dtype != cache_dtype:
        raise TypeError(f"key_cache dtype ({dtype_name(key_cache.dtype)}) must be {dtype_name(cache_dtype)} for "
                        f"kv_cache_dtype {kv_cache_dtype!r} and q dtype {dtype_name(q.dtype)}")
    num_cache_blocks, _, _, cache_block, _ = key_cache.shape
    check_array("key_cache", key_cache, shape=(None, num_kv_heads, head_size // x, None, x))
    if head_size % x:
        raise ValueError(f"head_size ({head_size}) must be a multiple of x = {x} for a {dtype_name(cache_dtype)} cache")
    if value_cache.dtype != key_cache.dtype:
        raise TypeError(f"value_cache dtype ({dtype_name(value_cache.dtype)}) must equal key_cache dtype "
                        f"({dtype_name(key_cache.dtype)})")
    check_array("value_cache", value_cache, shape=(num_cache_blocks, num_kv_heads, head_size, cache_block))
    # The scales matter only for fp8 (vLLM ignores them for 16-bit caches).
    k_scale, v_scale = (_kv._scale("k_scale", k_scale), _kv._scale("v_scale", v_scale)) if fp8 else (1.0, 1.0)
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if layout.num_heads != num_heads:
        raise ValueError(f"layout has {layout.num_heads} heads but q has {num_heads}")

    check_int_array("cu_seqlens_q", cu_seqlens_q)
    cu_q = check_cu_seqlens("cu_seqlens_q", to_host(cu_seqlens_q), num_tokens)
    batch = cu_q.shape[0] - 1
    check_int_array("context_lens", context_lens)
    context = to_host(context_lens).astype(np.int64)
    if context.shape != (batch,):
        raise ValueError(f"context_lens must have shape [batch] = [{batch}], got {list(context.shape)}")
    if (context < 0).any():
        i = int(np.argmax(context < 0))
        raise ValueError(f"context_lens[{i}] ({int(context[i])}) must be >= 0")
    k_lens = context + np.diff(cu_q)
    if k_lens.size and k_lens.max() > layout.max_seqlen:
        i = int(np.argmax(k_lens))
        raise ValueError(f"sequence {i}: context_len + q_len ({int(k_lens[i])}) must be <= max_seqlen "
                         f"({layout.max_seqlen})")
    check_int_array("block_tables", block_tables, ndim=2)
    tables = to_host(block_tables)
    if tables.shape[0] != batch:
        raise ValueError(f"block_tables has {tables.shape[0]} rows but cu_seqlens_q describes {batch} sequences")
    used = -(-context // cache_block)
    if used.size and used.max() > tables.shape[1]:
        i = int(np.argmax(used))
        raise ValueError(f"sequence {i}: context_len {int(context[i])} needs {int(used[i])} cache blocks of "
                         f"{cache_block}, but block_tables has {tables.shape[1]} columns")
    live = np.arange(tables.shape[1]) < used[:, None]
    bad = live & ((tables < 0) | (tables >= num_cache_blocks))
    if bad.any():
        i, j = (int(t[0]) for t in np.nonzero(bad))
        raise ValueError(f"block_tables[{i}, {j}] ({int(tables[i, j])}) is not a cache block id in "
                         f"[0, {num_cache_blocks})")
    if out is not None:
        check_array("out", out, shape=tuple(q.shape))
        if out.dtype != q.dtype:
            raise TypeError(f"out dtype ({dtype_name(out.dtype)}) must equal q dtype ({dtype_name(q.dtype)})")
    scale = 1.0 / math.sqrt(head_size) if sm_scale is None else float(sm_scale)
    cu_k = np.concatenate(([0], np.cumsum(k_lens))).astype(np.int64)
    if xp is np:
        return _prefill_paged_numpy(q, k_new, v_new, key_cache, value_cache, tables, cu_q, cu_k, context, layout,
                                    scale, out, kv_cache_dtype, k_scale, v_scale)
    return _prefill_paged_cuda(q, k_new, v_new, key_cache, value_cache, block_tables, tables, cu_q, cu_k, layout,
                               scale, out, fp8, k_scale, v_scale)


def _prefill_paged_numpy(q, k_new, v_new, key_cache, value_cache, tables, cu_q, cu_k, context, layout, scale, out,
                         kv_cache_dtype, k_scale, v_scale):
    """The reference: gathered, dequantised contexts (rounded to q's dtype) + new keys, through the NumPy prefill."""
    from . import _prefill_numpy

    ks, vs = [], []
    for i, c in enumerate(context.tolist()):
        if c:
            kc, vc = _kv.gather_kv(key_cache, value_cache, tables[i], c, kv_cache_dtype=kv_cache_dtype,
                                   k_scale=k_scale, v_scale=v_scale)
            ks.append(kc.astype(q.dtype))
            vs.append(vc.astype(q.dtype))
        ks.append(k_new[cu_q[i]:cu_q[i + 1]])
        vs.append(v_new[cu_q[i]:cu_q[i + 1]])
    return _prefill_numpy.prefill(q, np.concatenate(ks), np.concatenate(vs), cu_q, cu_k, layout, scale, out)


def _prefill_paged_cuda(q, k_new, v_new, key_cache, value_cache, block_tables, tables_host, cu_q, cu_k, layout,
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
    schedule, num_tiles = _device_schedule(cupy, cu_q, cu_k, block_m)
    if num_tiles == 0:
        return out
    batch = cu_q.shape[0] - 1
    tiles = schedule[:2 * num_tiles]
    dev_cu_q = schedule[2 * num_tiles:2 * num_tiles + batch + 1]
    dev_cu_k = schedule[2 * num_tiles + batch + 1:]
    indptr, indices = layout.csr(cupy)
    if (isinstance(block_tables, cupy.ndarray) and block_tables.dtype == np.int32
            and block_tables.flags.c_contiguous):
        dev_tables = block_tables
    else:
        dev_tables = cupy.asarray(np.ascontiguousarray(tables_host, dtype=np.int32))
    if dev_tables.shape[1] == 0:  # no context anywhere: the kernel never reads the table
        dev_tables = cupy.zeros((batch, 1), np.int32)

    name = paged_kernel_name(q.dtype, fp8, head_size)
    kernel = _kernels.get_function(PAGED_SOURCE.filename, name)
    smem = _smem_bytes(head_size, tile, q.dtype.itemsize, paged=True)
    key = (cupy.cuda.Device().id, name)
    if key not in _SMEM_SET:
        kernel.max_dynamic_shared_size_bytes = smem
        _SMEM_SET.add(key)
    if scale < 0:  # as in prefill(): the kernel needs scale > 0
        q = (-q.astype(cupy.float32)).astype(q.dtype)
        strides[0] = _element_strides("q", q)
    scale_log2 = np.float32(abs(scale) * math.log2(math.e) if scale != 0 else 1e-30)
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
