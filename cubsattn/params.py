"""BlocksparseParams: vLLM's block-sparse configuration, with tensor-parallel rank and size passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._checks import check_divisible, check_int


def get_head_sliding_step(num_heads: int, vert_stride: int, homo_head: bool = False) -> int:
    """How far the vertical stripes move from one head to the next (vLLM's rule).

    ``0`` for ``homo_head``, else ``max(1, int(vert_stride / num_heads))``.

    >>> get_head_sliding_step(32, 8)   # Phi-3-small
    1
    >>> get_head_sliding_step(2, 8)
    4
    """
    if homo_head:
        return 0
    return max(1, int(vert_stride / num_heads))


@dataclass(frozen=True)
class BlocksparseParams:
    """Block-sparse attention parameters of one tensor-parallel rank (vLLM-compatible, no global state).

    Parameters
    ----------
    max_seqlen : int
        Longest sequence (in tokens) any call may see; longer ones are rejected.
    num_heads, num_kv_heads : int
        Query and key/value heads **of this rank**. ``num_heads`` must be a multiple of ``num_kv_heads``.
    block_size : int
        Sparse block size in tokens (a multiple of 16; Phi-3-small uses 64).
    local_blocks : int
        Each query block sees this many most recent key blocks, itself included (>= 1).
    vert_stride : int
        Every ``vert_stride``-th key block (shifted per head) is also seen (>= 1; 1 means dense causal).
    homo_head : bool
        All heads share one pattern (``head_sliding_step == 0``).
    homo_head_group : bool
        Stripes slide per kv head instead of per query head (negative ``head_sliding_step``); applied to prefill
        and decode alike.
    tp_rank, tp_size : int
        This rank and the number of ranks; global head ``h`` of this rank is ``tp_rank * num_heads + local``.

    Attributes
    ----------
    head_sliding_step : int
        ``0`` (homo), ``-get_head_sliding_step(total_kv_heads, vert_stride)`` (homo_head_group) or
        ``get_head_sliding_step(total_heads, vert_stride)``.
    active_head_range : tuple[int, int]
        Global query heads ``[tp_rank * num_heads, (tp_rank + 1) * num_heads)`` owned by this rank.

    Examples
    --------
    >>> p = BlocksparseParams(8192, 32, 8, 64, 16, 8)   # Phi-3-small, TP=1
    >>> p.head_sliding_step, p.active_head_range
    (1, (0, 32))
    >>> BlocksparseParams(8192, 16, 4, 64, 16, 8, tp_rank=1, tp_size=2).active_head_range
    (16, 32)
    """

    max_seqlen: int
    num_heads: int
    num_kv_heads: int
    block_size: int
    local_blocks: int
    vert_stride: int
    homo_head: bool = False
    homo_head_group: bool = False
    tp_rank: int = field(default=0, kw_only=True)
    tp_size: int = field(default=1, kw_only=True)
    head_sliding_step: int = field(init=False)
    active_head_range: tuple[int, int] = field(init=False)

    def __post_init__(self):
        check_int("max_seqlen", self.max_seqlen, minimum=1)
        check_int("num_heads", self.num_heads, minimum=1)
        check_int("num_kv_heads", self.num_kv_heads, minimum=1)
        check_int("block_size", self.block_size, minimum=1)
        check_divisible("block_size", self.block_size, "16 (the tensor-core tile)", 16)
        check_int("local_blocks", self.local_blocks, minimum=1)
        check_int("vert_stride", self.vert_stride, minimum=1)
        check_int("tp_size", self.tp_size, minimum=1)
        check_int("tp_rank", self.tp_rank)
        check_divisible("num_heads", self.num_heads, "num_kv_heads", self.num_kv_heads)
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank ({self.tp_rank}) must be in [0, tp_size) = [0, {self.tp_size})")
        if self.homo_head and self.homo_head_group:
            raise ValueError("homo_head and homo_head_group are mutually exclusive (homo_head means one pattern "
                             "for all heads; homo_head_group slides it per kv head)")
        if self.homo_head:
            step = 0
        elif self.homo_head_group:
            step = -get_head_sliding_step(self.total_kv_heads, self.vert_stride)
        else:
            step = get_head_sliding_step(self.total_heads, self.vert_stride)
        object.__setattr__(self, "head_sliding_step", step)
        start = self.tp_rank * self.num_heads
        object.__setattr__(self, "active_head_range", (start, start + self.num_heads))

    @property
    def total_heads(self) -> int:
        """Query heads over all ranks."""
        return self.num_heads * self.tp_size

    @property
    def total_kv_heads(self) -> int:
        """Key/value heads over all ranks."""
        return self.num_kv_heads * self.tp_size

    @property
    def num_blocks(self) -> int:
        """Sparse blocks covering ``max_seqlen``: ``ceil(max_seqlen / block_size)``."""
        return -(-self.max_seqlen // self.block_size)

    @property
    def kv_head_range(self) -> tuple[int, int]:
        """Global kv heads ``[tp_rank * num_kv_heads, (tp_rank + 1) * num_kv_heads)`` owned by this rank."""
        start = self.tp_rank * self.num_kv_heads
        return (start, start + self.num_kv_heads)

    @classmethod
    def from_vllm_dict(cls, d: dict, *, tp_rank: int = 0, tp_size: int = 1) -> "BlocksparseParams":
        """Build from the dict vLLM's Phi-3-small model passes (``max_seqlen``, ``num_heads``, ``num_kv_heads``,
        ``block_size``, ``local_blocks``, ``vert_stride``, ``homo_head`` [, ``homo_head_group``])."""
        known = {"max_seqlen", "num_heads", "num_kv_heads", "block_size", "local_blocks", "vert_stride",
                 "homo_head", "homo_head_group"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown blocksparse parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**d, tp_rank=tp_rank, tp_size=tp_size)
