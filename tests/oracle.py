"""Independent float64 oracles for the tests (no code shared with cubsattn's backends)."""

from __future__ import annotations

import numpy as np


def rule_mask(num_heads_total, num_kv_heads_total, num_blocks, local_blocks, vert_stride, step, heads=None):
    """Element-wise loop statement of SPEC section 0: bool ``[len(heads), NB, NB]`` for the given global heads."""
    heads = range(num_heads_total) if heads is None else heads
    group = num_heads_total // num_kv_heads_total
    out = np.zeros((len(heads), num_blocks, num_blocks), dtype=bool)
    for i, h in enumerate(heads):
        shift = h * step if step >= 0 else (h // group) * (-step)
        for qb in range(num_blocks):
            for kb in range(qb + 1):
                local = qb - kb < local_blocks
                stripe = (kb + shift + 1) % vert_stride == 0
                out[i, qb, kb] = local or stripe
    return out


def masked_attention(q, k, v, cu_q, cu_k, block_mask, block_size, scale):
    """float64 dense attention with token mask = kron(block_mask, ones(B, B)) AND causal; queries are the last
    q_len positions. Rows with no allowed key are 0. Returns float64 ``[T_q, H_q, D]``."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    num_heads, num_kv = q.shape[1], k.shape[1]
    out = np.zeros(q.shape, dtype=np.float64)
    for s in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        q_len, k_len = q1 - q0, k1 - k0
        if q_len == 0:
            continue
        qpos = np.arange(k_len - q_len, k_len)
        kpos = np.arange(k_len)
        for h in range(num_heads):
            token_mask = np.kron(block_mask[h].astype(np.int64), np.ones((block_size, block_size), np.int64))
            allowed = token_mask[np.ix_(qpos, kpos)].astype(bool) & (kpos[None, :] <= qpos[:, None])
            kvh = h // (num_heads // num_kv)
            scores = q[q0:q1, h] @ k[k0:k1, kvh].T * scale
            scores = np.where(allowed, scores, -np.inf)
            m = scores.max(axis=1, keepdims=True)
            m = np.where(np.isfinite(m), m, 0.0)
            p = np.where(allowed, np.exp(scores - m), 0.0)
            denom = p.sum(axis=1, keepdims=True)
            out[q0:q1, h] = np.where(denom > 0, (p @ v[k0:k1, kvh]) / np.where(denom > 0, denom, 1.0), 0.0)
    return out
