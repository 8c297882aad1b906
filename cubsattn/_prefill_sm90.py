"""Launcher for cuda_src/prefill_sm90.cu, the Hopper (sm_90a, wgmma) block-sparse prefill kernel.

Same contract as :mod:`cubsattn._prefill_cuda` (the sm_80 kernel), whose tile schedule and stride checks it reuses:
:func:`supports` says whether this path can run a problem, :func:`prefill` launches it. The caller
(:func:`cubsattn.blocksparse_prefill`) has validated the arguments and picks this path on compute capability 9.0.
The grid is persistent (one CTA per SM at most); its CTAs draw (query tile, head) items from a per-stream counter
that is zeroed before each launch.
"""

from __future__ import annotations


import numpy as np

from . import _kernels, _prefill_cuda, _tma
from .layout import BlockSparseLayout

#: Head sizes compiled (multiples of 64: one 128-byte swizzle slab per 64 columns; the O accumulator stays in
#: registers).
HEAD_SIZES = (64, 128)
#: Sparse block sizes (a 128-row query tile spans 2 or 1 CSR rows; 64-key tiles cover a block in 1 or 2 steps).
BLOCK_SIZES = (64, 128)
#: K/V ring depth per head size: stages of 128 keys (two 64-key tiles of the walk) of K and V, 32 KB (D 64) / 64 KB
#: (D 128) each, beside one 128-row Q tile (16 / 32 KB; the consumers hold Q in registers, so the next item's Q
#: loads while the current one is in use); a consumer warpgroup holds up to two stages (the pending step's P V and
#: the current step), the rest is the producer's prefetch (at least 3 in all: prefill_sm90.cu). D 128 fills the
#: 227 KB a CTA may have.
STAGES = {64: 6, 128: 3}
#: Query rows per CTA (two consumer warpgroups of 64) and threads per CTA (plus one producer warpgroup).
BLOCK_M = 128
THREADS = 384
#: The lowest compute capability with wgmma; sm_90a code runs on 9.0 only.
COMPUTE_CAPABILITY = 90

_DTYPES = tuple(_kernels.CTYPE)


def kernel_name(dtype, head_size: int) -> str:
    """Template instantiation name of the kernel for ``dtype`` / ``head_size``."""
    return f"blocksparse_prefill_sm90<{_kernels.ctype(dtype)}, {head_size}, {STAGES[head_size]}>"


SOURCE = _kernels.register(_kernels.KernelSource(
    "prefill_sm90.cu", tuple(kernel_name(dt, d) for dt in _DTYPES for d in HEAD_SIZES), archs=("sm_90a",),
    min_cc=COMPUTE_CAPABILITY))


def smem_bytes(head_size: int) -> int:
    """Dynamic shared memory of one CTA (prefill_sm90.cu ``Layout::ALLOC``): the Q tile (two 64-row halves), the
    K/V ring, two mbarriers and one 16-byte (n0, n0, flags) entry per stage, a full and an empty mbarrier for Q,
    three 64-byte work-item slots, and 1024 bytes to re-align the window to the swizzle pattern."""
    stages = STAGES[head_size]
    tile = 64 * head_size * 2
    return 2 * tile + 4 * stages * tile + 2 * stages * 8 + 16 + stages * 16 + 3 * 64 + 1024


_COUNTERS: dict = {}


def _item_counter(cupy):
    """A device int32 the kernel's CTAs draw work items from, zeroed on the current stream before each launch
    (one per device and stream: launches on other streams may run at the same time)."""
    stream = cupy.cuda.get_current_stream()
    key = (cupy.cuda.Device().id, stream.ptr)
    counter = _COUNTERS.get(key)
    if counter is None:
        counter = _COUNTERS[key] = cupy.zeros(1, dtype=np.int32)
    cupy.cuda.runtime.memsetAsync(counter.data.ptr, 0, 4, stream.ptr)
    return counter


def supports(q, k, v, layout: BlockSparseLayout) -> bool:
    """True when this kernel can run ``q [T_q, H_q, D]`` / ``k``, ``v [T_k, H_kv, D]`` with ``layout`` on the
    current device: compute capability 9.0, fp16/bf16, D in :data:`HEAD_SIZES`, block size in :data:`BLOCK_SIZES`,
    last dims contiguous, and q / k / v describable by tensor maps (:func:`cubsattn._tma.tma_compatible`: 16-byte
    aligned, positive strides that are multiples of 16 bytes)."""
    import cupy

    if int(cupy.cuda.Device().compute_capability) != COMPUTE_CAPABILITY:
        return False
    if q.dtype not in _DTYPES or q.shape[2] not in HEAD_SIZES or layout.block_size not in BLOCK_SIZES:
        return False
    return all(a.strides[2] == a.dtype.itemsize and _tma.tma_compatible(a) for a in (q, k, v))


def prefill(q, k, v, cu_q: np.ndarray, cu_k: np.ndarray, layout: BlockSparseLayout, scale: float, out):
    """Fill ``out [T_q, H_q, D]`` (CuPy, q's dtype) with block-sparse attention and return it.

    Arguments were validated by :func:`cubsattn.blocksparse_prefill` and accepted by :func:`supports`;
    ``cu_q`` / ``cu_k`` are host int ``[batch + 1]``, ``scale`` the softmax scale. Raises NotImplementedError for a
    head or block size this kernel lacks and ValueError for unusable strides, before any launch.
    """
    import cupy

    num_q_tokens, num_heads, head_size = q.shape
    num_kv_heads = k.shape[1]
    block_size = layout.block_size
    if head_size not in HEAD_SIZES:
        raise NotImplementedError(f"head_size {head_size} is not compiled for the sm_90a prefill kernel; "
                                  f"supported: {HEAD_SIZES}")
    if block_size not in BLOCK_SIZES:
        raise NotImplementedError(f"block_size {block_size} is not supported by the sm_90a prefill kernel; "
                                  f"supported: {BLOCK_SIZES}")
    strides = [_prefill_cuda._element_strides(name, a) for name, a in (("q", q), ("k", k), ("v", v), ("out", out))]
    if max(int(cu_q[-1]), int(cu_k[-1])) >= 2**31:
        raise ValueError(f"at most 2**31 - 1 tokens per call, got {int(cu_q[-1])} queries and {int(cu_k[-1])} keys")
    if num_q_tokens == 0:
        return out
    num_tiles, tiles, dev_cu_q, dev_cu_k = _prefill_cuda._device_schedule(cupy, cu_q, cu_k, BLOCK_M)
    if num_tiles == 0:
        return out
    indptr, indices = layout.csr(cupy)

    smem = smem_bytes(head_size)
    kernel = _kernels.get_function(SOURCE.filename, kernel_name(q.dtype, head_size), dynamic_smem=smem)
    q, strides, scale_log2 = _prefill_cuda._positive_scale(q, scale, strides)
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not _tma.tma_compatible(a):
            raise ValueError(f"{name} (shape {list(a.shape)}, strides {list(a.strides)} bytes) cannot be read by "
                             f"tensor copies: its head and token strides must be positive multiples of 16 bytes")
    maps = _tma.tensor_maps(cupy, q, k, v)
    _, _, (v_tok, v_head), (o_tok, o_head) = strides
    num_items = num_tiles * num_heads
    kernel((min(num_items, _kernels.num_sms()),), (THREADS,),  # persistent: at most one CTA per SM
           (maps,
            v, np.int64(v_tok), np.int32(v_head),
            out, np.int64(o_tok), np.int32(o_head),
            tiles, dev_cu_q, dev_cu_k, indptr, indices,
            np.int32(num_heads), np.int32(num_heads // num_kv_heads), np.int32(layout.num_blocks),
            np.int32(indices.shape[1]), np.int32(block_size), scale_log2, np.int32(num_items),
            _item_counter(cupy)),
           shared_mem=smem)
    return out

