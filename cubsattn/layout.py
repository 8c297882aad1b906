"""Block-sparse layouts: the NumPy statement of the local + vertical-stride rule, and per-head CSR.

The rule (SPEC section 0/3): block ``(qb, kb)`` of a head whose stripe offset is ``offset`` is active iff ::

    qb >= kb  and  (qb - kb < local_blocks  or  (kb + offset) % vert_stride == 0)

with ``offset = h * head_sliding_step + 1`` for global query head ``h`` (``step >= 0``), or
``offset = kv_head * (-step) + 1`` for its global kv head (``step < 0``, homo_head_group). Inside the diagonal block
attention is causal token by token. ``_rule`` below is the only place this is written in NumPy; ``cuda_src/layout.cuh``
is the only place on the GPU.
"""

from __future__ import annotations

import functools
import io

import numpy as np

from ._checks import check_array, check_int
from .params import BlocksparseParams, get_head_sliding_step


def _rule(qb, kb, offset, local_blocks: int, vert_stride: int):
    """Active-block predicate; arguments broadcast (``qb``, ``kb`` block indices, ``offset`` stripe offsets)."""
    return (qb >= kb) & ((qb - kb < local_blocks) | ((kb + offset) % vert_stride == 0))


def stripe_offsets(head_range: tuple[int, int], head_sliding_step: int, num_heads_total: int,
                   num_kv_heads_total: int | None = None) -> np.ndarray:
    """Stripe offset of each global query head in ``head_range`` (int64 ``[stop - start]``).

    ``h * step + 1`` for ``step >= 0``; ``kv_head(h) * (-step) + 1`` for ``step < 0``, where
    ``kv_head(h) = h // (num_heads_total // num_kv_heads_total)``.
    """
    h = np.arange(head_range[0], head_range[1], dtype=np.int64)
    if head_sliding_step >= 0:
        return h * head_sliding_step + 1
    if num_kv_heads_total is None:
        raise ValueError("a negative head_sliding_step (slide per kv head) needs num_kv_heads_total")
    group = num_heads_total // num_kv_heads_total
    return (h // group) * (-head_sliding_step) + 1


def _csr_from_masks(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-head CSR of boolean block masks ``[H, MB, NB]``: indptr int32 ``[H, MB+1]``, indices int32
    ``[H, max_nnz]`` (ascending per row, right-padded with -1)."""
    num_heads, rows = masks.shape[:2]
    counts = masks.sum(axis=2, dtype=np.int64)
    indptr = np.zeros((num_heads, rows + 1), dtype=np.int64)
    np.cumsum(counts, axis=1, out=indptr[:, 1:])
    nnz = indptr[:, -1]
    indices = np.full((num_heads, max(int(nnz.max(initial=0)), 1)), -1, dtype=np.int32)
    h, _, col = np.nonzero(masks)  # row-major: sorted by head, then row, then column
    start = np.concatenate(([0], np.cumsum(nnz)[:-1]))
    indices[h, np.arange(h.size) - start[h]] = col
    return indptr.astype(np.int32), indices


class BlockSparseLayout:
    """Which key blocks each query block attends to, per head, as CSR.

    Build one with :meth:`from_params` (vLLM's local + vertical-stride rule), :meth:`local_strided`, or
    :meth:`from_mask` (any causal per-head block mask). Rows and columns are absolute block indices
    ``pos // block_size``; row ``qb`` of head ``h`` lists its active key blocks ascending, the diagonal ``qb`` last.

    Parameters
    ----------
    indptr : int array ``[num_heads, num_blocks + 1]``
        Row pointers per head.
    indices : int array ``[num_heads, max_nnz]``
        Column (key block) indices per head, ascending within a row, right-padded with -1.
    block_size : int
        Tokens per block (a multiple of 16).
    max_seqlen : int, optional
        Longest sequence the layout serves; defaults to ``num_blocks * block_size``.

    Examples
    --------
    Four blocks, two local blocks, vertical stride 2, one head (stripe offset 1)::

        >>> lay = BlockSparseLayout.local_strided(1, 4 * 16, 16, local_blocks=2, vert_stride=2,
        ...                                       head_sliding_step=1)
        >>> print(lay.to_text())            # '#' active, '.' skipped; key blocks left to right
        head 0
          #
          ##
          .##
          .###

    Row 3 sees key blocks 2 and 3 (local) and 1 (a stripe: ``(1 + 1) % 2 == 0``); block 0 is neither.
    """

    def __init__(self, indptr, indices, block_size: int, *, max_seqlen: int | None = None,
                 _rule_args: tuple | None = None, _validate: bool = True):
        block_size = check_int("block_size", block_size, minimum=1)
        if block_size % 16:
            raise ValueError(f"block_size ({block_size}) must be a multiple of 16 (the tensor-core tile)")
        indptr = np.asarray(indptr)
        indices = np.asarray(indices)
        check_array("indptr", indptr, ndim=2)
        check_array("indices", indices, ndim=2)
        for name, a in (("indptr", indptr), ("indices", indices)):
            if not np.issubdtype(a.dtype, np.integer):
                raise TypeError(f"{name} must have an integer dtype, got {a.dtype}")
        if indptr.shape[0] != indices.shape[0]:
            raise ValueError(f"indptr has {indptr.shape[0]} heads but indices has {indices.shape[0]}")
        if indptr.shape[1] < 2:
            raise ValueError(f"indptr must have num_blocks + 1 >= 2 columns, got shape {list(indptr.shape)}")
        num_blocks = indptr.shape[1] - 1
        if max_seqlen is None:
            max_seqlen = num_blocks * block_size
        max_seqlen = check_int("max_seqlen", max_seqlen, minimum=1)
        if -(-max_seqlen // block_size) != num_blocks:
            raise ValueError(f"max_seqlen ({max_seqlen}) needs ceil(max_seqlen / block_size) = "
                             f"{-(-max_seqlen // block_size)} block rows, but indptr has {num_blocks}")
        if _validate:
            _validate_csr(indptr, indices)
        self.indptr = np.ascontiguousarray(indptr, dtype=np.int32)
        self.indices = np.ascontiguousarray(indices, dtype=np.int32)
        self.block_size = block_size
        self.max_seqlen = max_seqlen
        # (local_blocks, vert_stride, offsets[H]) when built from the rule; None for a user mask.
        self._rule_args = _rule_args
        self._device_csr: dict[int, tuple] = {}

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def local_strided(cls, num_heads: int, max_seqlen: int, block_size: int, local_blocks: int, vert_stride: int,
                      head_sliding_step: int, *, head_range: tuple[int, int] | None = None,
                      num_kv_heads: int | None = None) -> "BlockSparseLayout":
        """vLLM's local + vertical-stride layout for global heads ``head_range`` (default all ``num_heads``).

        ``num_heads`` / ``num_kv_heads`` count heads over all tensor-parallel ranks; ``num_kv_heads`` is needed
        only for a negative ``head_sliding_step`` (stripes slide per kv head).
        """
        num_heads = check_int("num_heads", num_heads, minimum=1)
        max_seqlen = check_int("max_seqlen", max_seqlen, minimum=1)
        local_blocks = check_int("local_blocks", local_blocks, minimum=1)
        vert_stride = check_int("vert_stride", vert_stride, minimum=1)
        head_sliding_step = check_int("head_sliding_step", head_sliding_step)
        if head_range is None:
            head_range = (0, num_heads)
        start, stop = (int(x) for x in head_range)
        if not 0 <= start < stop <= num_heads:
            raise ValueError(f"head_range {tuple(head_range)} must satisfy 0 <= start < stop <= num_heads "
                             f"({num_heads})")
        if num_kv_heads is not None and num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        offsets = stripe_offsets((start, stop), head_sliding_step, num_heads, num_kv_heads)
        num_blocks = -(-max_seqlen // block_size)
        indptr, indices = _rule_csr(offsets % vert_stride, num_blocks, local_blocks, vert_stride)
        return cls(indptr, indices, block_size, max_seqlen=max_seqlen,
                   _rule_args=(local_blocks, vert_stride, offsets), _validate=False)

    @classmethod
    def from_params(cls, params: BlocksparseParams) -> "BlockSparseLayout":
        """The layout of ``params.active_head_range`` (this tensor-parallel rank's query heads)."""
        return cls.local_strided(params.total_heads, params.max_seqlen, params.block_size, params.local_blocks,
                                 params.vert_stride, params.head_sliding_step, head_range=params.active_head_range,
                                 num_kv_heads=params.total_kv_heads)

    @classmethod
    def from_mask(cls, mask, block_size: int, *, max_seqlen: int | None = None) -> "BlockSparseLayout":
        """From a boolean block mask ``[num_heads, num_blocks, num_blocks]`` (or ``[num_blocks, num_blocks]`` for
        one head). The mask must be causal (no block above the diagonal), and every non-empty row must contain its
        diagonal block; queries of an empty row produce zeros."""
        mask = np.asarray(mask)
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim != 3 or mask.shape[1] != mask.shape[2]:
            raise ValueError(f"mask must be [num_heads, num_blocks, num_blocks], got shape {list(mask.shape)}")
        mask = mask.astype(bool)
        upper = np.triu(np.ones(mask.shape[1:], dtype=bool), k=1)
        bad = mask & upper
        if bad.any():
            h, qb, kb = (int(x[0]) for x in np.nonzero(bad))
            raise ValueError(f"mask must be causal at block level: head {h} has block (qb={qb}, kb={kb}) with "
                             f"kb > qb")
        diag = np.diagonal(mask, axis1=1, axis2=2)
        missing = mask.any(axis=2) & ~diag
        if missing.any():
            h, qb = (int(x[0]) for x in np.nonzero(missing))
            raise ValueError(f"every non-empty mask row must include its diagonal block: head {h} row {qb} "
                             f"has blocks but not ({qb}, {qb})")
        indptr, indices = _csr_from_masks(mask)
        return cls(indptr, indices, block_size, max_seqlen=max_seqlen, _validate=False)

    # ---- properties --------------------------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return self.indptr.shape[0]

    @property
    def num_blocks(self) -> int:
        """Block rows (= block columns) = ``ceil(max_seqlen / block_size)``."""
        return self.indptr.shape[1] - 1

    @property
    def row_nnz(self) -> np.ndarray:
        """Active blocks per (head, query block): int64 ``[num_heads, num_blocks]``."""
        return np.diff(self.indptr.astype(np.int64), axis=1)

    @property
    def is_rule(self) -> bool:
        """True when built from the local + vertical-stride rule (not from a user mask)."""
        return self._rule_args is not None

    @property
    def local_blocks(self) -> int | None:
        return None if self._rule_args is None else self._rule_args[0]

    @property
    def vert_stride(self) -> int | None:
        return None if self._rule_args is None else self._rule_args[1]

    @property
    def stripe_offsets(self) -> np.ndarray | None:
        """Stripe offset per head (int64 ``[num_heads]``) of a rule layout; None for a user mask."""
        return None if self._rule_args is None else self._rule_args[2]

    # ---- conversions -------------------------------------------------------------------------------------------
    def block_mask(self, num_q_blocks: int | None = None, num_k_blocks: int | None = None) -> np.ndarray:
        """Boolean ``[num_heads, num_q_blocks, num_k_blocks]``: the top-left corner of the full block mask."""
        nq = self.num_blocks if num_q_blocks is None else min(int(num_q_blocks), self.num_blocks)
        nk = self.num_blocks if num_k_blocks is None else min(int(num_k_blocks), self.num_blocks)
        if self._rule_args is not None:
            local_blocks, vert_stride, offsets = self._rule_args
            unique, inverse = np.unique(offsets % vert_stride, return_inverse=True)
            qb = np.arange(nq)[None, :, None]
            kb = np.arange(nk)[None, None, :]
            patterns = _rule(qb, kb, unique[:, None, None], local_blocks, vert_stride)
            out = np.empty((self.num_heads, nq, nk), dtype=bool)
            for h, u in enumerate(inverse):  # a copy per head: cheaper than fancy-indexing the big array
                out[h] = patterns[u]
            return out
        mask = np.zeros((self.num_heads, nq, nk), dtype=bool)
        nnz = self.indptr[:, nq].astype(np.int64)
        h = np.repeat(np.arange(self.num_heads), nnz)
        pos = np.arange(h.size) - np.repeat(np.concatenate(([0], np.cumsum(nnz)[:-1])), nnz)
        cols = self.indices[h, pos]
        rows = _rows_of(self.indptr, h, pos)
        keep = cols < nk
        mask[h[keep], rows[keep], cols[keep]] = True
        return mask

    def to_mask(self) -> np.ndarray:
        """The full boolean block mask ``[num_heads, num_blocks, num_blocks]``."""
        return self.block_mask()

    def to_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """``(indptr int32 [H, NB+1], indices int32 [H, max_nnz])`` with -1 padding (vLLM's crow/col)."""
        return self.indptr, self.indices

    def head_slice(self, start: int, stop: int) -> "BlockSparseLayout":
        """The layout of local heads ``[start, stop)`` (e.g. one tensor-parallel rank's heads)."""
        if not 0 <= start < stop <= self.num_heads:
            raise ValueError(f"head slice [{start}, {stop}) must satisfy 0 <= start < stop <= num_heads "
                             f"({self.num_heads})")
        indptr = self.indptr[start:stop]
        width = max(int(indptr[:, -1].max()), 1)
        rule = None
        if self._rule_args is not None:
            rule = (self._rule_args[0], self._rule_args[1], self._rule_args[2][start:stop])
        return BlockSparseLayout(indptr, self.indices[start:stop, :width], self.block_size,
                                 max_seqlen=self.max_seqlen, _rule_args=rule, _validate=False)

    def csr(self, xp=np):
        """``(indptr, indices)`` as arrays of ``xp`` (NumPy or CuPy); device copies are cached per device."""
        if xp is np:
            return self.indptr, self.indices
        device = xp.cuda.Device().id
        if device not in self._device_csr:
            self._device_csr[device] = (xp.asarray(self.indptr), xp.asarray(self.indices))
        return self._device_csr[device]

    # ---- counting ----------------------------------------------------------------------------------------------
    def allowed_pairs(self, seq_len: int, q_len: int | None = None) -> int:
        """Number of (query, key) token pairs the layout allows for one sequence, summed over heads.

        Queries are the last ``q_len`` (default ``seq_len``) positions; keys are positions ``<= `` the query's.
        """
        seq_len = check_int("seq_len", seq_len, minimum=0)
        q_len = seq_len if q_len is None else check_int("q_len", q_len, minimum=0)
        if q_len > seq_len:
            raise ValueError(f"q_len ({q_len}) must be <= seq_len ({seq_len})")
        if seq_len > self.max_seqlen:
            raise ValueError(f"seq_len ({seq_len}) must be <= max_seqlen ({self.max_seqlen})")
        if q_len == 0:
            return 0
        B = self.block_size
        nqb = -(-seq_len // B)
        qb = np.arange(nqb, dtype=np.int64)
        lo = np.maximum(qb * B, seq_len - q_len)          # first query position of each block row
        hi = np.minimum((qb + 1) * B, seq_len)            # one past the last
        rows = np.maximum(hi - lo, 0)
        # Diagonal block: query q sees q - qb*B + 1 keys; summed over [lo, hi).
        diag = np.where(rows > 0, (lo - qb * B + 1 + hi - qb * B) * rows // 2, 0)
        nnz = self.row_nnz[:, :nqb]
        per_row = np.maximum(nnz - 1, 0) * rows * B + (nnz > 0) * diag
        return int(per_row.sum())

    def density(self, seq_len: int) -> float:
        """Allowed pairs over causal pairs for one sequence of ``seq_len`` (1.0 = dense causal)."""
        causal = self.num_heads * seq_len * (seq_len + 1) // 2
        return self.allowed_pairs(seq_len) / causal if causal else 1.0

    def flops(self, seq_len: int, head_size: int, q_len: int | None = None) -> int:
        """Useful FLOPs of one sequence's attention: ``4 * head_size * allowed_pairs`` (QK^T and PV)."""
        return 4 * int(head_size) * self.allowed_pairs(seq_len, q_len)

    # ---- drawing -----------------------------------------------------------------------------------------------
    def to_text(self, heads=None, max_blocks: int = 64) -> str:
        """Draw the block mask of ``heads`` (default: up to 4) over the first ``max_blocks`` blocks:
        ``#`` active, ``.`` skipped (below the diagonal), blank above it."""
        heads = list(range(min(self.num_heads, 4))) if heads is None else list(heads)
        n = min(self.num_blocks, max_blocks)
        mask = self.block_mask(n, n)
        lines = []
        for h in heads:
            lines.append(f"head {h}")
            for qb in range(n):
                lines.append("  " + "".join("#" if mask[h, qb, kb] else "." for kb in range(qb + 1)))
        if n < self.num_blocks:
            lines.append(f"(first {n} of {self.num_blocks} blocks)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        kind = (f"local_blocks={self.local_blocks}, vert_stride={self.vert_stride}" if self.is_rule
                else "custom mask")
        head = (f"BlockSparseLayout(num_heads={self.num_heads}, block_size={self.block_size}, "
                f"max_seqlen={self.max_seqlen}, {kind}, density@max_seqlen={self.density(self.max_seqlen):.3f})")
        if self.num_blocks <= 16:
            return head + "\n" + self.to_text(heads=range(min(self.num_heads, 2)))
        return head

    def _repr_png_(self) -> bytes | None:
        """PNG of up to 4 heads' masks for notebooks (needs matplotlib; returns None without it)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        heads = min(self.num_heads, 4)
        n = min(self.num_blocks, 256)
        mask = self.block_mask(n, n)
        fig, axes = plt.subplots(1, heads, figsize=(3 * heads, 3), squeeze=False)
        for h in range(heads):
            ax = axes[0, h]
            ax.imshow(mask[h], cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
            ax.set_title(f"head {h}")
            ax.set_xlabel("key block")
            ax.set_ylabel("query block")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        return buf.getvalue()


def _rows_of(indptr: np.ndarray, h: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Row index of CSR entry ``pos`` of head ``h`` (vectorised ``searchsorted`` per head)."""
    rows = np.empty(h.size, dtype=np.int64)
    for head in np.unique(h):
        sel = h == head
        rows[sel] = np.searchsorted(indptr[head], pos[sel], side="right") - 1
    return rows


@functools.lru_cache(maxsize=64)
def _rule_csr_one(offset: int, num_blocks: int, local_blocks: int, vert_stride: int):
    qb = np.arange(num_blocks)[:, None]
    kb = np.arange(num_blocks)[None, :]
    indptr, indices = _csr_from_masks(_rule(qb, kb, offset, local_blocks, vert_stride)[None])
    return indptr[0], indices[0]


def _rule_csr(offsets: np.ndarray, num_blocks: int, local_blocks: int, vert_stride: int):
    """CSR of the rule for each head; heads with equal ``offset % vert_stride`` share one computation."""
    unique, inverse = np.unique(offsets, return_inverse=True)
    parts = [_rule_csr_one(int(o), num_blocks, local_blocks, vert_stride) for o in unique]
    width = max(p[1].size for p in parts)
    indptr = np.stack([parts[i][0] for i in inverse])
    indices = np.full((offsets.size, width), -1, dtype=np.int32)
    for j, i in enumerate(inverse):
        indices[j, :parts[i][1].size] = parts[i][1]
    return indptr, indices


def _validate_csr(indptr: np.ndarray, indices: np.ndarray) -> None:
    """User-given CSR: monotone pointers, columns in range, ascending, causal, diagonal last in non-empty rows."""
    ptr = indptr.astype(np.int64)
    if (ptr[:, 0] != 0).any():
        raise ValueError("indptr[:, 0] must be 0 for every head")
    if (np.diff(ptr, axis=1) < 0).any():
        raise ValueError("indptr must be non-decreasing along each head")
    if (ptr[:, -1] > indices.shape[1]).any():
        raise ValueError(f"indptr[:, -1] (max {int(ptr[:, -1].max())}) exceeds indices' width "
                         f"({indices.shape[1]})")
    mask = np.zeros((indptr.shape[0], indptr.shape[1] - 1, indptr.shape[1] - 1), dtype=bool)
    for h in range(indptr.shape[0]):
        nnz = int(ptr[h, -1])
        cols = indices[h, :nnz].astype(np.int64)
        rows = np.searchsorted(ptr[h], np.arange(nnz), side="right") - 1
        if ((cols < 0) | (cols > rows)).any():
            i = int(np.argmax((cols < 0) | (cols > rows)))
            raise ValueError(f"head {h} row {int(rows[i])}: column {int(cols[i])} must be in [0, row] (causal)")
        same_row = rows[1:] == rows[:-1]
        if (same_row & (cols[1:] <= cols[:-1])).any():
            raise ValueError(f"head {h}: columns must be strictly ascending within each row")
        mask[h, rows, cols] = True
    BlockSparseLayout.from_mask(mask, 16)  # diagonal check, same messages


def get_sparse_attn_mask(n_heads: int, q_len: int, max_seqlen: int, block_size: int = 64, local_blocks: int = 4,
                         vert_stride: int = 4, homo_head: bool = True, return_dense: bool = False,
                         dense_mask_type: str = "binary"):
    """vLLM's ``get_sparse_attn_mask`` in NumPy: ``((crow, col), block_mask, dense_mask_or_None)``.

    Parameters
    ----------
    n_heads : int
        Total query heads (the pattern slides with ``get_head_sliding_step(n_heads, vert_stride, homo_head)``).
    q_len : int
        Rows kept: the last ``ceil(q_len / block_size)`` query blocks (vLLM passes ``max_seqlen``).
    max_seqlen, block_size, local_blocks, vert_stride, homo_head
        As in :class:`BlocksparseParams`.
    return_dense : bool
        Also build the token-level mask ``[H, q_len, max_seqlen]`` (causal inside diagonal blocks).
    dense_mask_type : {"binary", "bias"}
        ``binary``: 1 keep / 0 drop (float32); ``bias``: 0 keep / -inf drop (float32).

    Returns
    -------
    (crow, col) : int64 ``[H, nq+1]``, int64 ``[H, max_nnz]`` (-1 padded); for ``homo_head`` a read-only broadcast
        of one head's row to ``H`` rows, like vLLM's ``expand``.
    block_mask : bool ``[H, nq, NB]`` (``[nq, NB]`` for ``homo_head``)
    dense : float32 ``[H, q_len, max_seqlen]`` (``[q_len, max_seqlen]`` for homo) or None.

    Unlike vLLM, rows and columns are aligned to token positions even when ``max_seqlen % block_size != 0``:
    token row ``i`` of the dense mask is query position ``max_seqlen - q_len + i``.
    """
    n_heads = check_int("n_heads", n_heads, minimum=1)
    q_len = check_int("q_len", q_len, minimum=1)
    max_seqlen = check_int("max_seqlen", max_seqlen, minimum=1)
    if q_len > max_seqlen:
        raise ValueError(f"q_len ({q_len}) must be <= max_seqlen ({max_seqlen})")
    if dense_mask_type not in ("binary", "bias"):
        raise ValueError(f"dense_mask_type must be 'binary' or 'bias', got {dense_mask_type!r}")
    step = get_head_sliding_step(n_heads, vert_stride, homo_head)
    heads = 1 if homo_head else n_heads
    layout = BlockSparseLayout.local_strided(heads, max_seqlen, block_size, local_blocks, vert_stride, step)
    nb = layout.num_blocks
    nq = -(-q_len // block_size)
    block_mask = layout.block_mask()[:, nb - nq:, :]
    # The kept rows are a suffix of the layout's CSR rows: shift pointers and columns left per head.
    first = layout.indptr[:, nb - nq].astype(np.int64)
    crow = layout.indptr[:, nb - nq:].astype(np.int64) - first[:, None]
    col = np.full((heads, max(int(crow[:, -1].max()), 1)), -1, dtype=np.int64)
    for h in range(heads):
        col[h, :crow[h, -1]] = layout.indices[h, first[h]:first[h] + crow[h, -1]]
    dense = None
    if return_dense:
        first = max_seqlen - q_len                            # absolute position of token row 0
        qpos = np.arange(first, max_seqlen)
        kpos = np.arange(max_seqlen)
        keep = block_mask[:, qpos // block_size - (nb - nq)][:, :, kpos // block_size]
        keep &= kpos[None, None, :] <= qpos[None, :, None]
        if dense_mask_type == "binary":
            dense = keep.astype(np.float32)
        else:
            dense = np.where(keep, np.float32(0), np.float32(-np.inf))
        if homo_head:
            dense = dense[0]
    if homo_head:
        block_mask = block_mask[0]
        crow = np.broadcast_to(crow, (n_heads, crow.shape[1]))
        col = np.broadcast_to(col, (n_heads, col.shape[1]))
    return (crow, col), block_mask, dense
