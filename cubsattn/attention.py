"""Varlen block-sparse prefill: validation, then NumPy (CPU) or CUDA dispatch on the arrays' module."""

from __future__ import annotations

import math

import numpy as np

from . import _prefill_numpy
from . import kv_cache as _kv
from ._checks import (ATTENTION_DTYPES, GPU_ATTENTION_DTYPES, array_module, as_array, check_array, check_cu_seqlens,
                      check_int, check_int_array, dtype_name, to_host)
from .layout import BlockSparseLayout
from .params import get_head_sliding_step


def default_cu_seqlens_q(num_q_tokens: int, num_k_tokens: int, cu_seqlens_k_host: np.ndarray) -> np.ndarray:
    """vLLM's default when ``cu_seqlens_q`` is None: one query per sequence if ``T_q == batch`` (decode-only),
    the key lengths if ``T_q == T_k`` (plain prefill); anything else is ambiguous."""
    batch = cu_seqlens_k_host.shape[0] - 1
    if num_q_tokens == batch:
        return np.arange(batch + 1, dtype=np.int64)
    if num_q_tokens == num_k_tokens:
        return cu_seqlens_k_host
    raise ValueError(f"cu_seqlens_q is required: q has {num_q_tokens} tokens, which is neither the batch size "
                     f"({batch}) nor the number of key tokens ({num_k_tokens})")


def _check_out(out, q) -> None:
    """An ``out=`` buffer must have q's shape and dtype."""
    if out is not None:
        check_array("out", out, shape=tuple(q.shape))
        if out.dtype != q.dtype:
            raise TypeError(f"out dtype ({dtype_name(out.dtype)}) must equal q dtype ({dtype_name(q.dtype)})")


#: GPU prefill kernels ``blocksparse_prefill(kernel=...)`` accepts.
PREFILL_KERNELS = ("auto", "sm80", "sm90")


def blocksparse_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, layout: BlockSparseLayout, *, sm_scale=None,
                        out=None, kernel: str = "auto"):
    """Block-sparse causal attention over a packed (varlen) batch.

    Sequence ``i`` has keys ``k[cu_seqlens_k[i]:cu_seqlens_k[i+1]]`` at positions ``0 .. k_len-1`` and queries
    ``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`` at the LAST ``q_len <= k_len`` positions (chunked prefill). Query head
    ``h`` reads kv head ``h // (H_q / H_kv)`` and the blocks of ``layout`` row ``h``.

    Parameters
    ----------
    q : ``[T_q, H_q, head_size]`` fp16 / bf16 (fp32 on NumPy)
    k, v : ``[T_k, H_kv, head_size]``, same dtype as q
    cu_seqlens_q : int ``[batch + 1]`` or None (vLLM defaults: see :func:`default_cu_seqlens_q`)
    cu_seqlens_k : int ``[batch + 1]``
    layout : BlockSparseLayout with ``num_heads == H_q``
    sm_scale : float, optional
        Softmax scale; None means ``1 / sqrt(head_size)``. 0.0 is honoured.
    out : array ``[T_q, H_q, head_size]`` of q's dtype, optional
        Written in place and returned.
    kernel : {"auto", "sm80", "sm90"}
        GPU kernel. "auto" takes the Hopper kernel (wgmma and tensor copies, sm_90a) where it supports the call
        (compute capability 9.0, fp16/bf16, head size 64/128, block size 64/128, q/k/v 16-byte aligned with head and
        token strides that are positive multiples of 16 bytes) and the mma.sync kernel (sm_80 and newer) elsewhere.
        Ignored for NumPy arrays.

    Returns
    -------
    out : ``[T_q, H_q, head_size]`` in q's dtype, on q's device. Query rows whose layout row is empty are 0.

    Examples
    --------
    >>> import numpy as np, cubsattn
    >>> lay = cubsattn.BlockSparseLayout.local_strided(4, 256, 16, local_blocks=2, vert_stride=4,
    ...                                                 head_sliding_step=1)
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((100, 4, 64)).astype(np.float32)
    >>> k = rng.standard_normal((100, 2, 64)).astype(np.float32); v = k.copy()
    >>> cubsattn.blocksparse_prefill(q, k, v, None, np.array([0, 30, 100]), lay).shape
    (100, 4, 64)
    """
    q, k, v, out, cu_seqlens_q, cu_seqlens_k = (as_array(a) for a in (q, k, v, out, cu_seqlens_q, cu_seqlens_k))
    xp = array_module(q, k, v, out)
    check_array("q", q, ndim=3)
    check_array("k", k, ndim=3)
    check_array("v", v, ndim=3)
    dtypes = GPU_ATTENTION_DTYPES if xp is not np else ATTENTION_DTYPES
    check_array("q", q, dtypes=dtypes)
    for name, a in (("k", k), ("v", v)):
        if a.dtype != q.dtype:
            raise TypeError(f"{name} dtype ({dtype_name(a.dtype)}) must equal q dtype ({dtype_name(q.dtype)})")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    num_q_tokens, num_heads, head_size = q.shape
    num_k_tokens, num_kv_heads, k_head_size = k.shape
    if k_head_size != head_size:
        raise ValueError(f"head_size of k ({k_head_size}) must equal head_size of q ({head_size})")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads of q ({num_heads}) must be a multiple of num_kv_heads of k ({num_kv_heads})")
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if layout.num_heads != num_heads:
        raise ValueError(f"layout has {layout.num_heads} heads but q has {num_heads}")
    check_int_array("cu_seqlens_k", cu_seqlens_k)
    cu_k = check_cu_seqlens("cu_seqlens_k", to_host(cu_seqlens_k), num_k_tokens)
    if cu_seqlens_q is None:
        cu_q = default_cu_seqlens_q(num_q_tokens, num_k_tokens, cu_k)
    else:
        check_int_array("cu_seqlens_q", cu_seqlens_q)
        cu_q = check_cu_seqlens("cu_seqlens_q", to_host(cu_seqlens_q), num_q_tokens)
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q has {cu_q.shape[0]} entries but cu_seqlens_k has {cu_k.shape[0]} "
                         f"(both must be batch + 1)")
    q_lens, k_lens = np.diff(cu_q), np.diff(cu_k)
    if (q_lens > k_lens).any():
        i = int(np.argmax(q_lens > k_lens))
        raise ValueError(f"sequence {i}: q_len ({int(q_lens[i])}) must be <= k_len ({int(k_lens[i])}); queries are "
                         f"the last q_len positions of the sequence")
    if k_lens.size and k_lens.max() > layout.max_seqlen:
        i = int(np.argmax(k_lens))
        raise ValueError(f"sequence {i}: k_len ({int(k_lens[i])}) must be <= max_seqlen ({layout.max_seqlen})")
    _check_out(out, q)
    if kernel not in PREFILL_KERNELS:
        raise ValueError(f"kernel must be one of {PREFILL_KERNELS}, got {kernel!r}")
    scale = 1.0 / math.sqrt(head_size) if sm_scale is None else float(sm_scale)
    if xp is np:
        return _prefill_numpy.prefill(q, k, v, cu_q, cu_k, layout, scale, out)
    from . import _prefill_cuda, _prefill_sm90

    hopper = kernel != "sm80" and _prefill_sm90.supports(q, k, v, layout)
    if kernel == "sm90" and not hopper:
        raise ValueError(f"kernel='sm90' needs compute capability 9.0, fp16/bf16, head_size in "
                         f"{_prefill_sm90.HEAD_SIZES}, block_size in {_prefill_sm90.BLOCK_SIZES} and q/k/v that "
                         f"tensor copies can read (16-byte aligned, head and token strides positive multiples of 16 "
                         f"bytes); got head_size {head_size}, block_size {layout.block_size}, strides "
                         f"{list(q.strides)} / {list(k.strides)} / {list(v.strides)} bytes")
    if out is None:
        out = xp.empty_like(q)
    if hopper:
        return _prefill_sm90.prefill(q, k, v, cu_q, cu_k, layout, scale, out)
    return _prefill_cuda.prefill(q, k, v, cu_q, cu_k, layout, scale, out)


def blocksparse_prefill_paged(q, k_new, v_new, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens,
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
    q, k_new, v_new, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, out = (
        as_array(a) for a in (q, k_new, v_new, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, out))
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
    _check_out(out, q)
    scale = 1.0 / math.sqrt(head_size) if sm_scale is None else float(sm_scale)
    cu_k = np.concatenate(([0], np.cumsum(k_lens))).astype(np.int64)
    if xp is np:
        return _prefill_paged_numpy(q, k_new, v_new, key_cache, value_cache, tables, cu_q, cu_k, context, layout,
                                    scale, out, kv_cache_dtype, k_scale, v_scale)
    from . import _prefill_cuda

    return _prefill_cuda.prefill_paged(q, k_new, v_new, key_cache, value_cache, block_tables, tables, cu_q, cu_k,
                                       layout, scale, out, fp8, k_scale, v_scale)


def _prefill_paged_numpy(q, k_new, v_new, key_cache, value_cache, tables, cu_q, cu_k, context, layout, scale, out,
                         kv_cache_dtype, k_scale, v_scale):
    """The reference: gathered, dequantised contexts (rounded to q's dtype) + new keys, through the NumPy prefill."""
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


class LocalStridedBlockSparseAttn:
    """vLLM's ``LocalStridedBlockSparseAttn`` without torch: a local + vertical-stride layout and a prefill call.

    Parameters
    ----------
    n_heads : int
        Total query heads over all tensor-parallel ranks (the stripes slide with
        ``get_head_sliding_step(n_heads, vert_stride, homo_head)``).
    max_seqlen, local_blocks, vert_stride, block_size : int
        As in :class:`cubsattn.BlocksparseParams`.
    homo_head : bool
        One pattern for all heads.
    active_head_range : (int, int), optional
        Global query heads this instance computes (a tensor-parallel rank's slice); default all.
    q_block_size : int, optional
        Accepted for compatibility: None or a multiple of ``block_size``. It does not change results (vLLM's
        kernel mis-masked with ``q_block_size > block_size``; cubsattn masks every block correctly).

    Examples
    --------
    >>> import numpy as np
    >>> attn = LocalStridedBlockSparseAttn(8, 512, local_blocks=2, vert_stride=4, block_size=16)
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((300, 8, 64)).astype(np.float32)
    >>> kv = rng.standard_normal((300, 2, 64)).astype(np.float32)
    >>> attn(q, kv, kv, np.array([0, 100, 300])).shape      # two prompts of 100 and 200 tokens
    (300, 8, 64)
    """

    def __init__(self, n_heads: int, max_seqlen: int, local_blocks: int, vert_stride: int, block_size: int,
                 homo_head: bool = False, active_head_range: tuple[int, int] | None = None,
                 q_block_size: int | None = None):
        n_heads = check_int("n_heads", n_heads, minimum=1)
        vert_stride = check_int("vert_stride", vert_stride, minimum=1)
        block_size = check_int("block_size", block_size, minimum=1)
        if q_block_size is not None:
            q_block_size = check_int("q_block_size", q_block_size, minimum=1)
            if q_block_size < block_size or q_block_size % block_size:
                raise ValueError(f"q_block_size ({q_block_size}) must be a multiple of block_size ({block_size})")
        self.n_heads = n_heads
        self.q_block_size = q_block_size
        self.head_sliding_step = get_head_sliding_step(n_heads, vert_stride, homo_head)
        self.layout = BlockSparseLayout.local_strided(n_heads, max_seqlen, block_size, local_blocks, vert_stride,
                                                      self.head_sliding_step, head_range=active_head_range)
        self.active_head_range = (0, n_heads) if active_head_range is None else tuple(active_head_range)

    def __call__(self, q, k, v, cu_seqlens_k, cu_seqlens_q=None, sm_scale=None, *, out=None):
        """Attention for ``q [T_q, H, D]``, ``k/v [T_k, H_kv, D]`` where ``H`` is the number of active heads.

        See :func:`blocksparse_prefill` for the arguments; NumPy arrays run on the CPU, CuPy arrays on the GPU.
        """
        return blocksparse_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, self.layout, sm_scale=sm_scale, out=out)

    def __repr__(self) -> str:
        return (f"LocalStridedBlockSparseAttn(n_heads={self.n_heads}, active_head_range={self.active_head_range}, "
                f"head_sliding_step={self.head_sliding_step}, layout={self.layout!r})")
