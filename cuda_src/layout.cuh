// The GPU copy of the block-sparse rule (the NumPy copy is cubsattn/layout.py::_rule). Both must agree exactly;
// tests/test_layout_gpu.py compares them through debug.cu::layout_mask.
#pragma once

namespace cubsattn {

// Block (qb, kb) is active for a head whose stripe offset is `offset` (h*step + 1, or kv_head*(-step) + 1):
//   qb >= kb and (qb - kb < local_blocks or (kb + offset) % vert_stride == 0)
__host__ __device__ __forceinline__ bool is_block_active(int qb, int kb, int offset, int local_blocks,
                                                         int vert_stride) {
  return qb >= kb && (qb - kb < local_blocks || (kb + offset) % vert_stride == 0);
}

}  // namespace cubsattn
