// Paged KV cache kernels with vLLM's layout: reshape_and_cache (scatter new tokens' K/V into their slots, optionally
// quantising to fp8 E4M3) and copy_blocks (whole-block copies for every layer in one launch).
// key_cache [num_blocks, H, D/x, block_size, x] and value_cache [num_blocks, H, D, block_size], x = 16 bytes / elem.
// reshape_and_cache: persistent CTAs walk tiles of 16 tokens x all heads, no shared memory; keys go from registers
// straight to their 16-byte chunks, values are transposed in registers and stored as whole 8-slot row pieces.
// reshape_and_cache_tokens (small batches, e.g. decode): one thread per (token, key chunk), one load phase.
// copy_blocks: one CTA per (pair, layer * 2 + {key, value}).
#include <cuda_fp8.h>

#include "common.cuh"

namespace cubsattn {

constexpr int kTileTokens = 16;  // tokens per tile (lanes 1..16 of every warp hold their slots)
constexpr int kCacheThreads = 256;
constexpr int kSegment = 16;     // slots per group segment: a 32-byte bf16/fp16 value row sector
constexpr int kHalf = 8;         // slots per value store: 16 bytes of bf16/fp16, 8 bytes of fp8
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
// reshape_and_cache (tiles)

//
// A tile is tokens t0 .. t0 + 15. Lane l of every warp holds the slot of token t0 - 1 + l (t0 - 1 .. t0 + 30), from
// which each warp derives the same picture of the tile without shared memory:
// - a token "continues" the previous one when its slot is the next slot of the same cache block and of the same
//   aligned 16-slot segment; a "group" is a leader (a valid token that does not continue) plus its continuations:
//   at most 16 tokens with consecutive slots inside one 16-slot segment of one block. Leaders in lanes 1..16 (the
//   tile's tokens) own their group, which may extend into the next tile's tokens. So one CTA writes all of a
//   segment's tokens (a 32-byte bf16 value row sector when block_size = 16), however sequences align with tiles.
// - keys: item (token, chunk of x cache elements), lanes = 16 tokens x 2 chunks, so each warp store covers two
//   rows of 16 consecutive slots (coalesced whenever slots are consecutive), each load a 32-byte sector per token.
// - values: item (half of a group's segment, chunk of 8 d), over the non-empty halves only: the thread loads the
//   tokens' chunks in that half (<= 8 loads; lanes across chunks, coalesced) and writes 8 rows (h, d) x those slots.
//   A full half (8 slots, 8-aligned) is one 16-byte (fp8: 8-byte) store per row, and the two halves of a segment sit
//   in adjacent lanes, so each warp store fills whole 32-byte row sectors. Partial halves (sequence starts and ends,
//   single decode tokens) store element by element.
// - lone tiles: when every group the tile leads is a single token (scattered slots), the half items would give each
//   thread one value load per round (up to 8 rounds). The values then take the keys' items instead (token, chunk):
//   one round, 8 key and 8 value loads in flight per thread, values stored element by element.
// Padding (slot < 0) and out-of-range slots are in no group and have no key store: nothing is written for them.
// A work unit is (tile, part): the chunks are split into `parts` equal ranges (the host picks parts > 1 only when
// there are too few tiles to fill the GPU). Persistent CTAs walk the units; the next unit's slots are loaded before
// this unit's work, so their latency is hidden. (Also prefetching the next unit's K/V rows into L2 made 64k-token
// prefill writes slower on H200: 0.203 against 0.167 ms bf16, 0.158 against 0.137 ms fp8.)
template <typename T, bool kFp8, typename SlotT>
__global__ void __launch_bounds__(kCacheThreads, 2) reshape_and_cache(
    const T* __restrict__ key,              // [num_tokens, H, D], token stride key_stride elements
    const T* __restrict__ value,            // [num_tokens, H, D], token stride value_stride elements
    uint4* __restrict__ key_cache,          // [num_blocks, H, D/x, block_size] chunks of x elements (16 bytes)
    void* __restrict__ value_cache,         // [num_blocks, H, D, block_size] cache elements
    const SlotT* __restrict__ slot_mapping, // [num_tokens]; < 0 or >= num_slots: skipped
    long long key_stride, long long value_stride, int num_tokens, int num_heads, int head_size, int block_size,
    int num_slots, float k_scale, float k_inv, float v_scale, float v_inv, int vector_loads, int vector_rows,
    int parts) {
  // Cache element: 1 byte (fp8) or 2; key chunk = x cache elements = kKLoads input chunks of 8.
  using Bits = typename CacheBits<kFp8>::type;
  constexpr int kKLoads = kFp8 ? 2 : 1;
  constexpr int kKItems = 8 / kKLoads;  // key items per thread and round: 8 input chunks, as for the values

  const int lane = threadIdx.x & 31;
  const int num_units = (num_tokens + kTileTokens - 1) / kTileTokens * parts;
  const int in_chunks = num_heads * head_size / 8;     // 8-element input chunks per token (all heads)
  const int key_chunks = in_chunks / kKLoads;          // 16-byte key cache chunks per token
  const int part_chunks = in_chunks / parts;           // input chunks of one unit (parts divides key_chunks)
  const int part_key_chunks = key_chunks / parts;
  const long long key_block = (long long)key_chunks * block_size;               // in 16-byte chunks
  const long long value_block = (long long)num_heads * head_size * block_size;  // in cache elements

  auto load_slot = [&](int unit) -> long long {
    const int t = unit / parts * kTileTokens - 1 + lane;
    return (t >= 0 && t < num_tokens) ? (long long)slot_mapping[t] : -1;
  };
  long long next_slot = blockIdx.x < num_units ? load_slot(blockIdx.x) : -1;

  for (int unit = blockIdx.x; unit < num_units; unit += gridDim.x) {
    const int t0 = unit / parts * kTileTokens;
    const int first_chunk = unit % parts * part_chunks;  // of the input; first key chunk = first_chunk / kKLoads
    const long long raw = next_slot;
    if (unit + (int)gridDim.x < num_units) next_slot = load_slot(unit + gridDim.x);

    // This lane's token: block (-1 if padding / out of range), offset, continuation, and as a leader: its position
    // in its 16-slot segment, group length and non-empty halves (bits 2 * (lane - 1) + half of halves_mask).
    const bool valid = raw >= 0 && raw < num_slots;
    const int slot = valid ? (int)raw : -1;
    const int blk = valid ? slot / block_size : -1;
    const int off = valid ? slot - blk * block_size : 0;
    const int prev = __shfl_up_sync(kFullMask, slot, 1);
    const bool cont = valid && lane > 0 && prev == slot - 1 && slot % kSegment != 0 && off != 0;
    const unsigned cont_mask = __ballot_sync(kFullMask, cont);
    const bool leads = valid && !cont && lane >= 1 && lane <= kTileTokens;
    // 1 + the continuing lanes right after this one (bits past lane 31 read as "not continuing").
    const int run = __ffs(~(cont_mask >> lane) & ~1u) - 1;
    const int pos = slot % kSegment;
    const unsigned my_halves = leads ? (unsigned)(pos < kHalf) | ((unsigned)(pos + run > kHalf) << 1) : 0u;
    unsigned halves_mask = 0;
#pragma unroll
    for (int l = 1; l <= kTileTokens; ++l)
      halves_mask |= (unsigned)__shfl_sync(kFullMask, my_halves, l) << (2 * (l - 1));
    const bool lone = __ballot_sync(kFullMask, leads && run > 1) == 0;  // the same in every warp
    const int num_halves = lone ? 0 : __popc(halves_mask);

    // Keys: this thread's token is t0 + lane % 16 (lane l holds token t0 - 1 + l).
    const int ktok = lane & (kTileTokens - 1);
    const int kblk = __shfl_sync(kFullMask, blk, ktok + 1);
    const int koff = __shfl_sync(kFullMask, off, ktok + 1);
    const long long kbase = (long long)kblk * key_block + koff;
    const T* krow = key + (long long)(t0 + ktok) * key_stride + 8 * first_chunk;
    const bool kload = t0 + ktok < num_tokens;
    // Lone tiles: this thread's token writes its values iff it leads (a continuation of the previous tile's group
    // is written there).
    const bool kleads = __shfl_sync(kFullMask, (int)leads, ktok + 1);
    const T* lone_vrow = value + (long long)(t0 + ktok) * value_stride + 8 * first_chunk;

    const int num_v = num_halves * part_chunks;
    const int rounds = (max(num_halves, 2) * part_chunks + kCacheThreads - 1) / kCacheThreads;
    for (int round = 0; round < rounds; ++round) {
      // Issue every load of the round first (8 key + up to 8 value chunks in flight per thread).
      uint4 kreg[8], vreg[8];
#pragma unroll
      for (int j = 0; j < kKItems; ++j) {
        const int c = (round * kKItems + j) * (kCacheThreads / kTileTokens) + threadIdx.x / kTileTokens;
        if (kload && c < part_key_chunks) {
#pragma unroll
          for (int q = 0; q < kKLoads; ++q)
            kreg[j * kKLoads + q] = load_chunk(krow + 8 * (c * kKLoads + q), vector_loads);
        }
      }
      // Values, lone tiles: the keys' items (token, chunk), kKLoads input chunks each, in vreg[kKLoads * j + q].
      // Otherwise item u = (half u % num_halves, chunk u / num_halves), up to 8 token chunks in vreg[k]. Both
      // branches are taken by the whole CTA (lone is uniform), so the shuffles see every lane.
      int vblk = 0, voff = 0, vcount = 0, vc = 0;
      bool vwork = false;
      if (lone) {
#pragma unroll
        for (int j = 0; j < kKItems; ++j) {
          const int c = (round * kKItems + j) * (kCacheThreads / kTileTokens) + threadIdx.x / kTileTokens;
          if (kleads && c < part_key_chunks) {
#pragma unroll
            for (int q = 0; q < kKLoads; ++q)
              vreg[j * kKLoads + q] = load_chunk(lone_vrow + 8 * (c * kKLoads + q), vector_loads);
          }
        }
      } else {
        const int u = round * kCacheThreads + threadIdx.x;
        const int bit = num_halves ? __fns(halves_mask, 0, u % num_halves + 1) : 0;
        const int lead = bit / 2 + 1, half = bit & 1;
        vblk = __shfl_sync(kFullMask, blk, lead);
        const int vpos = __shfl_sync(kFullMask, pos, lead);
        const int vrun = __shfl_sync(kFullMask, run, lead);
        // Segment positions [p0, p1) of this half hold tokens lead + (p - vpos), slots at offset voff + (p - p0).
        const int p0 = max(vpos, kHalf * half), p1 = min(vpos + vrun, kHalf * half + kHalf);
        voff = __shfl_sync(kFullMask, off, lead) + p0 - vpos;
        vcount = p1 - p0;
        vwork = u < num_v;
        vc = first_chunk + (vwork ? u / num_halves : 0);
        const T* vrow = value + (long long)(t0 - 1 + lead + p0 - vpos) * value_stride + 8 * vc;
#pragma unroll
        for (int k = 0; k < kHalf; ++k)
          vreg[k] = (vwork && k < vcount) ? load_chunk(vrow + k * value_stride, vector_loads)
                                          : make_uint4(0, 0, 0, 0);
      }

      // Keys: one 16-byte chunk per item, at chunk c of the token's slot.
#pragma unroll
      for (int j = 0; j < kKItems; ++j) {
        const int c = (round * kKItems + j) * (kCacheThreads / kTileTokens) + threadIdx.x / kTileTokens;
        if (!(kload && kblk >= 0 && c < part_key_chunks)) continue;
        key_cache[kbase + (long long)(first_chunk / kKLoads + c) * block_size] =
            key_chunk<T, kFp8>(&kreg[j * kKLoads], k_scale, k_inv);
      }

      Bits* vcache = reinterpret_cast<Bits*>(value_cache);
      if (lone) {
        // Rows d = 8 * (first_chunk + kKLoads * c) + (0 .. 8 * kKLoads) at the token's slot.
#pragma unroll
        for (int j = 0; j < kKItems; ++j) {
          const int c = (round * kKItems + j) * (kCacheThreads / kTileTokens) + threadIdx.x / kTileTokens;
          if (!(kleads && c < part_key_chunks)) continue;
          Bits* column = vcache + (long long)kblk * value_block +
                         (long long)(8 * (first_chunk + kKLoads * c)) * block_size + koff;
          store_value_column<T, kFp8>(column, &vreg[j * kKLoads], block_size, v_scale, v_inv);
        }
      } else if (vwork) {
        // Rows d = 8 * vc + j (j < 8) at the half's slots voff .. voff + vcount - 1.
        const long long vbase = (long long)vblk * value_block + (long long)(8 * vc) * block_size + voff;
        // vector_rows (host): block_size % 8 == 0 and an aligned cache, so a full half's 8 slots are aligned.
        const bool vector_row = vector_rows && vcount == kHalf;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          Bits* row = vcache + vbase + (long long)j * block_size;
          // seg[m]: the pair of tokens (2m, 2m + 1) of element j, packed low-to-high.
          unsigned int seg[4];
#pragma unroll
          for (int m = 0; m < 4; ++m) {
            if constexpr (kFp8) {
              seg[m] = fp8x2(element<T>(vreg[2 * m], j), element<T>(vreg[2 * m + 1], j), v_scale, v_inv);
            } else {
              seg[m] = __byte_perm(word(vreg[2 * m], j / 2), word(vreg[2 * m + 1], j / 2),
                                   (j & 1) ? 0x7632 : 0x5410);
            }
          }
          if (vector_row) {
            if constexpr (kFp8) {
              *reinterpret_cast<uint2*>(row) = make_uint2(seg[0] | (seg[1] << 16), seg[2] | (seg[3] << 16));
            } else {
              *reinterpret_cast<uint4*>(row) = make_uint4(seg[0], seg[1], seg[2], seg[3]);
            }
          } else {
            constexpr int kBits = 8 * (int)sizeof(Bits);
#pragma unroll
            for (int k = 0; k < kHalf; ++k)
              if (k < vcount) row[k] = (Bits)(seg[k / 2] >> (kBits * (k & 1)));
          }
        }
      }
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
