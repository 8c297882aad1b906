// Paged KV cache kernels with vLLM's layout: reshape_and_cache (scatter new tokens' K/V into their slots, optionally
// quantising to fp8 E4M3) and copy_blocks (whole-block copies for every layer in one launch).
// key_cache [num_blocks, H, D/x, block_size, x] and value_cache [num_blocks, H, D, block_size], x = 16 bytes / elem.
// reshape_and_cache: one CTA per (tile of kTileTokens tokens, kv head), staged through shared memory so that lanes
// map to tokens on the write side. copy_blocks: one CTA per (pair, layer * 2 + {key, value}).
#include <cuda_fp8.h>

#include "common.cuh"

namespace cubsattn {

constexpr int kTileTokens = 32;    // tokens per CTA: one per lane on the write side
constexpr int kCacheThreads = 256;
constexpr int kLoadUnroll = 4;     // 16-byte loads per thread and tensor issued before their shared stores

// ---------------------------------------------------------------------------------------------------------------
// Conversion of two staged elements (one 32-bit word of T) into the cache element type.

template <typename T> __device__ __forceinline__ float bits_to_float(unsigned int bits);
template <> __device__ __forceinline__ float bits_to_float<__half>(unsigned int bits) {
  return __half2float(__ushort_as_half((unsigned short)bits));
}
template <> __device__ __forceinline__ float bits_to_float<__nv_bfloat16>(unsigned int bits) {
  return __bfloat162float(__ushort_as_bfloat16((unsigned short)bits));
}

// A pair of cache elements packed little-endian: element d in the low half, d + 1 in the high half.
template <typename T, bool kFp8> struct CachePair;
template <typename T> struct CachePair<T, false> {
  using type = unsigned int;
  static __device__ __forceinline__ unsigned int convert(unsigned int w, float) { return w; }
};
template <typename T> struct CachePair<T, true> {
  using type = unsigned short;
  // saturate(x / scale), round to nearest even; NaN stays NaN. __fdiv_rn keeps the division IEEE under any flags.
  static __device__ __forceinline__ unsigned short convert(unsigned int w, float scale) {
    const float2 f = make_float2(__fdiv_rn(bits_to_float<T>(w & 0xffffu), scale),
                                 __fdiv_rn(bits_to_float<T>(w >> 16), scale));
    return (unsigned short)__nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E4M3);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// reshape_and_cache

template <bool kFp8> struct CacheBits { using type = unsigned short; };
template <> struct CacheBits<true> { using type = unsigned char; };

// Shared memory: slots [kTileTokens] (int64), key tile [kTileTokens][key_pitch] uint4, value tile
// [kTileTokens][value_pitch] uint32. Both pitches are odd (in 16-byte / 4-byte units) so that 8 (resp. 32) lanes
// reading one column of consecutive rows hit distinct banks.
template <typename T, bool kFp8, typename SlotT>
__global__ void __launch_bounds__(kCacheThreads) reshape_and_cache(
    const T* __restrict__ key,              // [num_tokens, H, D], token stride key_stride elements
    const T* __restrict__ value,            // [num_tokens, H, D], token stride value_stride elements
    uint4* __restrict__ key_cache,          // [num_blocks, H, D/x, block_size] chunks of x elements (16 bytes)
    void* __restrict__ value_cache,          // [num_blocks, H, D, block_size] cache elements
    const SlotT* __restrict__ slot_mapping, // [num_tokens]; < 0 or >= num_slots: skipped
    long long key_stride, long long value_stride, int num_tokens, int num_heads, int head_size, int block_size,
    long long num_slots, float k_scale, float v_scale, int vector_loads) {
  using Bits = typename CacheBits<kFp8>::type;      // raw cache element: 1 byte (fp8) or 2 bytes
  constexpr int kX = 16 / (int)sizeof(Bits);        // cache elements per key chunk

  extern __shared__ uint4 smem[];
  long long* s_slot = reinterpret_cast<long long*>(smem);
  const int vecs_per_row = head_size / 8;  // uint4 of T per (token, head)
  const int key_pitch = vecs_per_row | 1;
  const int value_pitch = (head_size / 2) | 1;
  uint4* s_key = smem + kTileTokens * sizeof(long long) / sizeof(uint4);
  unsigned int* s_value = reinterpret_cast<unsigned int*>(s_key + kTileTokens * key_pitch);

  const int tile = blockIdx.x * kTileTokens;
  const int head = blockIdx.y;
  const int tid = threadIdx.x;
  // Slots and K/V are fetched in the same phase (no round trip between them): every token < num_tokens is loaded
  // whatever its slot, and the write phase skips padding and out-of-range slots.
  if (tid < kTileTokens) {
    const int t = tile + tid;
    const long long slot = t < num_tokens ? (long long)slot_mapping[t] : -1;
    s_slot[tid] = (slot >= 0 && slot < num_slots) ? slot : -1;
  }
  const int rows = min(kTileTokens, num_tokens - tile);
  const T* key_tile = key + (long long)tile * key_stride + (long long)head * head_size;
  const T* value_tile = value + (long long)tile * value_stride + (long long)head * head_size;
  if (vector_loads) {
    // Coalesced along head_size; kLoadUnroll independent loads per tensor in flight before the shared stores.
    const int n = rows * vecs_per_row;
    for (int i0 = tid; i0 < n; i0 += kLoadUnroll * kCacheThreads) {
      uint4 k[kLoadUnroll], v[kLoadUnroll];
#pragma unroll
      for (int j = 0; j < kLoadUnroll; ++j) {
        const int i = i0 + j * kCacheThreads, t = i / vecs_per_row, c = i % vecs_per_row;
        if (i < n) {
          k[j] = reinterpret_cast<const uint4*>(key_tile + t * key_stride)[c];
          v[j] = reinterpret_cast<const uint4*>(value_tile + t * value_stride)[c];
        }
      }
#pragma unroll
      for (int j = 0; j < kLoadUnroll; ++j) {
        const int i = i0 + j * kCacheThreads, t = i / vecs_per_row, c = i % vecs_per_row;
        if (i < n) {
          s_key[t * key_pitch + c] = k[j];
          unsigned int* dst = s_value + t * value_pitch + 4 * c;
          dst[0] = v[j].x;
          dst[1] = v[j].y;
          dst[2] = v[j].z;
          dst[3] = v[j].w;
        }
      }
    }
  } else {  // token stride or base not 16-byte aligned: element loads, same staging layout
    for (int i = tid; i < rows * head_size; i += kCacheThreads) {
      const int t = i / head_size, d = i % head_size;
      reinterpret_cast<T*>(s_key + t * key_pitch)[d] = key_tile[t * key_stride + d];
      reinterpret_cast<T*>(s_value + t * value_pitch)[d] = value_tile[t * value_stride + d];
    }
  }
  __syncthreads();

  // Keys: lanes = consecutive tokens of one chunk, so a warp writes consecutive 16-byte chunks of a block.
  const int chunks = head_size / kX;
  for (int i = tid; i < kTileTokens * chunks; i += kCacheThreads) {
    const int t = i % kTileTokens, c = i / kTileTokens;
    const long long slot = s_slot[t];
    if (slot < 0) continue;
    const long long blk = slot / block_size, off = slot % block_size;
    uint4 out;
    if constexpr (kFp8) {
      const uint4 a = s_key[t * key_pitch + 2 * c], b = s_key[t * key_pitch + 2 * c + 1];
      using P = CachePair<T, true>;
      out.x = P::convert(a.x, k_scale) | ((unsigned int)P::convert(a.y, k_scale) << 16);
      out.y = P::convert(a.z, k_scale) | ((unsigned int)P::convert(a.w, k_scale) << 16);
      out.z = P::convert(b.x, k_scale) | ((unsigned int)P::convert(b.y, k_scale) << 16);
      out.w = P::convert(b.z, k_scale) | ((unsigned int)P::convert(b.w, k_scale) << 16);
    } else {
      out = s_key[t * key_pitch + c];
    }
    key_cache[((blk * num_heads + head) * chunks + c) * block_size + off] = out;
  }

  // Values: lanes = consecutive tokens of one pair of rows (d, d + 1); tokens in consecutive slots of a block write
  // consecutive addresses of each row.
  Bits* vcache = reinterpret_cast<Bits*>(value_cache);
  for (int i = tid; i < kTileTokens * (head_size / 2); i += kCacheThreads) {
    const int t = i % kTileTokens, dp = i / kTileTokens;
    const long long slot = s_slot[t];
    if (slot < 0) continue;
    const long long blk = slot / block_size, off = slot % block_size;
    const auto pair = CachePair<T, kFp8>::convert(s_value[t * value_pitch + dp], v_scale);
    const long long row = ((blk * num_heads + head) * head_size + 2 * dp) * block_size + off;
    vcache[row] = (Bits)pair;
    vcache[row + block_size] = (Bits)(pair >> (8 * sizeof(Bits)));
  }
}

}  // namespace cubsattn

// ---------------------------------------------------------------------------------------------------------------
// copy_blocks

// table: int64 [2 * num_layers + 2 * num_pairs]: the key and value base address of every layer (as integers), then
// the (src, dst) block pairs. Blocks are block_vecs 16-byte vectors; sources and destinations are disjoint (checked
// on the host), so the copies of one launch never race.
extern "C" __global__ void __launch_bounds__(256) copy_blocks(const long long* __restrict__ table, int num_layers,
                                                              long long block_vecs) {
  constexpr int kUnroll = 4;
  uint4* base = reinterpret_cast<uint4*>(table[blockIdx.y]);
  const long long* pair = table + 2 * num_layers + 2 * (long long)blockIdx.x;
  const uint4* src = base + pair[0] * block_vecs;
  uint4* dst = base + pair[1] * block_vecs;
  // kUnroll loads in flight per thread before the stores.
  for (long long i = threadIdx.x; i < block_vecs; i += kUnroll * (long long)blockDim.x) {
    uint4 r[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const long long k = i + j * (long long)blockDim.x;
      if (k < block_vecs) r[j] = src[k];
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const long long k = i + j * (long long)blockDim.x;
      if (k < block_vecs) dst[k] = r[j];
    }
  }
}
