// blocksparse_prefill_paged: prefill.cu's kernel with the first context_len keys of each sequence read from vLLM's
// paged cache through its block table (chunked prefill / prefix caching) and the rest from this step's K/V.
// key_cache [blocks, H_kv, D/x, bs, x], value_cache [blocks, H_kv, D, bs] (fp16/bf16, or fp8 E4M3 codes dequantised
// to T on the way to shared memory); q, k_new, v_new, out as in prefill.cu. Grid and tiles as in prefill.cu.
// A separate NVRTC module, so plain prefill does not compile it.
#include "prefill.cu"

// ---------------------------------------------------------------------------------------------------------------
// Entry point over the paged cache plus this step's K/V. Sequence s has k_len = cu_k[s+1] - cu_k[s] keys of which
// the first past = k_len - q_len are cached; k_new / v_new rows are packed like q (cu_q). CT: T or unsigned char
// (fp8 E4M3). Dynamic shared memory (BLOCK_M + 2 * BLOCK_N) * (D + 8) * sizeof(T) + 2 * V stage (the larger of
// BLOCK_N * (D + 8) and D * (BLOCK_N + 8) elements).

template <typename T, typename CT, int HEAD_DIM, int BLOCK_M, int WARPS, int BLOCK_N>
__global__ void __launch_bounds__(WARPS * 32) blocksparse_prefill_paged(
    const T* __restrict__ q, long long q_tok, int q_head,      // [T_q, H_q, D]
    const T* __restrict__ k, long long k_tok, int k_head,      // [T_q, H_kv, D]: keys of the new tokens
    const T* __restrict__ v, long long v_tok, int v_head,      // [T_q, H_kv, D]
    T* __restrict__ out, long long o_tok, int o_head,          // [T_q, H_q, D]
    const CT* __restrict__ key_cache,                          // [num_cache_blocks, H_kv, D / x, bs, x]
    const CT* __restrict__ value_cache,                        // [num_cache_blocks, H_kv, D, bs]
    const int* __restrict__ block_tables, int table_stride,    // [batch, table_stride]
    long long cache_block_stride, int cache_head_stride, int bs_shift,  // H_kv * D * bs, D * bs, log2(bs)
    float k_scale, float v_scale,                              // fp8 dequantisation scales
    const int* __restrict__ tiles,                             // [num_tiles, 2]
    const int* __restrict__ cu_q, const int* __restrict__ cu_k,  // [batch + 1] each
    const int* __restrict__ indptr, const int* __restrict__ indices,  // [H_q, NB + 1], [H_q, nnz_stride]
    int num_heads, int group, int num_blocks, int nnz_stride, int block_size, float scale_log2) {
  using KV = cubsattn::prefill::ContiguousKV<T>;
  using Cache = cubsattn::prefill::PagedCache<CT>;
  const KV kv_k{k, k_tok, k_head, cu_q, k};
  const KV kv_v{v, v_tok, v_head, cu_q, v};
  const Cache cache{key_cache, value_cache, block_tables, cache_block_stride, cache_head_stride, table_stride,
                    bs_shift, k_scale, v_scale, nullptr, nullptr, nullptr};
  cubsattn::prefill::prefill_tile<T, HEAD_DIM, BLOCK_M, WARPS, BLOCK_N, KV, Cache>(
      q, q_tok, q_head, out, o_tok, o_head, kv_k, kv_v, cache, tiles, cu_q, cu_k, indptr, indices, num_heads, group,
      num_blocks, nnz_stride, block_size, scale_log2);
}
