"""Varlen block-sparse prefill: validation, then NumPy (CPU) or CUDA dispatch on the arrays' module."""

from __future__ import annotations

import math

import numpy as np

from ._checks import (ATTENTION_DTYPES, GPU_ATTENTION_DTYPES, array_module, check_array, check_cu_seqlens,
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
        GPU kernel. "auto" takes the Hopper kernel (wgmma, sm_90a) where it supports the call (compute capability
        9.0, fp16/bf16, head size 64/128, block size 64/128) and the mma.sync kernel (sm_80 and newer) elsewhere.
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
    if out is not None:
        check_array("out", out, shape=tuple(q.shape))
        if out.dtype != q.dtype:
            raise TypeError(f"out dtype ({dtype_name(out.dtype)}) must equal q dtype ({dtype_name(q.dtype)})")
    if kernel not in PREFILL_KERNELS:
        raise ValueError(f"kernel must be one of {PREFILL_KERNELS}, got {kernel!r}")
    scale = 1.0 / math.sqrt(head_size) if sm_scale is None else float(sm_scale)
    if xp is np:
        from . import _prefill_numpy

        return _prefill_numpy.prefill(q, k, v, cu_q, cu_k, layout, scale, out)
    from . import _prefill_cuda, _prefill_sm90

    hopper = kernel != "sm80" and _prefill_sm90.supports(q, k, layout)
    if kernel == "sm90" and not hopper:
        raise ValueError(f"kernel='sm90' needs compute capability 9.0, fp16/bf16, head_size in "
                         f"{_prefill_sm90.HEAD_SIZES} and block_size in {_prefill_sm90.BLOCK_SIZES}; got head_size "
                         f"{head_size}, block_size {layout.block_size}")
    if out is None:
        out = xp.empty_like(q)
    if hopper:
        return _prefill_sm90.prefill(q, k, v, cu_q, cu_k, layout, scale, out)
    return _prefill_cuda.prefill(q, k, v, cu_q, cu_k, layout, scale, out)


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
