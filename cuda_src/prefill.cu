// blocksparse_prefill: varlen block-sparse causal attention, FlashAttention-2 style (mma.sync m16n8k16 with fp32
// accumulate, ldmatrix, cp.async double-buffered K/V, fp32 online softmax in base 2).
// q [T_q, H_q, D], k/v [T_k, H_kv, D], out [T_q, H_q, D]: last dim contiguous, token/head strides in elements.
// Grid: one CTA per (query tile, q head), blockIdx.x = tile_rank * H_q + head (tiles heaviest first, see
// cubsattn/_prefill_cuda.py); WARPS warps own BLOCK_M / WARPS query rows each and walk the union of the tile's CSR rows.
// The kernel body is shared with prefill_paged.cu (cached keys read from vLLM's paged cache via block tables).
#include <cuda_fp8.h>

#include "common.cuh"

namespace cubsattn {
namespace prefill {

// ---------------------------------------------------------------------------------------------------------------
// PTX wrappers

// (smem_addr, cp_async_16, cp_async_commit, cp_async_wait, ldmatrix_x4, pack2 and exp2_approx: common.cuh.)

// 16-byte copy of which only the first `bytes` (0..16) are read; the rest of the destination is zero-filled.
__device__ __forceinline__ void cp_async_16_part(unsigned dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b for one m16n8k16 tile (a: 16x16 row-major, b: 16x8 column-major, d: fp32).
template <typename T> __device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                                         unsigned b1);
template <> __device__ __forceinline__ void mma<__half>(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                                        unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                                               unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------------------------
// Tile configuration. The host mirrors SMEM_BYTES in cubsattn/_prefill_cuda.py::_smem_bytes.

template <int HEAD_DIM, int BLOCK_M, int WARPS, int BLOCK_N_> struct Config {
  static constexpr int BLOCK_N = BLOCK_N_;  // keys per K/V tile (a power of two >= 16)
  static constexpr int THREADS = WARPS * 32;
  // m16 tiles per warp. Two (32 rows) make every K/V fragment read from shared memory feed twice the MMAs.
  static constexpr int MT = BLOCK_M / (16 * WARPS);
  static constexpr int WARP_ROWS = 16 * MT;
  // Rows padded by 16 bytes: the 8 row addresses of one ldmatrix phase then fall on 8 distinct 4-bank groups
  // for every supported D (row pitch = 4, 12, 20 or 4 words mod 32).
  static constexpr int STRIDE = HEAD_DIM + 8;
  static constexpr int CHUNKS = HEAD_DIM / 8;               // 16-byte chunks per row
  static constexpr bool Q_IN_REGS = MT == 1 && HEAD_DIM <= 128;  // else Q fragments are re-read from shared memory
  static constexpr int Q_ELEMS = BLOCK_M * STRIDE;
  static constexpr int KV_ELEMS = BLOCK_N * STRIDE;
  // Two K/V buffers, refilled after a second barrier per tile. (Three buffers with one barrier per tile measured
  // 1-2% slower on an H200 with 128x32 tiles: the barrier is not the bottleneck.)
  static constexpr int STAGES = 2;
  static_assert(MT >= 1 && BLOCK_M == WARP_ROWS * WARPS, "BLOCK_M must be a multiple of 16 * WARPS");
};

// ---------------------------------------------------------------------------------------------------------------
// Key/value sources. Contiguous K/V are read through `chunk(pos, c)` = address of the 16-byte chunk c of key
// position pos (0-based inside the sequence) after `begin(seq, kv_head)`. The paged kernel reads positions
// [context_len, k_len) of a sequence (this step's tokens, packed like the queries) the same way, and positions
// [0, context_len) from the cache through PagedCache; NoCache disables that path at compile time.

template <typename T> struct ContiguousKV {
  const T* base;      // [T_k, H_kv, D] with the strides below (elements)
  long long tok_stride;
  int head_stride;
  const int* cu_seqlens;
  const T* head_base;  // set by begin(): this sequence's first key of this kv head

  __device__ __forceinline__ void begin(int seq, int kv_head) {
    head_base = base + (long long)cu_seqlens[seq] * tok_stride + kv_head * head_stride;
  }
  // The token stride fits 32 bits (checked on the host), so the row offset is one 32x32->64 multiply.
  __device__ __forceinline__ const T* chunk(int pos, int c) const {
    return head_base + (long long)pos * (int)tok_stride + c * 8;
  }
};

struct NoCache {
  static constexpr bool ENABLED = false;
};

// vLLM's paged cache of one layer. CT is the cache element: T ("auto") or unsigned char (fp8 E4M3, read back as
// T(float(code) * scale), the rounding of cubsattn.kv_cache.gather_kv followed by a cast). A key position pos lives
// in slot pos % bs of block tables[seq][pos / bs]; bs is a power of two >= 8, so 8 consecutive positions starting at
// a multiple of 8 (one 16-byte value-cache chunk of a 16-bit cache) never cross a block.
template <typename CT> struct PagedCache {
  static constexpr bool ENABLED = true;
  static constexpr bool FP8 = sizeof(CT) == 1;
  static constexpr int X = 16 / sizeof(CT);  // key-cache innermost extent: one 16-byte chunk
  const CT* key_cache;    // [num_blocks, H_kv, D / X, bs, X]
  const CT* value_cache;  // [num_blocks, H_kv, D, bs]
  const int* tables;      // [batch, table_stride] block ids
  long long block_stride;  // H_kv * D * bs elements
  int head_stride;        // D * bs elements
  int table_stride, bs_shift;
  float k_scale, v_scale;  // fp8 only
  const int* table;       // set by begin(): this sequence's row
  const CT* k_head;
  const CT* v_head;

  __device__ __forceinline__ void begin(int seq, int kv_head) {
    table = tables + (long long)seq * table_stride;
    k_head = key_cache + (long long)kv_head * head_stride;
    v_head = value_cache + (long long)kv_head * head_stride;
  }
  // Key chunk 0 of position pos (chunk c, X elements, is at + (c << (bs_shift + log2 X))).
  __device__ __forceinline__ const CT* key(int pos) const {
    return k_head + table[pos >> bs_shift] * block_stride + (pos & ((1 << bs_shift) - 1)) * X;
  }
  // Value of dimension 0 at position pos (dimension d is at + (d << bs_shift); positions are contiguous).
  __device__ __forceinline__ const CT* value(int pos) const {
    return v_head + table[pos >> bs_shift] * block_stride + (pos & ((1 << bs_shift) - 1));
  }
};

// n fp8 E4M3 codes (little-endian bytes of w) -> T(float(code) * scale), packed in pairs.
template <typename T> __device__ __forceinline__ unsigned fp8x2_to(unsigned short w, float scale) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w), __NV_E4M3);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
  return pack2<T>(f.x * scale, f.y * scale);
}
template <typename T> __device__ __forceinline__ uint2 fp8x4_to(unsigned w, float scale) {
  return make_uint2(fp8x2_to<T>(w & 0xffffu, scale), fp8x2_to<T>(w >> 16, scale));
}

// ---------------------------------------------------------------------------------------------------------------
// The key-tile walk of one CTA: the union, ascending, of the column lists of the R CSR rows the query tile
// spans. Lane i < R of every warp tracks row i (so no per-thread arrays); warp reductions merge the rows.
//   B >= BLOCK_N: a column is B / BLOCK_N consecutive key tiles (`subs`), each with one bit per row.
//   B <  BLOCK_N: a key tile holds S = BLOCK_N / B columns; the tile mask has S bits per row (bit i*S + c%S).
// Each warp computes the same walk redundantly (a few integer ops per tile) instead of syncing on shared state.

struct KeyWalk {
  const int* cols;  // the layout's column lists; ptr / end index this head's entries directly
  int ptr, end, col;  // lane-owned row state; col = INT_MAX when exhausted or no row
  int per_tile, subs, block_size, tile_n, pos_last;
  int n0, sub;
  unsigned mask;

  static constexpr int NONE = 0x7fffffff;

  __device__ __forceinline__ void advance() {
    ++ptr;
    col = ptr < end ? cols[ptr] : NONE;
  }

  // Next key tile: start key n0 and the row/sub-block mask. False when the walk is over.
  __device__ __forceinline__ bool next(int& out_n0, unsigned& out_mask) {
    if (sub + 1 < subs && n0 + tile_n <= pos_last) {  // next sub-tile of a wide column (keys <= the last query)
      ++sub;
      n0 += tile_n;
      out_n0 = n0;
      out_mask = mask;
      return true;
    }
    const int lane = threadIdx.x & 31;
    const unsigned unit = __reduce_min_sync(0xffffffffu, col == NONE ? (unsigned)NONE : (unsigned)(col / per_tile));
    if (unit == (unsigned)NONE) return false;
    unsigned bits = 0;
    while (col != NONE && (unsigned)(col / per_tile) == unit) {
      bits |= 1u << (lane * per_tile + col % per_tile);
      advance();
    }
    mask = __reduce_or_sync(0xffffffffu, bits);
    n0 = (int)unit * per_tile * block_size;
    sub = 0;
    out_n0 = n0;
    out_mask = mask;
    return true;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// O += P V for one key tile (paged kernel): P = the score accumulators rounded to T (A operand), V fragments by
// ldmatrix from `v` (shared address of the lane's first row) + kk * KK_STEP + dp * DP_STEP elements.

template <typename T, bool TRANS, int MT, int DT, int NT, int KK_STEP, int DP_STEP>
__device__ __forceinline__ void pv_mma(float (&acc)[MT][DT][4], const float (&s)[MT][NT][4], unsigned v) {
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    unsigned a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
      a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
      a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
      a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dp = 0; dp < DT / 2; ++dp) {
      unsigned b[4];
      const unsigned addr = v + (kk * KK_STEP + dp * DP_STEP) * 2;  // 16-bit elements
      if constexpr (TRANS)
        ldmatrix_x4_trans(b, addr);
      else
        ldmatrix_x4(b, addr);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma<T>(acc[mt][2 * dp], a[mt], b[0], b[1]);
        mma<T>(acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The kernel body, generic over the K/V source. With a PagedCache, keys [0, past) come from the cache: those key
// tiles stage V transposed (V^T [D][BLOCK_N + 8], the cache's d-major order, read by ldmatrix without .trans), and
// a tile holding both cached and new keys is visited twice (cached rows, then new rows; the others masked), so
// every visit reads one source with one V layout.

template <typename T, int HEAD_DIM, int BLOCK_M, int WARPS, int BLOCK_N_, typename KV, typename Cache>
__device__ __forceinline__ void prefill_tile(
    const T* __restrict__ q, long long q_tok, int q_head,      // [T_q, H_q, D]
    T* __restrict__ out, long long o_tok, int o_head,          // [T_q, H_q, D]
    KV kv_k, KV kv_v, Cache cache,
    const int* __restrict__ tiles,                             // [num_tiles, 2]: (sequence, first position)
    const int* __restrict__ cu_q,                              // [batch + 1]
    const int* __restrict__ cu_k,                              // [batch + 1]
    const int* __restrict__ indptr,                            // [H_q, NB + 1]
    const int* __restrict__ indices,                           // [H_q, nnz_stride]
    int num_heads, int group, int num_blocks, int nnz_stride, int block_size, float scale_log2) {
  using C = Config<HEAD_DIM, BLOCK_M, WARPS, BLOCK_N_>;
  constexpr int BLOCK_N = C::BLOCK_N, STRIDE = C::STRIDE, CHUNKS = C::CHUNKS, THREADS = C::THREADS;
  constexpr int MT = C::MT, WARP_ROWS = C::WARP_ROWS;
  constexpr int DT = HEAD_DIM / 8;   // 8-wide output column tiles
  constexpr int KT = HEAD_DIM / 16;  // 16-deep k-steps of Q K^T
  constexpr int NT = BLOCK_N / 8;    // 8-wide score column tiles

  constexpr int VT_STRIDE = BLOCK_N + 8;  // V^T rows (padded like STRIDE: conflict-free ldmatrix for 32/64 keys)
  // One V stage holds either layout (paged kernel); the host mirrors this in _smem_bytes.
  constexpr int V_ELEMS = Cache::ENABLED && HEAD_DIM * VT_STRIDE > C::KV_ELEMS ? HEAD_DIM * VT_STRIDE : C::KV_ELEMS;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + C::Q_ELEMS;                       // [STAGES][BLOCK_N][STRIDE]
  T* sV = sK + C::STAGES * C::KV_ELEMS;          // [STAGES][V_ELEMS]: [BLOCK_N][STRIDE] or [HEAD_DIM][VT_STRIDE]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tq = lane & 3;  // mma fragment row group and column pair
  const int head = blockIdx.x % num_heads;
  const int tile = blockIdx.x / num_heads;
  const int kv_head = head / group;
  const int seq = tiles[2 * tile], tile_start = tiles[2 * tile + 1];
  const int q0 = cu_q[seq], q_len = cu_q[seq + 1] - q0;
  const int k_len = cu_k[seq + 1] - cu_k[seq];
  const int past = k_len - q_len;  // queries are the last q_len key positions
  const int pos_lo = max(tile_start, past), pos_hi = min(tile_start + BLOCK_M, k_len);  // valid rows [lo, hi)
  kv_k.begin(seq, kv_head);
  kv_v.begin(seq, kv_head);
  if constexpr (Cache::ENABLED) cache.begin(seq, kv_head);

  // ---- Q tile -> shared (rows outside [pos_lo, pos_hi) are zero) -------------------------------------------
  for (int i = tid; i < BLOCK_M * CHUNKS; i += THREADS) {
    const int r = i / CHUNKS, c = i % CHUNKS, pos = tile_start + r;
    const bool valid = pos >= pos_lo && pos < pos_hi;
    const T* src = valid ? q + (q0 + pos - past) * q_tok + head * q_head + c * 8 : q;
    cp_async_16(smem_addr(sQ + r * STRIDE + c * 8), src, valid);
  }
  cp_async_commit();

  // ---- the walk over this tile's CSR rows --------------------------------------------------------------------
  KeyWalk walk;
  {
    const int rows = block_size < BLOCK_M ? BLOCK_M / block_size : 1;
    walk.cols = indices;
    walk.per_tile = block_size < BLOCK_N ? BLOCK_N / block_size : 1;
    walk.subs = block_size > BLOCK_N ? block_size / BLOCK_N : 1;
    walk.block_size = block_size;
    walk.tile_n = BLOCK_N;
    walk.pos_last = pos_hi - 1;
    walk.n0 = 0;
    walk.sub = walk.subs;  // the first next() starts a column
    walk.mask = 0;
    walk.ptr = walk.end = 0;
    walk.col = KeyWalk::NONE;
    const int qb = tile_start / block_size + lane;  // lane's CSR row (absolute query block)
    if (lane < rows && qb < num_blocks && qb * block_size < pos_hi && (qb + 1) * block_size > pos_lo) {
      const int* row_ptr = indptr + (long long)head * (num_blocks + 1) + qb;
      walk.ptr = row_ptr[0] + head * nnz_stride;
      walk.end = row_ptr[1] + head * nnz_stride;
      walk.col = walk.ptr < walk.end ? walk.cols[walk.ptr] : KeyWalk::NONE;
    }
  }

  auto load_kv = [&](int n0, int stage) {
    T* dk = sK + stage * C::KV_ELEMS;
    T* dv = sV + stage * V_ELEMS;
    // Not unrolled: unrolling lets the compiler hoist every row's 64-bit offset out of the key loop, which costs
    // more registers than the MMA tiles can spare (spills on sm_80 / sm_90).
#pragma unroll 1
    for (int i = tid; i < BLOCK_N * CHUNKS; i += THREADS) {
      const int r = i / CHUNKS, c = i % CHUNKS, pos = n0 + r;
      if constexpr (Cache::ENABLED) {  // this step's keys, packed like the queries; cached rows are zeros
        const bool valid = pos >= past && pos < k_len;
        cp_async_16(smem_addr(dk + r * STRIDE + c * 8), valid ? kv_k.chunk(pos - past, c) : (const void*)q, valid);
        cp_async_16(smem_addr(dv + r * STRIDE + c * 8), valid ? kv_v.chunk(pos - past, c) : (const void*)q, valid);
      } else {
        const bool valid = pos < k_len;  // keys past the sequence: zeros (their scores are masked causally)
        cp_async_16(smem_addr(dk + r * STRIDE + c * 8), valid ? kv_k.chunk(pos, c) : (const void*)q, valid);
        cp_async_16(smem_addr(dv + r * STRIDE + c * 8), valid ? kv_v.chunk(pos, c) : (const void*)q, valid);
      }
    }
  };

  // Cached keys [n0, min(n0 + BLOCK_N, past)) of a key tile: K rows [key][D] and V^T rows [D][key]; other keys are
  // zeros. Thread mappings keep one block-table lookup per thread and tile: K row r = tid % BLOCK_N (its chunks
  // are strided by THREADS / BLOCK_N; consecutive threads read consecutive slots, 16 contiguous bytes apart in the
  // key cache), V^T 8-key group kc = tid % (BLOCK_N / 8) (its rows strided by THREADS / (BLOCK_N / 8)).
  auto load_cached = [&](int n0, int stage) {
    if constexpr (Cache::ENABLED) {
      static_assert(THREADS % BLOCK_N == 0, "K rows: THREADS must be a multiple of BLOCK_N");
      constexpr int KSTEP = THREADS / BLOCK_N, KC = BLOCK_N / 8, VSTEP = THREADS / KC;
      T* dk = sK + stage * C::KV_ELEMS;
      T* dv = sV + stage * V_ELEMS;
      const int r = tid % BLOCK_N, kpos = n0 + r;
      const bool kvalid = kpos < past;
      const int kc = tid % KC, vpos = n0 + 8 * kc;
      const int vkeys = min(max(past - vpos, 0), 8);  // leading cached keys of the 8-key group
      const int bs_shift = cache.bs_shift;
      if constexpr (!Cache::FP8) {
        const T* ksrc = kvalid ? cache.key(kpos) : q;
        const T* vsrc = vkeys > 0 ? cache.value(vpos) : q;
#pragma unroll 1
        for (int c = tid / BLOCK_N; c < CHUNKS; c += KSTEP)
          cp_async_16(smem_addr(dk + r * STRIDE + c * 8), ksrc + (c << (bs_shift + 3)), kvalid);
#pragma unroll 1
        for (int d = tid / KC; d < HEAD_DIM; d += VSTEP)
          cp_async_16_part(smem_addr(dv + d * VT_STRIDE + 8 * kc), vsrc + (d << bs_shift), 2 * vkeys);
      } else {
        // fp8: plain loads (all of a thread's loads first), dequantised to T on the way to shared memory.
        constexpr int K16 = HEAD_DIM / 16, KITER = (K16 + KSTEP - 1) / KSTEP;
        constexpr int VITER = (HEAD_DIM + VSTEP - 1) / VSTEP;
        const unsigned char* ksrc = kvalid ? cache.key(kpos) : nullptr;
        const unsigned char* vsrc = vkeys > 0 ? cache.value(vpos) : nullptr;
        uint4 kraw[KITER];
        uint2 vraw[VITER];
#pragma unroll
        for (int j = 0; j < KITER; ++j) {
          const int c = tid / BLOCK_N + j * KSTEP;
          kraw[j] = make_uint4(0u, 0u, 0u, 0u);
          if (kvalid && c < K16) kraw[j] = __ldg(reinterpret_cast<const uint4*>(ksrc + (c << (bs_shift + 4))));
        }
#pragma unroll
        for (int j = 0; j < VITER; ++j) {
          const int d = tid / KC + j * VSTEP;
          vraw[j] = make_uint2(0u, 0u);
          if (vkeys > 0 && d < HEAD_DIM) vraw[j] = __ldg(reinterpret_cast<const uint2*>(vsrc + (d << bs_shift)));
        }
        // Keys past the context in a partly cached group: zero their bytes (code 0 is +0).
        const unsigned long long keep = vkeys >= 8 ? ~0ull : (1ull << (8 * vkeys)) - 1ull;
#pragma unroll
        for (int j = 0; j < KITER; ++j) {
          const int c = tid / BLOCK_N + j * KSTEP;
          if (c < K16) {
            const float s = cache.k_scale;
            const uint2 a = fp8x4_to<T>(kraw[j].x, s), b = fp8x4_to<T>(kraw[j].y, s);
            const uint2 e = fp8x4_to<T>(kraw[j].z, s), f = fp8x4_to<T>(kraw[j].w, s);
            uint4* dst = reinterpret_cast<uint4*>(dk + r * STRIDE + c * 16);
            dst[0] = make_uint4(a.x, a.y, b.x, b.y);
            dst[1] = make_uint4(e.x, e.y, f.x, f.y);
          }
        }
#pragma unroll
        for (int j = 0; j < VITER; ++j) {
          const int d = tid / KC + j * VSTEP;
          if (d < HEAD_DIM) {
            const unsigned long long w = ((unsigned long long)vraw[j].y << 32 | vraw[j].x) & keep;
            const uint2 a = fp8x4_to<T>((unsigned)w, cache.v_scale), b = fp8x4_to<T>((unsigned)(w >> 32), cache.v_scale);
            *reinterpret_cast<uint4*>(dv + d * VT_STRIDE + 8 * kc) = make_uint4(a.x, a.y, b.x, b.y);
          }
        }
      }
    }
  };

  // Paged: the visits of the walk's key tiles, (n0, mask, cached?); a tile crossing `past` is visited twice. The
  // contiguous kernel calls walk.next / load_kv directly (the same code as before the paged path existed).
  bool split_pending = false;
  auto next_visit = [&](int& n0, unsigned& mask, bool& cached) -> bool {
    if (split_pending) {  // n0 / mask still hold the tile
      split_pending = false;
      cached = false;
      return true;
    }
    if (!walk.next(n0, mask)) return false;
    cached = n0 < past;
    split_pending = cached && n0 + BLOCK_N > past;
    return true;
  };
  auto load_visit = [&](int n0, bool cached, int stage) {
    if (cached)
      load_cached(n0, stage);
    else
      load_kv(n0, stage);
  };

  // Prologue: two key tiles in flight. Every step commits a group (possibly empty) so wait counts stay fixed.
  int n0_cur = 0, n0_nxt = 0;
  unsigned mask_cur = 0, mask_nxt = 0;
  bool cached_cur = false, cached_nxt = false;
  bool have_cur, have_nxt;
  if constexpr (Cache::ENABLED) {
    have_cur = next_visit(n0_cur, mask_cur, cached_cur);
    if (have_cur) load_visit(n0_cur, cached_cur, 0);
    cp_async_commit();
    n0_nxt = n0_cur;  // a split tile's second visit reuses n0 / mask
    mask_nxt = mask_cur;
    have_nxt = have_cur && next_visit(n0_nxt, mask_nxt, cached_nxt);
    if (have_nxt) load_visit(n0_nxt, cached_nxt, 1);
    cp_async_commit();
  } else {
    have_cur = walk.next(n0_cur, mask_cur);
    if (have_cur) load_kv(n0_cur, 0);
    cp_async_commit();
    have_nxt = have_cur && walk.next(n0_nxt, mask_nxt);
    if (have_nxt) load_kv(n0_nxt, 1);
    cp_async_commit();
  }

  // ---- per-warp state ----------------------------------------------------------------------------------------
  const int warp_pos0 = tile_start + warp * WARP_ROWS;              // absolute position of the warp's row 0
  const int warp_last = min(warp_pos0 + WARP_ROWS - 1, pos_hi - 1);
  const bool warp_valid = warp_pos0 + WARP_ROWS - 1 >= pos_lo && warp_pos0 < pos_hi;
  const int per_tile = walk.per_tile;
  const unsigned full_bits = (1u << per_tile) - 1u;
  const int block_shift = __ffs(block_size) - 1;                    // block sizes are powers of two
  int row_shift[MT];                                                // each m-tile's row bits in a tile mask
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) row_shift[mt] = ((warp * WARP_ROWS + mt * 16) >> block_shift) * per_tile;

  float acc[MT][DT][4];
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < DT; ++j) acc[mt][j][0] = acc[mt][j][1] = acc[mt][j][2] = acc[mt][j][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = neg_inf();
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  // ldmatrix lane offsets (elements): Q A-operand rows (m-tile 0), K B-operand rows, V transposed B-operand rows.
  const int a_off = (warp * WARP_ROWS + (lane & 15)) * STRIDE + (lane >> 4) * 8;
  const int k_off = ((lane >> 4) * 8 + (lane & 7)) * STRIDE + ((lane >> 3) & 1) * 8;
  const int v_off = (lane & 15) * STRIDE + (lane >> 4) * 8;
  const int vt_off =  // as k_off, on V^T (paged kernel only)
      Cache::ENABLED ? ((lane >> 4) * 8 + (lane & 7)) * VT_STRIDE + ((lane >> 3) & 1) * 8 : 0;

  unsigned qf[C::Q_IN_REGS ? MT : 1][C::Q_IN_REGS ? KT : 1][4];
  cp_async_wait<2>();  // the Q group
  __syncthreads();
  if constexpr (C::Q_IN_REGS) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) ldmatrix_x4(qf[mt][kk], smem_addr(sQ + a_off + mt * 16 * STRIDE + kk * 16));
  }

  // ---- main loop over key tiles ------------------------------------------------------------------------------
  for (int stage = 0; have_cur; stage ^= 1) {
    cp_async_wait<1>();
    __syncthreads();
    unsigned wbits[MT], any_bits = 0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      wbits[mt] = (mask_cur >> row_shift[mt]) & full_bits;
      any_bits |= wbits[mt];
    }
    if (warp_valid && any_bits != 0 && n0_cur <= warp_last) {
      const T* cK = sK + stage * C::KV_ELEMS;
      const T* cV = sV + stage * V_ELEMS;
      // Paged: a tile crossing `past` masks the keys of the other source in each of its two visits.
      const bool cut = Cache::ENABLED && n0_cur < past && n0_cur + BLOCK_N > past;

      // S = Q K^T (fp32); each K fragment feeds all MT m-tiles.
      float s[MT][NT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < NT; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        unsigned a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (C::Q_IN_REGS) {
#pragma unroll
            for (int e = 0; e < 4; ++e) a[mt][e] = qf[mt][kk][e];
          } else {
            ldmatrix_x4(a[mt], smem_addr(sQ + a_off + mt * 16 * STRIDE + kk * 16));
          }
        }
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          unsigned b[4];
          ldmatrix_x4(b, smem_addr(cK + k_off + np * 16 * STRIDE + kk * 16));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma<T>(s[mt][2 * np], a[mt], b[0], b[1]);
            mma<T>(s[mt][2 * np + 1], a[mt], b[2], b[3]);
          }
        }
      }

      float scale_old[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        // Mask only where needed: keys after a row's position (diagonal / tail) or keys of sub-blocks that are not
        // in this m-tile's CSR row. Scores stay unscaled (scale_log2 > 0 keeps -inf and the row maximum).
        const int mt_pos0 = warp_pos0 + mt * 16;
        if (n0_cur + BLOCK_N - 1 > mt_pos0 || wbits[mt] != full_bits || cut) {
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int key_off = j * 8 + 2 * tq + (e & 1);
              const int pos = mt_pos0 + g + (e >> 1) * 8;
              const bool in_row = (wbits[mt] >> (key_off >> block_shift)) & 1u;
              if constexpr (Cache::ENABLED) {
                if (n0_cur + key_off > pos || !in_row || (cut && (n0_cur + key_off < past) != cached_cur))
                  s[mt][j][e] = neg_inf();
              } else {
                if (n0_cur + key_off > pos || !in_row) s[mt][j][e] = neg_inf();
              }
            }
        }

        // Online softmax in base 2, p = 2^(s * scale_log2 - max * scale_log2): one FFMA and one EX2 per score.
        // Rows g and g+8 of the m-tile; the 4 lanes of a quad share a row.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mx = row_max[mt][r];
#pragma unroll
          for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float base = mx == neg_inf() ? 0.f : mx * scale_log2;  // no key yet: keep everything finite
          scale_old[mt][r] = exp2_approx(row_max[mt][r] * scale_log2 - base);
          row_max[mt][r] = mx;
          float sum = 0.f;
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            s[mt][j][2 * r] = exp2_approx(fmaf(s[mt][j][2 * r], scale_log2, -base));
            s[mt][j][2 * r + 1] = exp2_approx(fmaf(s[mt][j][2 * r + 1], scale_log2, -base));
            sum += s[mt][j][2 * r] + s[mt][j][2 * r + 1];
          }
          row_sum[mt][r] = row_sum[mt][r] * scale_old[mt][r] + sum;  // per-lane partial; quad-reduced at the end
        }
      }

      // Rescale the output only when a row maximum of this warp moved (rare once the first tiles are seen).
      bool moved = false;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) moved |= scale_old[mt][0] != 1.f || scale_old[mt][1] != 1.f;
      if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int j = 0; j < DT; ++j) {
            acc[mt][j][0] *= scale_old[mt][0];
            acc[mt][j][1] *= scale_old[mt][0];
            acc[mt][j][2] *= scale_old[mt][1];
            acc[mt][j][3] *= scale_old[mt][1];
          }
      }

      // O += P V: the score accumulators, rounded to T, are the A operand directly (no shared round trip).
      if constexpr (Cache::ENABLED) {
        // Paged: V rows [key][D] are read with ldmatrix .trans, cached V^T rows [D][key] without (same fragments).
        // One branch per visit, not per ldmatrix, so the unrolled ldmatrix / MMA sequence stays branch-free (on
        // an H200 the paged/contiguous time ratio of the chunked benchmark was 1.75x either way).
        if (cached_cur)
          pv_mma<T, false, MT, DT, NT, 16, 16 * VT_STRIDE>(acc, s, smem_addr(cV + vt_off));
        else
          pv_mma<T, true, MT, DT, NT, 16 * STRIDE, 16>(acc, s, smem_addr(cV + v_off));
      } else {  // the contiguous kernel keeps its original loop (a shared helper compiles to different code)
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
          unsigned a[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
            a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
            a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
            a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
          }
#pragma unroll
          for (int dp = 0; dp < DT / 2; ++dp) {
            unsigned b[4];
            ldmatrix_x4_trans(b, smem_addr(cV + v_off + kk * 16 * STRIDE + dp * 16));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              mma<T>(acc[mt][2 * dp], a[mt], b[0], b[1]);
              mma<T>(acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
            }
          }
        }
      }
    }
    __syncthreads();  // everyone is done with this stage before it is refilled
    have_cur = have_nxt;
    n0_cur = n0_nxt;
    mask_cur = mask_nxt;
    if constexpr (Cache::ENABLED) {
      cached_cur = cached_nxt;
      have_nxt = have_nxt && next_visit(n0_nxt, mask_nxt, cached_nxt);
      if (have_nxt) load_visit(n0_nxt, cached_nxt, stage);
    } else {
      have_nxt = have_nxt && walk.next(n0_nxt, mask_nxt);
      if (have_nxt) load_kv(n0_nxt, stage);
    }
    cp_async_commit();
  }

  // ---- epilogue: normalise, stage the warp's rows in its own rows of sQ, write 16-byte chunks ----------------
  cp_async_wait<0>();
  T* sO = sQ + warp * WARP_ROWS * STRIDE;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      inv[r] = l > 0.f ? 1.f / l : 0.f;  // an empty CSR row outputs zeros
    }
    T* rows = sO + mt * 16 * STRIDE;
#pragma unroll
    for (int j = 0; j < DT; ++j) {
      *reinterpret_cast<unsigned*>(rows + g * STRIDE + j * 8 + 2 * tq) =
          pack2<T>(acc[mt][j][0] * inv[0], acc[mt][j][1] * inv[0]);
      *reinterpret_cast<unsigned*>(rows + (g + 8) * STRIDE + j * 8 + 2 * tq) =
          pack2<T>(acc[mt][j][2] * inv[1], acc[mt][j][3] * inv[1]);
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = lane; i < WARP_ROWS * CHUNKS; i += 32) {
    const int r = i / CHUNKS, c = i % CHUNKS, pos = warp_pos0 + r;
    if (pos >= pos_lo && pos < pos_hi)
      *reinterpret_cast<uint4*>(out + (q0 + pos - past) * o_tok + head * o_head + c * 8) =
          *reinterpret_cast<const uint4*>(sO + r * STRIDE + c * 8);
  }
}

}  // namespace prefill
}  // namespace cubsattn

// ---------------------------------------------------------------------------------------------------------------
// Entry point over contiguous (strided) K/V: WARPS * 32 threads; dynamic shared memory
// (BLOCK_M + 4 * BLOCK_N) * (D + 8) * sizeof(T) bytes.

template <typename T, int HEAD_DIM, int BLOCK_M, int WARPS, int BLOCK_N>
__global__ void __launch_bounds__(WARPS * 32) blocksparse_prefill(
    const T* __restrict__ q, long long q_tok, int q_head,      // [T_q, H_q, D]
    const T* __restrict__ k, long long k_tok, int k_head,      // [T_k, H_kv, D]
    const T* __restrict__ v, long long v_tok, int v_head,      // [T_k, H_kv, D]
    T* __restrict__ out, long long o_tok, int o_head,          // [T_q, H_q, D]
    const int* __restrict__ tiles,                             // [num_tiles, 2]
    const int* __restrict__ cu_q, const int* __restrict__ cu_k,  // [batch + 1] each
    const int* __restrict__ indptr, const int* __restrict__ indices,  // [H_q, NB + 1], [H_q, nnz_stride]
    int num_heads, int group, int num_blocks, int nnz_stride, int block_size, float scale_log2) {
  using KV = cubsattn::prefill::ContiguousKV<T>;
  const KV kv_k{k, k_tok, k_head, cu_k, k};
  const KV kv_v{v, v_tok, v_head, cu_k, v};
  using NoCache = cubsattn::prefill::NoCache;
  cubsattn::prefill::prefill_tile<T, HEAD_DIM, BLOCK_M, WARPS, BLOCK_N, KV, NoCache>(
      q, q_tok, q_head, out, o_tok, o_head, kv_k, kv_v, NoCache{}, tiles, cu_q, cu_k, indptr, indices, num_heads,
      group, num_blocks, nnz_stride, block_size, scale_log2);
}
