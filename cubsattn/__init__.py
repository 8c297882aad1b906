"""cubsattn: block-sparse flash attention for LLM inference on CuPy, with vLLM's block-sparse semantics.

Arrays are NumPy (runs the NumPy backend on the CPU) or CuPy (runs the CUDA kernels); no PyTorch.
"""

from __future__ import annotations

import functools

from .attention import LocalStridedBlockSparseAttn, blocksparse_prefill, blocksparse_prefill_paged
from .layout import BlockSparseLayout, get_sparse_attn_mask
from .params import BlocksparseParams, get_head_sliding_step

__version__ = "0.1.0"


def __getattr__(name):
    # Imported lazily so that ``import cubsattn`` stays light and never needs CuPy.
    if name == "PagedAttention":
        from .paged_attention import PagedAttention

        return PagedAttention
    raise AttributeError(f"module 'cubsattn' has no attribute {name!r}")


@functools.cache
def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device (checked once per process)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: the NumPy backend still works
        return False


__all__ = [
    "BlockSparseLayout",
    "BlocksparseParams",
    "LocalStridedBlockSparseAttn",
    "PagedAttention",
    "blocksparse_prefill",
    "blocksparse_prefill_paged",
    "get_head_sliding_step",
    "get_sparse_attn_mask",
    "gpu_available",
]
