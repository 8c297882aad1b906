"""The NumPy prefill backend: the CPU path and the executable spec of the CUDA kernel.

Visits only the active key blocks of each (sequence, query block, head), in fp32 with an fp32 softmax, exactly the
work the GPU kernel does. Inputs were validated by ``attention.blocksparse_prefill``.
"""

from __future__ import annotations

import numpy as np

from .layout import BlockSparseLayout


def prefill(q, k, v, cu_q: np.ndarray, cu_k: np.ndarray, layout: BlockSparseLayout, scale: float, out=None):
    """``out[T_q, H_q, D]`` (q's dtype); see ``cubsattn.blocksparse_prefill`` for the meaning of the arguments."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_heads // num_kv_heads
    B = layout.block_size
    result = np.zeros(q.shape, dtype=np.float32)
    indptr, indices = layout.indptr, layout.indices
    for s in range(cu_q.shape[0] - 1):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        q_len, k_len = q1 - q0, k1 - k0
        if q_len == 0:
            continue
        past = k_len - q_len                                      # absolute position of query row 0
        qs = q[q0:q1].astype(np.float32)
        ks = k[k0:k1].astype(np.float32)
        vs = v[k0:k1].astype(np.float32)
        for qb in range(past // B, (k_len - 1) // B + 1):
            r0, r1 = max(qb * B, past) - past, min((qb + 1) * B, k_len) - past    # query rows in this block
            qpos = past + np.arange(r0, r1)
            for h in range(num_heads):
                cols = indices[h, indptr[h, qb]:indptr[h, qb + 1]]
                if cols.size == 0:
                    continue                                      # empty row: output stays 0
                keys = (cols[:, None] * B + np.arange(B)[None, :]).ravel()
                keys = keys[keys < k_len]
                kvh = h // group
                scores = (qs[r0:r1, h] @ ks[keys, kvh].T) * np.float32(scale)
                scores = np.where(keys[None, :] <= qpos[:, None], scores, np.float32(-np.inf))
                m = scores.max(axis=1, keepdims=True)
                p = np.exp(scores - m)
                result[q0 + r0:q0 + r1, h] = (p @ vs[keys, kvh]) / p.sum(axis=1, keepdims=True)
    if out is None:
        return result.astype(q.dtype)
    out[...] = result.astype(q.dtype)
    return out
