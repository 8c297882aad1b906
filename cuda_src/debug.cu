// layout_mask: materialises is_block_active() for tests, so the GPU rule can be compared with layout.py's.
// mask: uint8 [num_heads, num_blocks, num_blocks]; offsets: int32 [num_heads]. One thread per (head, qb, kb).
#include "common.cuh"
#include "layout.cuh"

extern "C" __global__ void layout_mask(unsigned char* __restrict__ mask,    // [H, NB, NB]
                                       const int* __restrict__ offsets,     // [H]
                                       int num_heads, int num_blocks, int local_blocks, int vert_stride) {
  const long long total = (long long)num_heads * num_blocks * num_blocks;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const int kb = (int)(i % num_blocks);
    const int qb = (int)((i / num_blocks) % num_blocks);
    const int h = (int)(i / ((long long)num_blocks * num_blocks));
    mask[i] = cubsattn::is_block_active(qb, kb, offsets[h], local_blocks, vert_stride) ? 1 : 0;
  }
}
