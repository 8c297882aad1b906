"""Block-sparse paged decode: one new query token per sequence attends to its paged KV cache (vLLM's
``PagedAttention.forward_decode`` with ``blocksparse_*`` arguments, SPEC section 8).

NumPy arrays run a NumPy implementation (fp32 arithmetic); CuPy arrays run ``cuda_src/decode.cu``.
"""

from __future__ import annotations

import math
import numbers
import sys

import ml_dtypes
import numpy as np

from . import _decode_cuda  # the CUDA launchers; importing them needs no GPU
from ._checks import (ATTENTION_DTYPES, GPU_ATTENTION_DTYPES, array_module, as_array, check_array, check_int,
                      check_int_array, dtype_name)
from .layout import _rule, stripe_offsets

HEAD_SIZES = (64, 80, 96, 128, 256)
CACHE_BLOCK_SIZES = (8, 16, 32)
#: kv_cache_dtype strings meaning an fp8 E4M3 (fn) cache stored as uint8.
FP8_E4M3 = ("fp8", "fp8_e4m3")
#: Longest split count a caller may force: it bounds the split workspace (num_seqs x num_heads x num_splits x
#: head_size floats) and the serial merge done by each row's last split CTA.
MAX_NUM_SPLITS = 4096


def get_supported_head_sizes() -> list[int]:
    """Head sizes the decode kernel is compiled for."""
    return list(HEAD_SIZES)


def forward_decode(query, key_cache, value_cache, block_tables, seq_lens, max_seq_len, kv_cache_dtype, num_kv_heads,
                   scale, alibi_slopes=None, k_scale=1.0, v_scale=1.0, tp_rank=0, blocksparse_local_blocks=0,
                   blocksparse_vert_stride=0, blocksparse_block_size=64, blocksparse_head_sliding_step=0, *,
                   out=None, num_splits=None):
    """Attention of one query token per sequence over its paged KV cache, skipping the blocks the sparse rule drops.

    For sequence ``s`` of length ``L = seq_lens[s]`` the query (at position ``L - 1``) of query head ``h`` attends to
    the cached tokens ``0 .. L-1`` whose sparse block ``kb = token // blocksparse_block_size`` is active for query
    block ``qb = (L - 1) // blocksparse_block_size``: ``qb - kb < local_blocks`` or ``(kb + offset) % vert_stride
    == 0``, with ``offset = (tp_rank * H_q + h) * step + 1`` for ``step >= 0`` and ``offset = (tp_rank * H_kv +
    h // (H_q / H_kv)) * (-step) + 1`` for a negative step (stripes slide per kv head). ``vert_stride <= 1`` means
    dense attention over all ``L`` tokens.

    Parameters
    ----------
    query : float16 / bfloat16 array ``[num_seqs, num_heads, head_size]``
        (float32 too on the NumPy backend). On the GPU the last axis must be contiguous.
    key_cache : array ``[num_blocks, num_kv_heads, head_size / x, block_size, x]``
        vLLM's key cache, ``x = 16 // itemsize``; the query dtype for ``kv_cache_dtype="auto"``, uint8 for fp8.
    value_cache : array ``[num_blocks, num_kv_heads, head_size, block_size]``
        vLLM's value cache, same dtype as ``key_cache``.
    block_tables : int array ``[num_seqs, max_blocks_per_seq]``
        Physical cache block of each logical block; entries past a sequence's end are never read.
    seq_lens : int array ``[num_seqs]``
        Tokens in each sequence's cache, the new token included. With the GPU backend both index arrays may be NumPy
        (validated, then copied to the device) or CuPy (int32 used in place; never read on the host).
    max_seq_len : int
        Longest sequence allowed. Host ``seq_lens`` above it raise ValueError; device ``seq_lens`` are clamped to it
        (and to the block table's width), so the kernel never reads outside the cache.
    kv_cache_dtype : {"auto", "fp8", "fp8_e4m3"}
        ``"auto"``: the cache holds the query dtype. fp8: E4M3 (fn) bytes, dequantised as ``value * k_scale`` (keys)
        and ``value * v_scale`` (values).
    num_kv_heads : int
        Must equal ``key_cache.shape[1]`` and divide ``num_heads`` (group sizes up to 8 on the GPU).
    scale : float or None
        Softmax scale; None means ``1 / sqrt(head_size)`` (an explicit 0.0 is honoured).
    alibi_slopes : None
        Not supported (block-sparse attention never uses ALiBi); anything but None raises ValueError.
    k_scale, v_scale : float
        Dequantisation scales of an fp8 cache; ignored for an "auto" cache, as in vLLM.
    tp_rank : int
        Tensor-parallel rank; global query head = ``tp_rank * num_heads + h``.
    blocksparse_local_blocks, blocksparse_vert_stride, blocksparse_block_size, blocksparse_head_sliding_step : int
        The sparse rule (vLLM's names). When ``vert_stride > 1``: ``local_blocks >= 1`` and ``block_size`` a
        multiple of the cache block size.
    out : array ``[num_seqs, num_heads, head_size]``, optional
        Output buffer (query dtype, C-contiguous); pass one to capture the GPU call in a CUDA graph.
    num_splits : int, optional
        GPU only: force the number of split-KV partitions per sequence (None: heuristic from batch size, context
        length and SM count). A sequence shorter than the longest may use fewer.

    Returns
    -------
    array ``[num_seqs, num_heads, head_size]`` of the query dtype (``out`` when given).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 4, 64)).astype(np.float16)
    >>> kc = rng.standard_normal((4, 2, 8, 16, 8)).astype(np.float16)     # x = 8 for fp16
    >>> vc = rng.standard_normal((4, 2, 64, 16)).astype(np.float16)
    >>> o = forward_decode(q, kc, vc, np.array([[3, 0, 2]]), np.array([40]), 64, "auto", 2, None,
    ...                    blocksparse_local_blocks=1, blocksparse_vert_stride=2, blocksparse_block_size=16,
    ...                    blocksparse_head_sliding_step=1)
    >>> o.shape
    (1, 4, 64)
    """
    arrays = (query, key_cache, value_cache, block_tables, seq_lens, out)
    scalars = (max_seq_len, kv_cache_dtype, num_kv_heads, scale, k_scale, v_scale, tp_rank, blocksparse_local_blocks,
               blocksparse_vert_stride, blocksparse_block_size, blocksparse_head_sliding_step, num_splits)
    signature = _signature(arrays, scalars) if alibi_slopes is None else None
    if signature is None:  # not all CuPy arrays: foreign GPU arrays (torch, JAX, ...) become CuPy views first
        arrays = tuple(as_array(a) for a in arrays)
        signature = _signature(arrays, scalars) if alibi_slopes is None else None
    query, key_cache, value_cache, block_tables, seq_lens, out = arrays
    hit = _lookup(signature)
    if hit is not None:  # this exact argument signature passed every check before: launch its stored plan
        plan = hit[1]
        if out is None:
            out = sys.modules["cupy"].empty(query.shape, dtype=query.dtype)
        if plan is not None:
            _decode_cuda.launch_plan(plan, query, key_cache, value_cache, block_tables, seq_lens, out)
        return out

    xp = array_module(query, key_cache, value_cache, out)
    on_gpu = xp is not np
    if on_gpu:
        array_module(block_tables)  # TypeError for non-arrays; host or device index arrays are both fine
        array_module(seq_lens)
    else:
        array_module(query, block_tables, seq_lens)

    check_array("query", query, ndim=3, dtypes=GPU_ATTENTION_DTYPES if on_gpu else ATTENTION_DTYPES)
    num_seqs, num_heads, head_size = (int(n) for n in query.shape)
    if head_size not in HEAD_SIZES:
        raise NotImplementedError(f"head_size {head_size} is not compiled; supported: {list(HEAD_SIZES)}")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes must be None: block-sparse decode does not support ALiBi")

    fp8 = _check_kv_cache_dtype(kv_cache_dtype, query.dtype, key_cache, value_cache)
    x = 16 // key_cache.dtype.itemsize
    check_array("value_cache", value_cache, ndim=4)
    block_size = int(value_cache.shape[3])
    if block_size not in CACHE_BLOCK_SIZES:
        raise ValueError(f"cache block_size (value_cache.shape[3] = {block_size}) must be one of "
                         f"{list(CACHE_BLOCK_SIZES)}")
    num_kv_heads = check_int("num_kv_heads", num_kv_heads, minimum=1)
    num_cache_blocks = int(key_cache.shape[0]) if key_cache.ndim else 0
    check_array("key_cache", key_cache, shape=(None, num_kv_heads, head_size // x, block_size, x))
    check_array("value_cache", value_cache, shape=(num_cache_blocks, num_kv_heads, head_size, block_size))
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    group = num_heads // num_kv_heads
    if on_gpu and group > 8:
        raise NotImplementedError(f"num_heads / num_kv_heads ({group}) must be <= 8 on the GPU (compiled group "
                                  f"widths 4 and 8)")

    check_int_array("block_tables", block_tables, ndim=2)
    check_int_array("seq_lens", seq_lens, ndim=1)
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must have shape [{num_seqs}, *] (one row per sequence), got "
                         f"{list(block_tables.shape)}")
    if seq_lens.shape[0] != num_seqs:
        raise ValueError(f"seq_lens must have shape [{num_seqs}], got {list(seq_lens.shape)}")
    max_seq_len = check_int("max_seq_len", max_seq_len, minimum=1)
    scale = 1.0 / math.sqrt(head_size) if scale is None else _check_float("scale", scale)
    k_scale = _check_float("k_scale", k_scale) if fp8 else 1.0
    v_scale = _check_float("v_scale", v_scale) if fp8 else 1.0
    tp_rank = check_int("tp_rank", tp_rank, minimum=0)
    local_blocks = check_int("blocksparse_local_blocks", blocksparse_local_blocks)
    vert_stride = check_int("blocksparse_vert_stride", blocksparse_vert_stride)
    sparse_block = check_int("blocksparse_block_size", blocksparse_block_size)
    step = check_int("blocksparse_head_sliding_step", blocksparse_head_sliding_step)
    sparse = vert_stride > 1
    if sparse:
        if local_blocks < 1:
            raise ValueError(f"blocksparse_local_blocks must be >= 1 when blocksparse_vert_stride > 1, got "
                             f"{local_blocks}")
        if sparse_block < 1 or sparse_block % block_size:
            raise ValueError(f"blocksparse_block_size ({sparse_block}) must be a positive multiple of the cache "
                             f"block_size ({block_size})")

    if out is not None:
        check_array("out", out, dtypes=(query.dtype,), shape=(num_seqs, num_heads, head_size))
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
    if num_splits is not None:
        num_splits = check_int("num_splits", num_splits, minimum=1)
        if num_splits > MAX_NUM_SPLITS:
            raise ValueError(f"num_splits must be <= {MAX_NUM_SPLITS}, got {num_splits}")

    host_lens = isinstance(seq_lens, np.ndarray)
    context_len = max_seq_len
    if host_lens:
        lens = seq_lens.astype(np.int64)
        if (lens < 0).any():
            i = int(np.argmax(lens < 0))
            raise ValueError(f"seq_lens[{i}] ({int(lens[i])}) must be >= 0")
        if (lens > max_seq_len).any():
            i = int(np.argmax(lens > max_seq_len))
            raise ValueError(f"seq_lens[{i}] ({int(lens[i])}) must be <= max_seq_len ({max_seq_len})")
        need = -(-lens // block_size)
        if (need > block_tables.shape[1]).any():
            i = int(np.argmax(need > block_tables.shape[1]))
            raise ValueError(f"seq_lens[{i}] ({int(lens[i])}) needs {int(need[i])} cache blocks but block_tables "
                             f"has {block_tables.shape[1]} columns")
        if isinstance(block_tables, np.ndarray) and num_seqs:
            used = np.arange(block_tables.shape[1])[None, :] < need[:, None]
            bad = used & ((block_tables < 0) | (block_tables >= num_cache_blocks))
            if bad.any():
                s, j = (int(v[0]) for v in np.nonzero(bad))
                raise ValueError(f"block_tables[{s}, {j}] ({int(block_tables[s, j])}) must be in "
                                 f"[0, num_blocks = {num_cache_blocks})")
        context_len = max(int(lens.max(initial=0)), 1)

    rule = dict(tp_rank=tp_rank, local_blocks=local_blocks, vert_stride=vert_stride if sparse else 0,
                sparse_block=sparse_block if sparse else 1, sliding_step=step)
    if not on_gpu:
        if out is None:
            out = np.empty(query.shape, dtype=query.dtype)
        _decode_numpy(query, key_cache, value_cache, block_tables, seq_lens, out, fp8=fp8, scale=scale,
                      k_scale=k_scale, v_scale=v_scale, **rule)
        return out
    return _decode_cupy(query, key_cache, value_cache, block_tables, seq_lens, out, signature,
                        max_seq_len=max_seq_len, context_len=context_len, fp8=fp8, scale=scale, k_scale=k_scale,
                        v_scale=v_scale, num_splits=num_splits, **rule)


# ---------------------------------------------------------------------------------------------------------------
# Checks


def _check_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_kv_cache_dtype(kv_cache_dtype, query_dtype, key_cache, value_cache) -> bool:
    """True for an fp8 cache; checks both caches' dtype against ``kv_cache_dtype``."""
    check_array("key_cache", key_cache, ndim=5)
    check_array("value_cache", value_cache, ndim=4)
    if kv_cache_dtype == "auto":
        want, fp8 = np.dtype(query_dtype), False
    elif kv_cache_dtype in FP8_E4M3:
        want, fp8 = np.dtype(np.uint8), True
    elif kv_cache_dtype == "fp8_e5m2":
        raise NotImplementedError("kv_cache_dtype 'fp8_e5m2' is not supported; supported: 'auto', 'fp8', "
                                  "'fp8_e4m3'")
    else:
        raise ValueError(f"kv_cache_dtype must be one of 'auto', 'fp8', 'fp8_e4m3', got {kv_cache_dtype!r}")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if np.dtype(cache.dtype) != want:
            raise TypeError(f"{name} has dtype {dtype_name(cache.dtype)}, but kv_cache_dtype={kv_cache_dtype!r} "
                            f"with a {dtype_name(query_dtype)} query needs {dtype_name(want)}")
    return fp8


# ---------------------------------------------------------------------------------------------------------------
# NumPy backend


def _head_offsets(num_heads: int, num_kv_heads: int, tp_rank: int, step: int) -> np.ndarray:
    """Stripe offset of each of this rank's query heads (int64 ``[num_heads]``)."""
    start = tp_rank * num_heads
    return stripe_offsets((start, start + num_heads), step, start + num_heads,
                          (tp_rank + 1) * num_kv_heads)


def _dequantize(values: np.ndarray, fp8: bool) -> np.ndarray:
    """float32 copy of cache values (fp8 bytes decoded as E4M3 fn; the scale is applied by the caller)."""
    if fp8:
        return values.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return values.astype(np.float32)


def _decode_numpy(query, key_cache, value_cache, block_tables, seq_lens, out, *, fp8, scale, k_scale, v_scale,
                  tp_rank, local_blocks, vert_stride, sparse_block, sliding_step):
    num_seqs, num_heads, head_size = query.shape
    num_kv_heads, block_size = key_cache.shape[1], value_cache.shape[3]
    group = num_heads // num_kv_heads
    offsets = _head_offsets(num_heads, num_kv_heads, tp_rank, sliding_step)
    for s in range(num_seqs):
        length = int(seq_lens[s])
        if length <= 0:
            out[s] = 0
            continue
        tokens = np.arange(length)
        if vert_stride > 1:
            kb = tokens // sparse_block
            active = _rule((length - 1) // sparse_block, kb[None, :], offsets[:, None], local_blocks, vert_stride)
        else:
            active = np.ones((num_heads, length), dtype=bool)
        active = active.reshape(num_kv_heads, group, length)
        q = query[s].astype(np.float32)
        for kvh in range(num_kv_heads):
            # Gather only the tokens some head of the group needs: skipped cache slots are never touched.
            need = tokens[active[kvh].any(axis=0)]
            blk, off = np.asarray(block_tables[s], dtype=np.int64)[need // block_size], need % block_size
            k = _dequantize(key_cache[blk, kvh, :, off, :], fp8).reshape(need.size, head_size)  # [tokens, D]
            v = _dequantize(value_cache[blk, kvh, :, off], fp8)                                  # [tokens, D]
            heads = slice(kvh * group, (kvh + 1) * group)
            scores = q[heads] @ k.T * np.float32(scale * k_scale)                               # [group, tokens]
            scores = np.where(active[kvh][:, need], scores, np.float32(-np.inf))
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            o = p @ v * (np.float32(v_scale) / p.sum(axis=1, keepdims=True))
            out[s, heads] = o.astype(out.dtype)


# ---------------------------------------------------------------------------------------------------------------
# CuPy backend


#: ``(launch arguments, launch plan or None for zero sequences)`` of GPU calls that passed validation, keyed by their
#: argument signature (``_signature``): a repeated decode step skips ~25 checks and the plan lookup, which cost more
#: host time than a small step takes on the GPU (and the per-call bandwidth of a large one measures it: 1 us is
#: 0.35% of a 16 x 32k step).
_VALIDATED: dict[tuple, tuple] = {}


def _call_signature(query, key_cache, value_cache, block_tables, seq_lens, max_seq_len, kv_cache_dtype, num_kv_heads,
                    scale, alibi_slopes=None, k_scale=1.0, v_scale=1.0, tp_rank=0, blocksparse_local_blocks=0,
                    blocksparse_vert_stride=0, blocksparse_block_size=64, blocksparse_head_sliding_step=0, *,
                    out=None, num_splits=None):
    """:func:`_signature` of a :func:`forward_decode` call with these arguments (None with ALiBi slopes)."""
    if alibi_slopes is not None:
        return None
    return _signature((query, key_cache, value_cache, block_tables, seq_lens, out),
                      (max_seq_len, kv_cache_dtype, num_kv_heads, scale, k_scale, v_scale, tp_rank,
                       blocksparse_local_blocks, blocksparse_vert_stride, blocksparse_block_size,
                       blocksparse_head_sliding_step, num_splits))


def validated_launch(*args, **kwargs) -> dict | None:
    """Launch arguments of an earlier :func:`forward_decode` call with the same signature that passed every check
    and used its index arrays in place (CuPy arrays only), or None. A caller may repeat the call from them with new
    array contents and no checks (the decode kernel clamps lengths and drops out-of-range block ids), through
    :func:`cubsattn._decode_cuda.plan_of` and ``launch_plan``, as the backend's decode fast path does."""
    hit = _lookup(_call_signature(*args, **kwargs))
    return hit[0] if hit is not None else None


def _signature(arrays, scalars):
    """Key of a GPU call whose checks depend only on array metadata and scalar arguments (with device index arrays,
    no values are read on the host), or None when some array is not a CuPy array.

    ``arrays``: (query, key_cache, value_cache, block_tables, seq_lens, out or None). The key holds the scalars'
    types too (True == 1, but a bool tp_rank is a TypeError), the device (a launch plan holds per-device kernels and
    workspaces) and the kernel choice's compute-capability threshold. It may be unhashable (a list passed as a scalar
    argument): :func:`_lookup` treats that as a miss and the checks name the argument.
    """
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return None
    nd = cupy.ndarray
    q, kc, vc, bt, sl, out = arrays
    if not (type(q) is nd and type(kc) is nd and type(vc) is nd and type(bt) is nd and type(sl) is nd
            and (out is None or type(out) is nd)):
        return None
    return (tuple(map(type, scalars)), scalars, q.shape, q.strides, q.dtype, kc.shape, kc.strides, kc.dtype,
            vc.shape, vc.strides, vc.dtype, bt.shape, bt.strides, bt.dtype, sl.shape, sl.strides, sl.dtype,
            None if out is None else (out.shape, out.strides, out.dtype), cupy.cuda.runtime.getDevice(),
            _decode_cuda.BULK_MIN_CC)


def _lookup(signature) -> tuple | None:
    """The ``_VALIDATED`` entry of ``signature``, or None (also for no signature or an unhashable one)."""
    if signature is None:
        return None
    try:
        return _VALIDATED.get(signature)
    except TypeError:
        return None


def _decode_cupy(query, key_cache, value_cache, block_tables, seq_lens, out, signature, *, num_splits, context_len,
                 **kw):
    import cupy

    if query.strides[2] != query.dtype.itemsize:
        raise ValueError(f"query's last axis must be contiguous on the GPU, got strides {query.strides}")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if not cache.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
    if num_splits is not None:
        least = _decode_cuda.min_num_splits(context_len, value_cache.shape[3])
        if num_splits < least:
            raise ValueError(f"num_splits ({num_splits}) must be >= {least}: one split reads at most "
                             f"{_decode_cuda.MAX_SPLIT_BLOCKS} cache blocks")
    if query.shape[0] > 65535:
        raise ValueError(f"num_seqs ({query.shape[0]}) must be <= 65535 (CUDA grid limit)")
    # Index arrays: int32 with a unit inner stride are used in place (graph-safe); anything else is converted.
    in_place = True
    block_tables = cupy.asarray(block_tables)
    if block_tables.dtype != np.int32 or block_tables.strides[1] != 4:
        block_tables, in_place = cupy.ascontiguousarray(block_tables, dtype=np.int32), False
    seq_lens = cupy.asarray(seq_lens)
    if seq_lens.dtype != np.int32 or not seq_lens.flags.c_contiguous:
        seq_lens, in_place = cupy.ascontiguousarray(seq_lens, dtype=np.int32), False
    launch = dict(context_len=context_len, num_splits=num_splits, **kw)
    plan = _decode_cuda.plan_of(query, key_cache, block_tables, **launch) if query.shape[0] else None
    if out is None:
        out = cupy.empty(query.shape, dtype=query.dtype)
    if plan is not None:
        _decode_cuda.launch_plan(plan, query, key_cache, value_cache, block_tables, seq_lens, out)
    if signature is not None and in_place:
        try:
            _VALIDATED[signature] = (launch, plan)
        except TypeError:  # an unhashable argument that no check reads (k_scale of a 16-bit cache): not cached
            pass
    return out
