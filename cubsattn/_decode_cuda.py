"""Launchers for cuda_src/decode.cu: block-sparse paged decode, its split-KV heuristic and workspace cache.

The caller (``cubsattn.decode.forward_decode``) has validated every argument; this module only picks the split count,
finds or allocates the split workspace and launches (one kernel; with splits, its last CTA per sequence and kv head
merges them). Nothing here synchronises with the host, and once a workspace of a given shape exists nothing
allocates, so the launches can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import numpy as np

from . import _kernels

HEAD_SIZES = (64, 80, 96, 128, 256)
CACHE_BLOCK_SIZES = (8, 16, 32)
#: Query heads per kv head: a CTA computes a group padded to 4 or 8 heads (``GROUP_WIDTHS``).
MAX_GROUP = 8
GROUP_WIDTHS = (4, 8)
THREADS = 128
#: The bulk-copy kernel: 4 consumer warps + 1 producer warp, on compute capability >= BULK_MIN_CC (it needs sm_90's
#: cp.async.bulk and mbarrier transaction counts), with BULK_STAGES[head_size] 64-token stages in its ring.
BULK_THREADS = 160
BULK_MIN_CC = 90
#: ~96 KB rings (two CTAs per SM; D 256: one CTA, 192 KB). Measured on an H200 for D 128 (Phi-3 decode, ms, 64x8k /
#: 16x32k / 256x2k): 2 stages 0.352 / 0.312 / 0.419, 3 stages 0.329 / 0.317 / 0.418, 6 stages (one CTA per SM)
#: 0.340 / 0.322 / 0.437: more bytes in flight than 2 x 2 x 32 KB per SM buys nothing.
BULK_STAGES = {64: 6, 80: 4, 96: 4, 128: 3, 256: 3}
#: Mirrors decode.cu: tokens per pipeline stage (CUDA-core fp8 kernel / tensor-core kernel) and the largest block list
#: of a CTA: the most cache blocks one split may need. A split needs at most ``chunk_blocks`` = ceil(context blocks /
#: splits) of them (decode.cu ``split_range``: equal ranges of that many blocks, or for the fp8 kernel equal shares of
#: the blocks the sparse rule needs, which may span more), and each launch gives its list exactly that many entries
#: (the end of its dynamic shared memory).
STAGE_TOKENS = 32
MMA_STAGE_TOKENS = 64
MAX_SPLIT_BLOCKS = 1024
#: Split heuristic: the most splits whose CTAs fit one wave of this many per SM (both tensor-core kernels keep 2
#: resident for head sizes <= 128; split sweeps on an H200 put the best counts at 1 for 64 x 8k and 256 x 2k, 16-33
#: for 1 x 128k, and for 16 x 32k at 2, one wave of 256 CTAs: bulk-copy kernel graph replays 0.260 ms against
#: 0.264-0.265 at 4 splits and 0.272 at 3), but never split a sequence into pieces shorter than MIN_SPLIT_TOKENS (each
#: split pays a block-list prologue, a pipeline fill and a combine share).
TARGET_CTAS_PER_SM = 2
MIN_SPLIT_TOKENS = 1024

#: decode.cu's ``DecodeParams``, field for field (int32 / float32 only, so there is no padding): the kernels' scalar
#: arguments, passed by value as one NumPy structured scalar.
PARAMS_DTYPE = np.dtype([
    ("q_stride_s", np.int32), ("q_stride_h", np.int32), ("num_blocks", np.int32), ("max_blocks", np.int32),
    ("bt_stride", np.int32), ("max_seq_len", np.int32), ("log2_bs", np.int32), ("num_kv_heads", np.int32),
    ("group", np.int32), ("qk_scale_log2", np.float32), ("v_scale", np.float32), ("tp_rank", np.int32),
    ("local_blocks", np.int32), ("vert_stride", np.int32), ("sparse_block", np.int32), ("sliding_step", np.int32),
    ("chunk_blocks", np.int32)])


def _kernel_name(ctype: str, head_size: int, fp8: bool, group_width: int, bulk: bool) -> str:
    """16-bit caches run a tensor-core kernel (bulk-copy fed on sm_90, cp.async fed before); fp8 caches the CUDA-core
    kernel (padded group width 4 or 8)."""
    if fp8:
        return f"cubsattn::decode::paged_decode<{ctype}, unsigned char, {head_size}, {group_width}>"
    if bulk:
        return f"cubsattn::decode::paged_decode_bulk<{ctype}, {head_size}, {BULK_STAGES[head_size]}>"
    return f"cubsattn::decode::paged_decode_mma<{ctype}, {head_size}>"


def _name_expressions() -> tuple[str, ...]:
    names = []
    for ctype in _kernels.CTYPE.values():
        for d in HEAD_SIZES:
            names.append(_kernel_name(ctype, d, False, 8, False))
            names.append(_kernel_name(ctype, d, False, 8, True))
            names.extend(_kernel_name(ctype, d, True, g, False) for g in GROUP_WIDTHS)
    return tuple(names)


SOURCE = _kernels.register(_kernels.KernelSource("decode.cu", _name_expressions()))


def group_width(group: int) -> int:
    """The compiled group width (4 or 8) that computes ``group`` query heads per kv head."""
    return next(g for g in GROUP_WIDTHS if group <= g)


def smem_bytes(head_size: int, fp8: bool, width: int, bulk: bool = False, *,
               chunk_blocks: int = MAX_SPLIT_BLOCKS) -> int:
    """Dynamic shared memory of one CTA whose block list holds ``chunk_blocks`` entries: decode.cu's
    ``Smem<unsigned char, HEAD, GMAX>::kFixedBytes`` (fp8), ``bulk::Shape<HEAD, BULK_STAGES[HEAD]>::kFixedBytes``
    (bulk-copy kernel) or ``tc::Shape<HEAD>::kFixedBytes`` (16-bit cache, cp.async), plus 8 bytes per list entry; the
    kernels trap if given less."""
    warps = THREADS // 32
    if bulk:
        stages = BULK_STAGES[head_size]
        fixed = stages * 2 * MMA_STAGE_TOKENS * head_size * 2 + 2 * stages * 8 + 8 * 4 + 4 * 8 * 8
    elif fp8:
        stage = 2 * STAGE_TOKENS * head_size
        stages = 4 if stage <= 16384 else 3
        fixed = (stages * stage + width * head_size * 4 + warps * width * 32 * 4 + width * 32 * 4 + width * 4
                 + width * 8 + warps * 4)
    else:
        stage = 2 * MMA_STAGE_TOKENS * head_size * 2
        stages = 3 if head_size <= 128 else 2
        fixed = stages * stage + warps * 4 + warps * 8 * 8
    return fixed + chunk_blocks * 8


def min_num_splits(context_len: int, block_size: int) -> int:
    """Fewest splits that keep the cache blocks each split needs within MAX_SPLIT_BLOCKS (its block list)."""
    return max(1, math.ceil(math.ceil(context_len / block_size) / MAX_SPLIT_BLOCKS))


def choose_num_splits(num_seqs: int, num_kv_heads: int, context_len: int, block_size: int, num_sms: int) -> int:
    """Split count for ``num_seqs`` sequences of up to ``context_len`` tokens.

    One CTA per (sequence, kv head, split): the most splits whose CTAs still fit one wave of TARGET_CTAS_PER_SM
    per SM (at least 1), but no split shorter than MIN_SPLIT_TOKENS, and no fewer than ``min_num_splits``. Examples
    on 132 SMs, 8 kv heads, cache block 16: 256 x 2k -> 1 split (2048 CTAs); 64 x 8k -> 1 (512); 16 x 32k -> 2
    (256); 1 x 128k -> 33 (264 CTAs).
    """
    units = max(1, num_seqs * num_kv_heads)
    want = max(1, TARGET_CTAS_PER_SM * num_sms // units)
    longest = max(1, context_len // MIN_SPLIT_TOKENS)
    splits = max(min_num_splits(context_len, block_size), min(want, longest), 1)
    # Equal chunks of whole cache blocks; drop splits that the rounding left empty.
    nblk = max(1, math.ceil(context_len / block_size))
    return math.ceil(nblk / math.ceil(nblk / splits))


_WORKSPACES: dict[tuple, tuple] = {}
_KERNELS: dict[tuple, object] = {}


def _compute_capability() -> int:
    """major * 10 + minor of the current device."""
    import cupy

    return int(cupy.cuda.Device().compute_capability)


def _configured_kernel(ctype: str, head_size: int, fp8: bool, width: int, bulk: bool):
    """The kernel, its shared-memory limit raised once per device to what a MAX_SPLIT_BLOCKS-entry list needs."""
    import cupy

    key = (cupy.cuda.Device().id, ctype, head_size, fp8, width, bulk)
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _KERNELS[key] = _kernels.get_function(
            SOURCE.filename, _kernel_name(ctype, head_size, fp8, width, bulk),
            dynamic_smem=smem_bytes(head_size, fp8, width, bulk))
    return kernel


def _workspace(num_seqs: int, num_heads: int, num_splits: int, head_size: int):
    """Split partials ``(part_o float32 [S, Hq, splits, D], part_ml float32 [S, Hq, splits, 2], counters int32
    [S * Hq])``, allocated once per (device, shape) and reused by every later call, so that a captured CUDA graph keeps
    pointing at live memory. ``counters`` (one split ticket per sequence and kv head, at most Hq of them) start at
    zero and every launch leaves them at zero: the CTA that takes a row's last ticket resets it."""
    import cupy

    key = (cupy.cuda.Device().id, num_seqs, num_heads, num_splits, head_size)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = (cupy.empty((num_seqs, num_heads, num_splits, head_size), dtype=cupy.float32),
              cupy.empty((num_seqs, num_heads, num_splits, 2), dtype=cupy.float32),
              cupy.zeros((num_seqs * num_heads,), dtype=cupy.int32))
        _WORKSPACES[key] = ws
    return ws


def plan_of(query, key_cache, block_tables, *, max_seq_len: int, context_len: int, fp8: bool, scale: float,
            k_scale: float, v_scale: float, tp_rank: int, local_blocks: int, vert_stride: int, sparse_block: int,
            sliding_step: int, num_splits: int | None) -> tuple:
    """The launch plan of the decode kernel for arrays of these shapes and strides on the current device (cached).

    ``query`` ``[S, Hq, D]`` with S >= 1 (a grid needs one CTA row per sequence), ``block_tables`` int32
    ``[S, max_blocks]`` with a unit column stride; ``context_len`` bounds every sequence (the longest host seq_len, or
    ``max_seq_len``) and sizes the splits. Everything but the array pointers is in the plan: building the split count, the kernel handle and the scalar
    arguments on every call cost more host time than a small decode step takes on the GPU. A caller that keeps the
    plan for a fixed signature (the backend's decode fast path, ``forward_decode``'s validated calls) launches it
    with :func:`launch_plan` directly.
    """
    import cupy

    key = (cupy.cuda.runtime.getDevice(), BULK_MIN_CC, query.shape, query.strides, query.dtype, key_cache.shape, fp8,
           block_tables.shape, block_tables.strides, max_seq_len, context_len, scale, k_scale, v_scale, tp_rank,
           local_blocks, vert_stride, sparse_block, sliding_step, num_splits)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan(query, key_cache, block_tables, max_seq_len=max_seq_len, context_len=context_len,
                                   fp8=fp8, scale=scale, k_scale=k_scale, v_scale=v_scale, tp_rank=tp_rank,
                                   local_blocks=local_blocks, vert_stride=vert_stride, sparse_block=sparse_block,
                                   sliding_step=sliding_step, num_splits=num_splits)
    return plan


def launch_plan(plan: tuple, query, key_cache, value_cache, block_tables, seq_lens, out) -> None:
    """Launch ``plan`` (from :func:`plan_of`, same shapes, strides and device) on these arrays' contents, on the
    current stream: ``seq_lens`` int32 ``[S]`` (device), ``out`` a contiguous ``[S, Hq, D]`` array of the query
    dtype."""
    kernel, grid, block, smem, params, workspace = plan
    part_o, part_ml, counters = workspace or (out, out, out)  # one split: the kernel writes `out` only
    kernel(grid, block, (out, part_o, part_ml, counters, query, key_cache, value_cache, block_tables, seq_lens, params),
           shared_mem=smem)


_PLANS: dict[tuple, tuple] = {}


def _plan(query, key_cache, block_tables, *, max_seq_len, context_len, fp8, scale, k_scale, v_scale, tp_rank,
          local_blocks, vert_stride, sparse_block, sliding_step, num_splits):
    """``(kernel, grid, block, shared bytes, DecodeParams scalar, workspace or None)``."""
    num_seqs, num_heads, head_size = query.shape
    num_blocks, num_kv_heads, _, block_size = key_cache.shape[:4]
    group = num_heads // num_kv_heads
    width = group_width(group)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, context_len, block_size, _kernels.num_sms())
    chunk_blocks = math.ceil(math.ceil(max(context_len, 1) / block_size) / num_splits)

    ctype = _kernels.ctype(query.dtype)
    bulk = not fp8 and _compute_capability() >= BULK_MIN_CC
    kernel = _configured_kernel(ctype, head_size, fp8, width, bulk)
    smem = smem_bytes(head_size, fp8, width, bulk, chunk_blocks=chunk_blocks)
    item = query.dtype.itemsize
    params = np.array((query.strides[0] // item, query.strides[1] // item, num_blocks, block_tables.shape[1],
                       block_tables.strides[0] // 4, max_seq_len, block_size.bit_length() - 1, num_kv_heads, group,
                       scale * k_scale * math.log2(math.e), v_scale, tp_rank, local_blocks, vert_stride, sparse_block,
                       sliding_step, chunk_blocks), dtype=PARAMS_DTYPE)[()]
    workspace = _workspace(num_seqs, num_heads, num_splits, head_size) if num_splits > 1 else None
    return (kernel, (num_splits, num_kv_heads, num_seqs), (BULK_THREADS if bulk else THREADS,), smem, params,
            workspace)
