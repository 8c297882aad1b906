"""float64 NumPy references used by the demo and benchmarks' self-checks (tests keep their own oracle)."""

from __future__ import annotations

import numpy as np

from .layout import BlockSparseLayout


def prefill_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, layout: BlockSparseLayout | None, scale: float):
    """float64 ``[T_q, H_q, D]``: dense attention with the token mask of ``layout`` (None: plain causal).

    Builds each sequence's full ``[q_len, k_len]`` mask, so keep it to small sizes.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    out = np.zeros(q.shape)
    B = None if layout is None else layout.block_size
    blocks = None if layout is None else layout.block_mask()
    for s in range(len(cu_seqlens_q) - 1):
        q0, q1, k0, k1 = (int(x) for x in (cu_seqlens_q[s], cu_seqlens_q[s + 1], cu_seqlens_k[s], cu_seqlens_k[s + 1]))
        if q1 == q0:
            continue
        qpos = np.arange(k1 - k0 - (q1 - q0), k1 - k0)
        kpos = np.arange(k1 - k0)
        allowed = kpos[None, :] <= qpos[:, None]
        for h in range(num_heads):
            keep = allowed
            if layout is not None:
                keep = allowed & blocks[h][qpos[:, None] // B, kpos[None, :] // B]
            kvh = h // (num_heads // num_kv_heads)
            scores = np.where(keep, q[q0:q1, h] @ k[k0:k1, kvh].T * scale, -np.inf)
            m = np.max(scores, axis=1, keepdims=True)
            p = np.exp(scores - np.where(np.isfinite(m), m, 0))
            denom = p.sum(axis=1, keepdims=True)
            out[q0:q1, h] = np.divide(p @ v[k0:k1, kvh], denom, out=np.zeros((q1 - q0, q.shape[2])),
                                      where=denom > 0)
    return out
