"""Launcher for cuda_src/debug.cu: the GPU copy of the block rule, materialised for tests."""

from __future__ import annotations

import numpy as np

from . import _kernels

SOURCE = _kernels.register(_kernels.KernelSource("debug.cu", ("layout_mask",)))


def layout_mask(offsets, num_blocks: int, local_blocks: int, vert_stride: int):
    """uint8 cupy ``[len(offsets), num_blocks, num_blocks]``: ``is_block_active`` for each head's stripe offset."""
    import cupy

    offsets = cupy.asarray(np.asarray(offsets, dtype=np.int32))
    heads = offsets.size
    mask = cupy.empty((heads, num_blocks, num_blocks), dtype=cupy.uint8)
    kernel = _kernels.get_function(SOURCE.filename, "layout_mask")
    kernel((min(4096, -(-mask.size // 256)),), (256,),
           (mask, offsets, np.int32(heads), np.int32(num_blocks), np.int32(local_blocks), np.int32(vert_stride)))
    return mask
