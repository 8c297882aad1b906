"""Random chunked-prefill problems over a vLLM-layout paged cache, built and gathered independently of cubsattn.

Shared by tests/test_prefill_paged.py (NumPy path, errors) and tests/test_prefill_paged_gpu.py (CUDA kernel).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
NAN_FP8 = 0x7F  # an E4M3 NaN code: poison for cache slots no sequence owns


def make_problem(rng, dtype, head_size, heads, kv_heads, contexts, q_lens, cache_block, *, fp8=False,
                 k_scale=1.0, v_scale=1.0, spare_blocks=3, pad_columns=2):
    """One batch: q / k_new / v_new, a cache holding each sequence's context in shuffled blocks, block tables.

    Slots no sequence owns hold NaN (poison the kernel must never let through). Block table columns past a
    sequence's used blocks hold out-of-range ids (they must never be read). Returns a dict with the host arrays
    and ``k_all`` / ``v_all``: the packed keys of every sequence (dequantised context rounded to ``dtype``, then
    the new tokens), with ``cu_q`` / ``cu_k`` for the oracle.
    """
    contexts = [int(c) for c in contexts]
    q_lens = [int(n) for n in q_lens]
    x = 16 if fp8 else 8
    used = [-(-c // cache_block) for c in contexts]
    num_blocks = sum(used) + spare_blocks
    ids = rng.permutation(num_blocks)
    max_cols = max(used) + pad_columns
    tables = np.full((len(contexts), max_cols), num_blocks + 7, dtype=np.int32)  # invalid unless used
    start = 0
    for s, u in enumerate(used):
        tables[s, :u] = ids[start:start + u]
        start += u

    key_shape = (num_blocks, kv_heads, head_size // x, cache_block, x)
    value_shape = (num_blocks, kv_heads, head_size, cache_block)
    if fp8:
        key_cache = np.full(key_shape, NAN_FP8, np.uint8)
        value_cache = np.full(value_shape, NAN_FP8, np.uint8)
    else:
        key_cache = np.full(key_shape, np.nan, dtype)
        value_cache = np.full(value_shape, np.nan, dtype)

    k_ctx, v_ctx = [], []
    for s, c in enumerate(contexts):
        k = rng.standard_normal((c, kv_heads, head_size)).astype(np.float32)
        v = rng.standard_normal((c, kv_heads, head_size)).astype(np.float32)
        if fp8:  # store codes of value / scale; read back as code * scale in float32, then rounded to dtype
            kc = (k / np.float32(k_scale)).astype(FP8)
            vc = (v / np.float32(v_scale)).astype(FP8)
            k = (kc.astype(np.float32) * np.float32(k_scale)).astype(dtype)
            v = (vc.astype(np.float32) * np.float32(v_scale)).astype(dtype)
            k_store, v_store = kc.view(np.uint8), vc.view(np.uint8)
        else:
            k = k.astype(dtype)
            v = v.astype(dtype)
            k_store, v_store = k, v
        for p in range(c):  # vLLM's layout (SPEC section 7): K[p][h][d] at [blk, h, d // x, off, d % x]
            blk, off = tables[s, p // cache_block], p % cache_block
            key_cache[blk, :, :, off, :] = k_store[p].reshape(kv_heads, head_size // x, x)
            value_cache[blk, :, :, off] = v_store[p]
        k_ctx.append(k)
        v_ctx.append(v)

    tq = sum(q_lens)
    q = rng.standard_normal((tq, heads, head_size)).astype(dtype)
    k_new = rng.standard_normal((tq, kv_heads, head_size)).astype(dtype)
    v_new = rng.standard_normal((tq, kv_heads, head_size)).astype(dtype)
    cu_q = np.concatenate(([0], np.cumsum(q_lens))).astype(np.int32)
    k_lens = np.array(contexts) + np.array(q_lens)
    cu_k = np.concatenate(([0], np.cumsum(k_lens))).astype(np.int32)
    k_all = np.concatenate([part for s in range(len(contexts))
                            for part in (k_ctx[s], k_new[cu_q[s]:cu_q[s + 1]])])
    v_all = np.concatenate([part for s in range(len(contexts))
                            for part in (v_ctx[s], v_new[cu_q[s]:cu_q[s + 1]])])
    return dict(q=q, k_new=k_new, v_new=v_new, key_cache=key_cache, value_cache=value_cache, tables=tables,
                cu_q=cu_q, cu_k=cu_k, context=np.array(contexts, np.int32), k_all=k_all, v_all=v_all,
                kv_cache_dtype="fp8" if fp8 else "auto", k_scale=k_scale, v_scale=v_scale)
