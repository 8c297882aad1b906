// Paged KV cache kernels with vLLM's layout: reshape_and_cache (scatter new tokens' K/V into their slots, optionally
// quantising to fp8 E4M3) and copy_blocks (whole-block copies for every layer in one launch).
// key_cache [num_blocks, H, D/x, block_size, x] and value_cache [num_blocks, H, D, block_size], x = 16 bytes / elem.
// reshape_and_cache: one CTA per (tile of 16 tokens, range of heads), grid (tiles, ranges); K/V staged in shared
// memory by cp.async, then stored as 16-byte key chunks and (prefill tiles) whole 16-slot value row pieces.
// reshape_and_cache_tokens (small batches, e.g. decode): one thread per (token, key chunk), one load phase.
// copy_blocks: one CTA per (pair, layer * 2 + {key, value}).
#include <cuda_fp8.h>

#include "common.cuh"

namespace cubsattn {

constexpr int kTileTokens = 16;  // tokens per tile: a 32-byte bf16/fp16 (16-byte fp8) value row piece
constexpr int kCacheThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------------------------
// Register helpers. A uint4 holds 8 consecutive elements of T (a "chunk"): element i in the low (i even) or high
// (i odd) half of word i / 2.

__device__ __forceinline__ unsigned int word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename T> __device__ __forceinline__ float half_to_float(unsigned int bits16);
template <> __device__ __forceinline__ float half_to_float<__half>(unsigned int bits16) {
  return __half2float(__ushort_as_half((unsigned short)bits16));
}
template <> __device__ __forceinline__ float half_to_float<__nv_bfloat16>(unsigned int bits16) {
  return __uint_as_float(bits16 << 16);
}

// Element i of a chunk as float.
template <typename T> __device__ __forceinline__ float element(const uint4& v, int i) {
  return half_to_float<T>((word(v, i / 2) >> (16 * (i & 1))) & 0xffffu);
}

// A chunk at p: one 16-byte load, or (row start or token stride not 16-byte aligned) eight 2-byte loads.
template <typename T> __device__ __forceinline__ uint4 load_chunk(const T* p, bool vector_loads) {
  if (vector_loads) return *reinterpret_cast<const uint4*>(p);
  const unsigned short* e = reinterpret_cast<const unsigned short*>(p);
  return make_uint4(e[0] | ((unsigned int)e[1] << 16), e[2] | ((unsigned int)e[3] << 16),
                    e[4] | ((unsigned int)e[5] << 16), e[6] | ((unsigned int)e[7] << 16));
}

// ---------------------------------------------------------------------------------------------------------------
// fp8 E4M3 quantisation: code of saturate(RN_fp32(x / scale)), round to nearest even, NaN -> NaN (0x7f: the float
// ops return the canonical NaN, so a NaN's sign is not kept).
//
// x / scale without a division: q0 = x * inv (inv = RN(1 / scale), from the host) is within 1.5 ulp, and one fma
// residual step corrects it. For 16-bit x (at most 11 significant bits) this equals IEEE x / scale bit for bit:
// checked exhaustively on the host for every fp16/bf16 significand of x times every fp32 significand of scale (all
// steps are exact power-of-two rescalings of that case while |x / scale| >= 2^-11 and 2^-64 <= scale <= 2^64, the
// range the host enforces, since every intermediate is then normal). Smaller quotients stay below 2^-10 with their
// sign (code +-0, as for the true quotient), and when x * inv overflows (|x / scale| far above 448, or x = +-inf) q0
// itself is returned and saturates. rem uses -x so that x = -0 gives -0. Cost: 3 FP32 ops, against __fdiv_rn's
// MUFU reciprocal + refinement + slow-path check (H200, 64k tokens: the previous kernel's fp8 write ran at 0.45x copy
// bandwidth against 0.71x for bf16; this one at 0.72x against 0.77x).
__device__ __forceinline__ float div_by_scale(float x, float scale, float inv) {
  const float q0 = __fmul_rn(x, inv);
  const float rem = __fmaf_rn(scale, q0, -x);
  const float q1 = __fmaf_rn(-rem, inv, q0);
  return fabsf(q0) == __int_as_float(0x7f800000) ? q0 : q1;
}

__device__ __forceinline__ unsigned int fp8x2(float a, float b, float scale, float inv) {
  return __nv_cvt_float2_to_fp8x2(make_float2(div_by_scale(a, scale, inv), div_by_scale(b, scale, inv)),
                                  __NV_SATFINITE, __NV_E4M3);
}

// ---------------------------------------------------------------------------------------------------------------
// reshape_and_cache: helpers shared by both kernels. An item is (token, key chunk): kKLoads input chunks of 8
// elements (1 for fp16/bf16, 2 for fp8), i.e. one 16-byte key cache chunk.

template <bool kFp8> struct CacheBits { using type = unsigned short; };
template <> struct CacheBits<true> { using type = unsigned char; };

// The key cache chunk of an item from its input chunks in[0 .. kKLoads).
template <typename T, bool kFp8>
__device__ __forceinline__ uint4 key_chunk(const uint4* in, float scale, float inv) {
  if constexpr (kFp8) {
    unsigned int p[8];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      p[w] = fp8x2(element<T>(in[0], 2 * w), element<T>(in[0], 2 * w + 1), scale, inv);
      p[4 + w] = fp8x2(element<T>(in[1], 2 * w), element<T>(in[1], 2 * w + 1), scale, inv);
    }
    return make_uint4(p[0] | (p[1] << 16), p[2] | (p[3] << 16), p[4] | (p[5] << 16), p[6] | (p[7] << 16));
  } else {
    return in[0];
  }
}

// The values of one item at one slot: element e of in[q] goes to column[(8 * q + e) * block_size] (rows d of the
// value cache at the slot's offset). Single-element stores: a lone token has no neighbour to share a row piece with.
template <typename T, bool kFp8>
__device__ __forceinline__ void store_value_column(typename CacheBits<kFp8>::type* column, const uint4* in,
                                                   int block_size, float scale, float inv) {
  using Bits = typename CacheBits<kFp8>::type;
  constexpr int kBits = 8 * (int)sizeof(Bits);
#pragma unroll
  for (int q = 0; q < (kFp8 ? 2 : 1); ++q) {
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const unsigned int pair = kFp8 ? fp8x2(element<T>(in[q], 2 * w), element<T>(in[q], 2 * w + 1), scale, inv)
                                     : word(in[q], w);
      column[(long long)(8 * q + 2 * w) * block_size] = (Bits)pair;
      column[(long long)(8 * q + 2 * w + 1) * block_size] = (Bits)(pair >> kBits);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// reshape_and_cache_tokens: one thread per item, items numbered token-major so that a warp's loads cover whole
// 512-byte pieces of a token's row. The slot and the K/V chunks are loaded in one phase (nothing waits on the slot
// but the stores), so a small batch costs one memory round trip: the host sends batches of up to
// SCATTER_MAX_TOKENS tokens here (decode steps, where every token is alone in its cache block).
template <typename T, bool kFp8, typename SlotT>
__global__ void __launch_bounds__(kCacheThreads) reshape_and_cache_tokens(
    const T* __restrict__ key,              // [num_tokens, H, D], token stride key_stride elements
    const T* __restrict__ value,            // [num_tokens, H, D], token stride value_stride elements
    uint4* __restrict__ key_cache,          // [num_blocks, H, D/x, block_size] chunks of x elements (16 bytes)
    void* __restrict__ value_cache,         // [num_blocks, H, D, block_size] cache elements
    const SlotT* __restrict__ slot_mapping, // [num_tokens]; < 0 or >= num_slots: skipped
    long long key_stride, long long value_stride, int num_tokens, int num_heads, int head_size, int block_size,
    int num_slots, float k_scale, float k_inv, float v_scale, float v_inv, int vector_loads) {
  using Bits = typename CacheBits<kFp8>::type;
  constexpr int kKLoads = kFp8 ? 2 : 1;
  const int key_chunks = num_heads * head_size / (8 * kKLoads);
  const int item = blockIdx.x * kCacheThreads + threadIdx.x;  // < num_tokens * key_chunks + 255 < 2^31 (host)
  const int t = item / key_chunks, c = item - t * key_chunks;
  if (t >= num_tokens) return;
  const long long raw = slot_mapping[t];
  uint4 k[kKLoads], v[kKLoads];
#pragma unroll
  for (int q = 0; q < kKLoads; ++q) {
    k[q] = load_chunk(key + (long long)t * key_stride + 8 * (kKLoads * c + q), vector_loads);
    v[q] = load_chunk(value + (long long)t * value_stride + 8 * (kKLoads * c + q), vector_loads);
  }
  if (raw < 0 || raw >= num_slots) return;
  const int slot = (int)raw, blk = slot / block_size, off = slot - blk * block_size;
  key_cache[((long long)blk * key_chunks + c) * block_size + off] = key_chunk<T, kFp8>(k, k_scale, k_inv);
  Bits* column = reinterpret_cast<Bits*>(value_cache) + (long long)blk * num_heads * head_size * block_size +
                 (long long)(8 * kKLoads * c) * block_size + off;
  store_value_column<T, kFp8>(column, v, block_size, v_scale, v_inv);
}

// ---------------------------------------------------------------------------------------------------------------
// reshape_and_cache (staged tiles)
//
// A CTA (blockDim.x = a multiple of 32, at most 256) writes one tile (16 tokens) of one part: a range of heads,
// part_chunks 8-element chunks per token (host: the fewest heads holding >= 16 chunks, 2 * part_chunks threads).
// Stage: cp.async copies every token's K and V chunks of the part into shared memory, whatever its slot; no
// registers hold them, so the whole 2 x 16 x part_chunks x 16 bytes are in flight at once (loads into registers
// were sunk below the first stores by ptxas, a few in flight per warp). Rows are XOR-swizzled in 16-byte units
// (chunk c of token t at c ^ swizzle(t)) so that the column reads below hit distinct banks.
// Store, keys (both cases): item (token t = tid % 16, key chunk), 16 bytes at the token's slot; lanes cover two key
// chunks of 16 tokens, so consecutive slots give 2 x 256 contiguous bytes per warp store.
// Store, values:
// - full segment (the 16 tokens fill slots s0 .. s0 + 15 with s0 % 16 == 0, block_size % 16 == 0: a prefill tile):
//   each thread owns whole row pieces (h, d) x 16 slots and writes them with 16-byte stores, so a warp store fills
//   512 contiguous bytes (bf16: thread = rows (2p, 2p + 1) x 8 slots, fp8: thread = row r x 16 slots);
// - otherwise (sequence starts and ends, decode-like scattered slots): item (token, pair of rows), two element stores
//   (lanes = 16 tokens x 2 pairs: 32-byte bf16 row pieces when slots are consecutive). Padding and out-of-range
//   slots store nothing.
// The grid is (tiles, parts) and CTAs start in blockIdx order, part-major: with scattered slots the partial-sector
// element stores to one head's rows meet in L2 before they are written back (H200, 64k tokens in random slots of
// 8 heads x 128, bf16: 1.11 ms with one head per CTA against 2.00 ms with all 8 in one CTA).

__device__ __forceinline__ int swizzle(int t, int mask) { return ((t & 7) ^ ((t >> 3) << 2)) & mask; }

// One 16-byte store. (Writing through a reinterpret_cast<uint4*> of an element pointer, NVVM split the bf16 row
// stores into four 4-byte stores: twice the L2 write sectors, 0.63x copy bandwidth instead of 0.92x on H200.)
__device__ __forceinline__ void store16(void* global, uint4 v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(global), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

__device__ __forceinline__ void cp_async16(void* shared, const void* global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"((unsigned)__cvta_generic_to_shared(shared)),
               "l"(global));
}

template <typename T, bool kFp8, typename SlotT>
__global__ void __launch_bounds__(kCacheThreads) reshape_and_cache(
    const T* __restrict__ key,              // [num_tokens, H, D], token stride key_stride elements
    const T* __restrict__ value,            // [num_tokens, H, D], token stride value_stride elements
    uint4* __restrict__ key_cache,          // [num_blocks, H, D/x, block_size] chunks of x elements (16 bytes)
    void* __restrict__ value_cache,         // [num_blocks, H, D, block_size] cache elements
    const SlotT* __restrict__ slot_mapping, // [num_tokens]; < 0 or >= num_slots: skipped
    long long key_stride, long long value_stride, int num_tokens, int num_heads, int head_size, int block_size,
    int num_slots, float k_scale, float k_inv, float v_scale, float v_inv, int vector_loads, int full_segments,
    int part_chunks, int swizzle_mask) {
  using Bits = typename CacheBits<kFp8>::type;
  constexpr int kKLoads = kFp8 ? 2 : 1;  // input chunks per key cache chunk
  constexpr int kBits = 8 * (int)sizeof(Bits);
  extern __shared__ uint4 stage[];  // keys [16][part_chunks], then values [16][part_chunks] (swizzled chunks)
  uint4* skey = stage;
  uint4* sval = stage + kTileTokens * part_chunks;

  const int tid = threadIdx.x;
  const int t0 = blockIdx.x * kTileTokens;
  const int rows = min(kTileTokens, num_tokens - t0);
  const int c0 = blockIdx.y * part_chunks;  // first input chunk of the part within a token's row

  if (vector_loads) {
    for (int i = tid; i < rows * part_chunks; i += blockDim.x) {
      const int t = i / part_chunks, c = i - t * part_chunks;
      const int s = t * part_chunks + (c ^ swizzle(t, swizzle_mask));
      cp_async16(skey + s, key + (long long)(t0 + t) * key_stride + 8 * (c0 + c));
      cp_async16(sval + s, value + (long long)(t0 + t) * value_stride + 8 * (c0 + c));
    }
    asm volatile("cp.async.commit_group;\n" ::);
  } else {  // a row start or the token stride is not 16-byte aligned: element copies, same layout
    unsigned short* sk16 = reinterpret_cast<unsigned short*>(skey);
    unsigned short* sv16 = reinterpret_cast<unsigned short*>(sval);
    const unsigned short* k16 = reinterpret_cast<const unsigned short*>(key);
    const unsigned short* v16 = reinterpret_cast<const unsigned short*>(value);
    for (int i = tid; i < rows * part_chunks * 8; i += blockDim.x) {
      const int t = i / (8 * part_chunks), e = i - t * 8 * part_chunks, c = e / 8;
      const int s = 8 * (t * part_chunks + (c ^ swizzle(t, swizzle_mask))) + e % 8;
      sk16[s] = k16[(long long)(t0 + t) * key_stride + 8 * c0 + e];
      sv16[s] = v16[(long long)(t0 + t) * value_stride + 8 * c0 + e];
    }
  }

  // Meanwhile: the slot of this thread's token t0 + tid % 16 (every warp holds all 16).
  const int tok = tid & (kTileTokens - 1);
  const long long raw = tok < rows ? (long long)slot_mapping[t0 + tok] : -1;
  const bool valid = raw >= 0 && raw < num_slots;
  const int slot = valid ? (int)raw : -1;
  const int blk = valid ? slot / block_size : 0;
  const int off = slot - blk * block_size;
  const int slot0 = __shfl_sync(kFullMask, slot, 0);
  const bool full = full_segments && slot0 % kTileTokens == 0 &&
                    __all_sync(kFullMask, valid && slot == slot0 + tok);  // uniform over the CTA
  const int swz = swizzle(tok, swizzle_mask);

  if (vector_loads) asm volatile("cp.async.wait_all;\n" ::: "memory");
  __syncthreads();

  // Keys.
  if (valid) {
    const int key_chunks = num_heads * head_size / (8 * kKLoads);
    const long long kbase = ((long long)blk * key_chunks + c0 / kKLoads) * block_size + off;
    for (int c = tid / kTileTokens; c < part_chunks / kKLoads; c += blockDim.x / kTileTokens) {
      uint4 in[kKLoads];
#pragma unroll
      for (int q = 0; q < kKLoads; ++q) in[q] = skey[tok * part_chunks + ((kKLoads * c + q) ^ swz)];
      key_cache[kbase + (long long)c * block_size] = key_chunk<T, kFp8>(in, k_scale, k_inv);
    }
  }

  // Values: rows 8 * c0 .. 8 * (c0 + part_chunks) - 1 of the cache block.
  const long long value_block = (long long)num_heads * head_size * block_size;
  Bits* vcache = reinterpret_cast<Bits*>(value_cache);
  if (full) {
    Bits* seg = vcache + (long long)(slot0 / block_size) * value_block + (long long)(8 * c0) * block_size +
                slot0 % block_size;
    if constexpr (kFp8) {
      // Thread = row r: its 16 slots are one 16-byte store.
      const unsigned short* sv16 = reinterpret_cast<const unsigned short*>(sval);
      for (int r = tid; r < 8 * part_chunks; r += blockDim.x) {
        unsigned int q[8];
#pragma unroll
        for (int m = 0; m < 8; ++m) {
          const int a = 2 * m, b = 2 * m + 1;
          q[m] = fp8x2(half_to_float<T>(sv16[8 * (a * part_chunks + ((r / 8) ^ swizzle(a, swizzle_mask))) + r % 8]),
                       half_to_float<T>(sv16[8 * (b * part_chunks + ((r / 8) ^ swizzle(b, swizzle_mask))) + r % 8]),
                       v_scale, v_inv);
        }
        store16(seg + (long long)r * block_size,
                make_uint4(q[0] | (q[1] << 16), q[2] | (q[3] << 16), q[4] | (q[5] << 16), q[6] | (q[7] << 16)));
      }
    } else {
      // Thread = rows (2p, 2p + 1) x slots 8k .. 8k + 7: 8 word reads (tokens 8k + i, elements 2p and 2p + 1)
      // give two 16-byte stores; adjacent lanes hold the two halves of a row.
      const unsigned int* sw = reinterpret_cast<const unsigned int*>(sval);
      for (int i = tid; i < 8 * part_chunks; i += blockDim.x) {
        const int p = i / 2, k = i & 1;
        unsigned int w[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int t = 8 * k + j;
          w[j] = sw[4 * (t * part_chunks + ((p / 4) ^ swizzle(t, swizzle_mask))) + p % 4];
        }
        Bits* row = seg + (long long)(2 * p) * block_size + 8 * k;
        store16(row, make_uint4(__byte_perm(w[0], w[1], 0x5410), __byte_perm(w[2], w[3], 0x5410),
                                __byte_perm(w[4], w[5], 0x5410), __byte_perm(w[6], w[7], 0x5410)));
        store16(row + block_size, make_uint4(__byte_perm(w[0], w[1], 0x7632), __byte_perm(w[2], w[3], 0x7632),
                                             __byte_perm(w[4], w[5], 0x7632), __byte_perm(w[6], w[7], 0x7632)));
      }
    }
  } else if (valid) {
    // Item (token tok, row pair p): elements 2p and 2p + 1 of the token's word p.
    const unsigned int* sw = reinterpret_cast<const unsigned int*>(sval);
    Bits* column = vcache + (long long)blk * value_block + (long long)(8 * c0) * block_size + off;
    for (int p = tid / kTileTokens; p < 4 * part_chunks; p += blockDim.x / kTileTokens) {
      const unsigned int w = sw[4 * (tok * part_chunks + ((p / 4) ^ swz)) + p % 4];
      const unsigned int pair = kFp8 ? fp8x2(half_to_float<T>(w & 0xffffu), half_to_float<T>(w >> 16), v_scale,
                                             v_inv)
                                     : w;
      column[(long long)(2 * p) * block_size] = (Bits)pair;
      column[(long long)(2 * p + 1) * block_size] = (Bits)(pair >> kBits);
    }
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
