// blocksparse_prefill_sm90: varlen block-sparse causal attention for Hopper (sm_90a): wgmma.mma_async with fp32
// accumulate, Q/K/V tiles in 128-byte-swizzled shared memory filled by tensor copies (cp.async.bulk.tensor, TMA)
// that complete on mbarriers, fp32 online softmax in base 2; Q K^T takes Q from registers. Same semantics as
// prefill.cu (queries are the last q_len key positions).
// q [T_q, H_q, D], k/v [T_k, H_kv, D], out [T_q, H_q, D]: last dim contiguous, token/head strides in elements.
// Grid: persistent, at most one CTA per SM, drawing (128-row query tile, q head) work items from a counter; one
// warp of warpgroup 0 issues the copies, warpgroups 1 and 2 each own 64 query rows and consume the ring's stages
// (two 64-key tiles each).
#include "common.cuh"

namespace cubsattn {
namespace sm90 {

constexpr int BLOCK_M = 128;     // query rows per CTA: two consumer warpgroups of 64
constexpr int BLOCK_N = 64;      // keys per K/V tile (= one 64-key block, half of a 128-key block)
constexpr int STAGE_KEYS = 128;  // key rows per ring stage: two tiles of the walk
constexpr int THREADS = 384;     // producer warpgroup + two consumer warpgroups
constexpr int CONSUMER_WARPS = 8;
// Registers per thread after the warpgroups re-balance them (setmaxnreg): 128 x 56 + 256 x 224 = 384 x 168.
constexpr int PRODUCER_REGS = 56, CONSUMER_REGS = 224;
static_assert(128 * PRODUCER_REGS + 256 * CONSUMER_REGS <= THREADS * (65536 / THREADS / 8 * 8),
              "more registers than the CTA's pool");

// ---------------------------------------------------------------------------------------------------------------
// PTX wrappers

// (smem_addr, cp_async_16, cp_async_commit, cp_async_wait, the mbarrier wrappers, pack2 and exp2_approx:
// common.cuh.)

// Generic-proxy shared-memory writes (cp.async) become visible to the async proxy (wgmma operand reads).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// A tensor map (TMA descriptor): 128 opaque bytes encoded on the host by the driver's cuTensorMapEncodeTiled
// (cubsattn/_tma.py); the kernel reads them from global memory.
struct alignas(64) TensorMap {
  unsigned long long bits[16];
};

// The map's copy of it is written by a host-to-device copy before the launch: order that before the tensor copies
// that use it (tensormap proxy), and start fetching it.
__device__ __forceinline__ void tensormap_acquire(const TensorMap* map) {
  asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n" ::"l"(map) : "memory");
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(map) : "memory");
}

// Box (c0, c1, c2) (innermost first: column, head, token) of `map` into shared memory at dst, completing on the
// mbarrier `bar` (its byte count expected by mbar_arrive_expect_tx). Coordinates outside the tensor read zeros.
__device__ __forceinline__ void tma_load_3d(unsigned dst, const TensorMap* map, int c0, int c1, int c2,
                                            unsigned bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
      ::"r"(dst), "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

// The same for data read once (Q tiles): its L2 lines go first when L2 needs room (K / V tiles are read by many
// CTAs; a whole-tensor evict-first policy, createpolicy fraction 1.0).
__device__ __forceinline__ void tma_load_3d_once(unsigned dst, const TensorMap* map, int c0, int c1, int c2,
                                                 unsigned bar) {
  asm volatile(
      "{\n.reg .b64 policy;\ncreatepolicy.fractional.L2::evict_first.b64 policy, 1.0;\n"
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, "
      "%3, %4}], [%5], policy;\n}\n"
      ::"r"(dst), "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

// Named barriers over the two consumer warpgroups (256 threads; id 0 is __syncthreads).
__device__ __forceinline__ void named_bar_sync(int id) {
  asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id) {
  asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle (PTX ISA "Matrix Descriptor Format"): start address, leading
// and stride byte offsets, each >> 4, in bits 0-13, 16-29, 32-45; swizzle mode 1 in bits 62-63. Every operand
// tile starts on a 1024-byte boundary (one swizzle pattern), so the base offset field stays 0.
__device__ __forceinline__ unsigned long long smem_desc(unsigned addr, unsigned lbo, unsigned sbo) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
         ((unsigned long long)(sbo >> 4) << 32) | (1ull << 62);
}

// Accumulator operands: 8 / 32 consecutive fp32 registers of d from index o (an m64nN wgmma keeps N / 2 per thread).
#define CUBSATTN_ACC8(o)                                                                                        \
  "+f"(d[(o) + 0]), "+f"(d[(o) + 1]), "+f"(d[(o) + 2]), "+f"(d[(o) + 3]), "+f"(d[(o) + 4]), "+f"(d[(o) + 5]),  \
      "+f"(d[(o) + 6]), "+f"(d[(o) + 7])
#define CUBSATTN_ACC32(o) CUBSATTN_ACC8(o), CUBSATTN_ACC8((o) + 8), CUBSATTN_ACC8((o) + 16), CUBSATTN_ACC8((o) + 24)
// PTX operand lists {%0, ..., %31} and {%0, ..., %63}.
#define CUBSATTN_D32                                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "  \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define CUBSATTN_D64                                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "  \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "   \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// The wgmma shapes the kernel uses, for element type CTYPE (PTX type TYPE):
// - rs<TRANS_B>: d (64x64 fp32) (+)= a (64x16, registers) * b (16x64 shared memory descriptor, K-major for
//   TRANS_B = 0, N-major for 1): Q K^T with Q in registers, and P V per 64-column slab.
// - n128<TRANS_B>: d (64x128 fp32) (+)= a (64x16, registers) * b (16x128 shared memory descriptor): Q K^T over a
//   whole stage (K-major), and P V for D = 128 in one instruction per 16 keys (N-major: both 64-column slabs of V,
//   the leading byte offset stepping from one to the other).
template <typename T> struct Wgmma;
#define CUBSATTN_WGMMA(CTYPE, TYPE)                                                                             \
  template <> struct Wgmma<CTYPE> {                                                                             \
    template <int TRANS_B>                                                                                      \
    static __device__ __forceinline__ void rs(float (&d)[32], const unsigned (&a)[4], unsigned long long desc,  \
                                              int accumulate) {                                                 \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                \
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " CUBSATTN_D32                \
                   ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"                                            \
                   : CUBSATTN_ACC32(0)                                                                          \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate), "n"(TRANS_B));    \
    }                                                                                                           \
    template <int TRANS_B>                                                                                      \
    static __device__ __forceinline__ void n128(float (&d)[64], const unsigned (&a)[4], unsigned long long desc, \
                                                int accumulate) {                                               \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                \
                   "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " " CUBSATTN_D64               \
                   ", {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"                                            \
                   : CUBSATTN_ACC32(0), CUBSATTN_ACC32(32)                                                      \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate), "n"(TRANS_B));    \
    }                                                                                                           \
  };
CUBSATTN_WGMMA(__nv_bfloat16, "bf16")
CUBSATTN_WGMMA(__half, "f16")
#undef CUBSATTN_WGMMA
#undef CUBSATTN_D64
#undef CUBSATTN_D32
#undef CUBSATTN_ACC32
#undef CUBSATTN_ACC8

// ---------------------------------------------------------------------------------------------------------------
// Shared memory: the Q buffer (a 64-row tile per consumer warpgroup; the consumers copy it to registers at the
// start of an item and release it, so the next item's Q loads meanwhile), STAGES x K stages, STAGES x V stages, then
// per stage a full and an empty mbarrier, a full and an empty mbarrier for Q, per stage its tiles' (n0, n0, flags),
// and three work-item slots.
// A Q tile is [D/64][64 rows][64 elements], a stage [D/64][128 rows][64 elements] (its two 64-key tiles in rows
// 0-63 and 64-127): each row of a 64-column slab is 128 bytes whose 16-byte chunks are XOR-swizzled by (row & 7), the
// canonical 128B-swizzle layout that wgmma reads as K-major (K in Q K^T) and as N-major (V in P V).

template <int HEAD_DIM, int STAGES> struct Layout {
  static constexpr int TILE_BYTES = BLOCK_N * HEAD_DIM * 2;      // a 64-row Q tile
  static constexpr int STAGE_BYTES = STAGE_KEYS * HEAD_DIM * 2;  // a stage's K (or V)
  static constexpr int Q_OFF = 0;  // a tile per consumer warpgroup
  static constexpr int K_OFF = 2 * TILE_BYTES;
  static constexpr int V_OFF = K_OFF + STAGES * STAGE_BYTES;
  static constexpr int BAR_OFF = V_OFF + STAGES * STAGE_BYTES;
  static constexpr int Q_BAR_OFF = BAR_OFF + 2 * STAGES * 8;  // Q full, then Q empty
  static constexpr int INFO_OFF = Q_BAR_OFF + 16;
  static constexpr int ITEM_OFF = INFO_OFF + STAGES * 16;  // the work-item slots
  static constexpr int ITEM_SLOTS = 3;  // items n, n + 1 and n + 2 (see the entry point)
  static __device__ __forceinline__ int next_slot(int slot) { return slot == ITEM_SLOTS - 1 ? 0 : slot + 1; }
  static constexpr int BYTES = ITEM_OFF + ITEM_SLOTS * 64;
  static constexpr int ALLOC = BYTES + 1024;  // the dynamic window is re-aligned to 1024 bytes
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of ROWS rows (slabs of ROWS x 128 bytes).
template <int ROWS> __device__ __forceinline__ int swizzled(int row, int chunk) {
  return (chunk >> 3) * (ROWS * 128) + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

// ---------------------------------------------------------------------------------------------------------------
// A work item: one (128-row query tile, q head). Items are numbered tile_rank * H_q + head, tiles heaviest first;
// the CTAs (about one per SM) take them in that order from a global counter, each as soon as it can load the next
// Q: balanced like the hardware's own block scheduling, and CTAs running together work on neighbouring tiles
// (their K/V meet in L2).
//
// An item also carries the start of its key walk: the CSR ranges [ptr, end) of the R <= 2 rows the tile spans and
// their first columns (NONE: no column). Reading them is a chain of dependent global loads (counter, schedule,
// cu_seqlens, indptr, indices); the producer does it for the next item while the consumers still work on the
// current one, so a new item's first copies wait for none of it.

struct Item {
  static constexpr int NONE = 0x7fffffff;
  int head, q_start, k_start, k_len, past, tile_start, pos_lo, pos_hi;  // valid query rows: [pos_lo, pos_hi)
  int ptr0, end0, col0, ptr1, end1, col1;

  // Item number `item` of the schedule (head = -1: none, item >= num_items).
  __device__ __forceinline__ void load(int item, int num_items, int num_heads, const int* __restrict__ tiles,
                                       const int* __restrict__ cu_q, const int* __restrict__ cu_k,
                                       const int* __restrict__ indptr, const int* __restrict__ indices,
                                       int num_blocks, int nnz_stride, int block_size) {
    if (item >= num_items) {
      head = -1;
      return;
    }
    head = item % num_heads;
    const int tile = item / num_heads;
    const int seq = tiles[2 * tile];
    tile_start = tiles[2 * tile + 1];
    q_start = cu_q[seq];
    const int q_len = cu_q[seq + 1] - q_start;
    k_start = cu_k[seq];
    k_len = cu_k[seq + 1] - k_start;
    past = k_len - q_len;  // queries are the last q_len key positions
    pos_lo = max(tile_start, past);
    pos_hi = min(tile_start + BLOCK_M, k_len);

    // The CSR rows of the tile's query blocks that hold valid rows (block 64: two rows, one per consumer
    // warpgroup; block 128: one).
    const int* row_ptr = indptr + (long long)head * (num_blocks + 1);
    const int* cols = indices + (long long)head * nnz_stride;
    ptr0 = end0 = ptr1 = end1 = 0;
    const int qb = tile_start / block_size;
    if (qb < num_blocks && qb * block_size < pos_hi && (qb + 1) * block_size > pos_lo) {
      ptr0 = row_ptr[qb];
      end0 = row_ptr[qb + 1];
    }
    if (BLOCK_M / block_size == 2 && qb + 1 < num_blocks && (qb + 1) * block_size < pos_hi &&
        (qb + 2) * block_size > pos_lo) {
      ptr1 = row_ptr[qb + 1];
      end1 = row_ptr[qb + 2];
    }
    col0 = ptr0 < end0 ? cols[ptr0] : NONE;
    col1 = ptr1 < end1 ? cols[ptr1] : NONE;
  }
};

// The launch's item schedule (kernel arguments), for the producer's thread 0.
struct Schedule {
  const int* __restrict__ tiles;
  const int* __restrict__ cu_q;
  const int* __restrict__ cu_k;
  const int* __restrict__ indptr;
  const int* __restrict__ indices;
  int* __restrict__ next_item;
  int num_items, num_heads, num_blocks, nnz_stride, block_size;

  __device__ __forceinline__ int draw() const { return atomicAdd(next_item, 1); }
  __device__ __forceinline__ void load(Item& w, int item) const {
    w.load(item, num_items, num_heads, tiles, cu_q, cu_k, indptr, indices, num_blocks, nnz_stride, block_size);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// The key-tile walk of one CTA (producer only): ascending union of the column lists of the R <= 2 CSR rows the
// 128-row query tile spans (block 64: two rows, one per consumer warpgroup; block 128: one row, two 64-key
// sub-tiles per column). mask bit r = the column is in row r.

// info[stage] = (n0 of tile 0, n0 of tile 1, flags): flags bits 0-1 / 2-3 are the CSR row masks of tiles 0 / 1,
// TWO says the stage holds two tiles, LAST that it is the item's last stage.
constexpr int TWO = 16, LAST = 32;

struct KeyWalk {
  static constexpr int NONE = Item::NONE;
  const int* cols;
  int ptr0, end0, col0, ptr1, end1, col1;
  int subs, sub, n0, mask, block_size, pos_last;

  __device__ __forceinline__ KeyWalk(const Item& w, const int* __restrict__ indices, int nnz_stride,
                                     int block_size_)
      : cols(indices + (long long)w.head * nnz_stride), ptr0(w.ptr0), end0(w.end0), col0(w.col0), ptr1(w.ptr1),
        end1(w.end1), col1(w.col1), subs(block_size_ > BLOCK_N ? block_size_ / BLOCK_N : 1), sub(subs), n0(0),
        mask(0), block_size(block_size_), pos_last(w.pos_hi - 1) {}  // sub = subs: the first next() starts a column

  __device__ __forceinline__ bool next(int& out_n0, int& out_mask) {
    if (sub + 1 < subs && n0 + BLOCK_N <= pos_last) {  // second 64-key half of a 128-key column
      ++sub;
      n0 += BLOCK_N;
      out_n0 = n0;
      out_mask = mask;
      return true;
    }
    const int col = min(col0, col1);
    if (col == NONE) return false;
    mask = 0;
    if (col0 == col) {
      mask |= 1;
      ++ptr0;
      col0 = ptr0 < end0 ? cols[ptr0] : NONE;
    }
    if (col1 == col) {
      mask |= 2;
      ++ptr1;
      col1 = ptr1 < end1 ? cols[ptr1] : NONE;
    }
    n0 = col * block_size;
    sub = 0;
    out_n0 = n0;
    out_mask = mask;
    return true;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Producer (warp 0 of warpgroup 0), one work item. Lane 0 issues the tensor copies: the Q tile (two 64-row halves,
// one box per half and 64-column slab) onto the Q full barrier, then the K/V tiles of the walk, two per ring stage,
// onto the stage's full barrier. Each barrier takes one arrival (lane 0's, which also sets the bytes to expect) and
// completes when the copies have landed. Once the item's first stage is issued, lane 0 reads the next item into
// `next` (Schedule::load; before it, the dependent loads delayed every item's first copies). `it` counts ring
// stages across the CTA's items.
//
// Rows the copies must not take from memory: Q rows outside [pos_lo, pos_hi) get whatever the box holds (a
// neighbouring sequence's queries, or the zeros a box past either end of the tensor gets): each output row depends
// on its own Q row only, and those rows are not stored. K rows past the sequence end are masked (their scores are
// set to -inf). V rows past the end meet probability 0, and 0 x inf or 0 x NaN would spoil the row, so a tile that
// crosses the sequence end takes its V with zero-filling cp.async copies by the whole warp instead.

template <typename T, int HEAD_DIM>
__device__ __forceinline__ void copy_v_tail(unsigned dst, const T* __restrict__ v, long long v_tok, int v_head,
                                            int kv_head, int first_key, int keys, int lane) {
  constexpr int CHUNKS = HEAD_DIM / 8;       // 16-byte chunks per key row
  constexpr int ROWS_PER_PASS = 32 / CHUNKS;  // 2 (D 128) or 4 (D 64)
  const int r0 = lane / CHUNKS, c = lane % CHUNKS;
  const T* src = v + (long long)(first_key + r0) * v_tok + (long long)kv_head * v_head + c * 8;
#pragma unroll 4
  for (int r = r0; r < BLOCK_N; r += ROWS_PER_PASS) {
    const bool valid = r < keys;
    cp_async_16(dst + swizzled<STAGE_KEYS>(r, c), valid ? src : v, valid);
    src += ROWS_PER_PASS * v_tok;
  }
}

template <typename T, int HEAD_DIM, int STAGES>
__device__ __forceinline__ void produce(unsigned char* smem, const TensorMap* __restrict__ maps,
                                        const T* __restrict__ v, long long v_tok, int v_head, const Item& w,
                                        int kv_head, KeyWalk walk, int& it, const Schedule& sched, Item* next,
                                        int& drawn) {
  using L = Layout<HEAD_DIM, STAGES>;
  constexpr int SLABS = HEAD_DIM / 64;
  constexpr unsigned TILE_TX = L::TILE_BYTES;  // bytes of one 64-row tile of Q, K or V
  constexpr int SLAB_BYTES = STAGE_KEYS * 128;
  const int lane = threadIdx.x;  // 0..31
  const unsigned base = smem_addr(smem);
  const TensorMap* q_map = maps + 0;
  const TensorMap* k_map = maps + 1;
  const TensorMap* v_map = maps + 2;
  int4* info = reinterpret_cast<int4*>(smem + L::INFO_OFF);

  if (lane == 0) {
    const unsigned bar = base + L::Q_BAR_OFF;
    mbar_arrive_expect_tx(bar, 2 * TILE_TX);
    const int token = w.q_start + w.tile_start - w.past;  // of tile row 0 (may lie before the tensor: zeros)
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int slab = 0; slab < SLABS; ++slab)
        tma_load_3d_once(base + L::Q_OFF + half * L::TILE_BYTES + slab * BLOCK_N * 128, q_map, slab * 64, w.head,
                         token + half * BLOCK_N, bar);
  }
  bool next_read = false;  // lane 0: the next item read (after this item's first stage is under way)
  // One tile ahead, so that the last stage can be flagged. An item without tiles sends one that no row attends
  // (mask 0): the consumers' loop then always runs at least once (a path around it, from zeroing O to storing it,
  // makes ptxas serialise every wgmma of the kernel, C7515).
  int n0 = 0, mask = 0;
  walk.next(n0, mask);
  bool more = true;
  while (more) {
    // This stage's tiles: the one in hand and the walk's next, if any; then the tile after them.
    const int n0_a = n0, mask_a = mask;
    int n0_b = 0, flags = mask_a;
    more = walk.next(n0, mask);
    if (more) {
      n0_b = n0;
      flags |= (mask << 2) | TWO;
      more = walk.next(n0, mask);
    }
    const int stage = it % STAGES;
    const unsigned k_dst = base + L::K_OFF + stage * L::STAGE_BYTES;
    const unsigned v_dst = base + L::V_OFF + stage * L::STAGE_BYTES;
    const unsigned full = base + L::BAR_OFF + stage * 8;
    const int tiles = flags & TWO ? 2 : 1;
    const bool tail_a = n0_a + BLOCK_N > w.k_len, tail_b = tiles == 2 && n0_b + BLOCK_N > w.k_len;
    mbar_wait(base + L::BAR_OFF + (STAGES + stage) * 8, ((it / STAGES) & 1) ^ 1);  // consumers freed it
    if (tail_a || tail_b) {  // rare: the sequence's last tile
      if (tail_a)
        copy_v_tail<T, HEAD_DIM>(v_dst, v, v_tok, v_head, kv_head, w.k_start + n0_a, w.k_len - n0_a, lane);
      if (tail_b)
        copy_v_tail<T, HEAD_DIM>(v_dst + BLOCK_N * 128, v, v_tok, v_head, kv_head, w.k_start + n0_b,
                                 w.k_len - n0_b, lane);
      cp_async_commit();
      cp_async_wait<0>();
      fence_proxy_async();  // generic-proxy writes, read by wgmma (async proxy)
      __syncwarp();
    }
    if (lane == 0) {
      info[stage] = make_int4(n0_a, n0_b, more ? flags : flags | LAST, 0);
      mbar_arrive_expect_tx(full, TILE_TX * (2 * tiles - int(tail_a) - int(tail_b)));
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (h == 1 && tiles == 1) break;
        const int key = w.k_start + (h == 0 ? n0_a : n0_b);
        const bool tail = h == 0 ? tail_a : tail_b;
#pragma unroll
        for (int slab = 0; slab < SLABS; ++slab) {
          const unsigned off = slab * SLAB_BYTES + h * BLOCK_N * 128;
          tma_load_3d(k_dst + off, k_map, slab * 64, kv_head, key, full);
          if (!tail) tma_load_3d(v_dst + off, v_map, slab * 64, kv_head, key, full);
        }
      }
    }
    ++it;
    if (lane == 0 && !next_read) {  // the next item (its number drawn one item earlier)
      sched.load(*next, drawn);
      drawn = sched.draw();
      next_read = true;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Consumer warpgroup: 64 query rows at absolute positions row0 .. row0 + 63.
//
// A step takes one ring stage (tiles 2i and 2i + 1 of the walk) and computes the 64 x 128 scores of both 64-key
// tiles with one wgmma per 16 columns of Q, so the per-step costs (row maxima and their shuffles, rebasing O, wgmma
// waits, barrier turns) are paid once per 128 keys. A tile outside this warpgroup's CSR row (or after its last
// query) is skipped: a step with one live tile computes only that tile, a stage with none is released unread.
//
// A step: issue Q K^T; wait for it (and for the previous step's P V); row maxima; rebase O; per tile, its
// probabilities and then its P V, left running (the second tile's exponentials overlap the first tile's P V). The
// tensor cores are otherwise kept busy by the other warpgroup (ping-pong, see consume), not by overlapping a
// warpgroup's P V with its next softmax: that holds a second set of P registers (more than the 224 a consumer has,
// with Q in registers) and the pending step's keys through the softmax (with a ring of 5 or 6 64-key stages for
// D = 128 it measured 4-15% slower).

// Q K^T with Q's A fragments in registers (qf[kk]: k-step kk) against N = 128 keys (a whole stage) or 64 (one of
// its tiles, from its first row): only K is read from shared memory (with both operands there, the Q K^T steps
// would need most of its bandwidth).
template <typename T, int HEAD_DIM, int N>
__device__ __forceinline__ void issue_qk(float* s, const unsigned (&qf)[HEAD_DIM / 16][4], unsigned k_rows) {
  constexpr int SLAB_BYTES = STAGE_KEYS * 128;
  // The address field is the low 14 bits of the descriptor (bytes >> 4) and never carries (shared memory < 256 KB),
  // so each k-step's descriptor is the tile's plus a constant.
  const unsigned long long k_desc = smem_desc(k_rows, 16, 1024);
#pragma unroll
  for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {  // K-major K: k-step kk reads 32 bytes further into slab kk / 4
    const unsigned step = ((kk >> 2) * SLAB_BYTES + (kk & 3) * 32) >> 4;
    if constexpr (N == 128)
      Wgmma<T>::template n128<0>(*reinterpret_cast<float(*)[64]>(s), qf[kk], k_desc + step, kk > 0);
    else
      Wgmma<T>::template rs<0>(*reinterpret_cast<float(*)[32]>(s), qf[kk], k_desc + step, kk > 0);
  }
}

// O += P V for the 64 keys from v_rows (a tile of a stage).
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void issue_pv(float (&acc)[HEAD_DIM / 64][32], const unsigned (*pf)[4], unsigned v_rows) {
  constexpr int SLAB_BYTES = STAGE_KEYS * 128;
  // N-major V (leading byte offset = slab stride, stride byte offset = 8 keys): D = 128 in one n128 wgmma per 16
  // keys (acc[0..1] are consecutive registers, the n128 accumulator layout); other D one n64 wgmma per slab.
  const unsigned long long desc = smem_desc(v_rows, SLAB_BYTES, 1024);
  if constexpr (HEAD_DIM == 128) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      Wgmma<T>::template n128<1>(reinterpret_cast<float(&)[64]>(acc), pf[kk], desc + ((kk * 16 * 128) >> 4), 1);
  } else {
#pragma unroll
    for (int b = 0; b < HEAD_DIM / 64; ++b)
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        Wgmma<T>::template rs<1>(acc[b], pf[kk], desc + ((b * SLAB_BYTES + kk * 16 * 128) >> 4), 1);
  }
}

// A step: its stage, its live tiles (count 0, 1 or 2) and their first key positions; with one live tile, `half`
// says which of the stage's two it is and n00 is its position. Scalars, not arrays, so that nothing is indexed at
// run time (that would put the struct on the stack).
struct Step {
  int count, stage, half, n00, n01;
};

// Releases a step's stage to the producer once its P V has landed.
__device__ __forceinline__ void release(unsigned empty_bar, const Step& step) {
  if (step.count > 0) mbar_arrive(empty_bar + step.stage * 8);
}

// One step of NT live tiles (see above). qf: Q's A fragments. pending: the previous step, whose P V is in flight.
// first_row: the warp's first query row.
template <typename T, int HEAD_DIM, int STAGES, int NT>
__device__ __forceinline__ void attend(float (&acc)[HEAD_DIM / 64][32], const unsigned (&qf)[HEAD_DIM / 16][4],
                                       float (&row_max)[2], float (&row_sum)[2], const int (&pos)[2],
                                       unsigned base, const Step& step, const Step& pending, int first_row, int tq,
                                       float scale_log2, int other_bar) {
  using L = Layout<HEAD_DIM, STAGES>;
  constexpr int DB = HEAD_DIM / 64;
  constexpr int NS = 32 * NT;  // scores per thread: rows g and g + 8, 8 column pairs per tile
  const int n0[2] = {step.n00, step.n01};
  float s[NS];
  wgmma_fence();
  const unsigned k_stage = base + L::K_OFF + step.stage * L::STAGE_BYTES;
  if constexpr (NT == 2)
    issue_qk<T, HEAD_DIM, 128>(s, qf, k_stage);
  else
    issue_qk<T, HEAD_DIM, 64>(s, qf, k_stage + step.half * BLOCK_N * 128);
  wgmma_commit();
  named_bar_arrive(other_bar);  // the other warpgroup's turn to issue (its softmax ran meanwhile)
  wgmma_wait<0>();
  release(base + L::BAR_OFF + STAGES * 8, pending);

  // Causal mask where a key can follow a row (the diagonal block and keys past the sequence, which are > every
  // query position). Scores stay unscaled: scale_log2 > 0 keeps -inf and the row maximum.
#pragma unroll
  for (int h = 0; h < NT; ++h) {
    if (n0[h] + BLOCK_N - 1 > first_row) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (n0[h] + j * 8 + 2 * tq + (e & 1) > pos[e >> 1]) s[32 * h + j * 4 + e] = neg_inf();
    }
  }

  // Online softmax in base 2: p = 2^(s * scale_log2 - max * scale_log2), one FFMA and one EX2 per score; the
  // 4 lanes of a quad share a row. Max and sum as trees, not chains (the dependent latency is exposed otherwise).
  // The row maxima over all NT tiles first, then O is rebased, then per tile: its probabilities, rounded to T, are
  // the register A operand of its P V (the accumulator layout of two adjacent 8-key column groups is the A layout
  // of one 16-key step), issued at once, so the second tile's exponentials overlap the first tile's P V.
  float base_r[2], scale_old[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float m[4 * NT];
#pragma unroll
    for (int j = 0; j < 4 * NT; ++j)
      m[j] = fmaxf(fmaxf(s[j * 8 + 2 * r], s[j * 8 + 2 * r + 1]), fmaxf(s[j * 8 + 4 + 2 * r], s[j * 8 + 5 + 2 * r]));
#pragma unroll
    for (int w = 2 * NT; w >= 1; w /= 2)
#pragma unroll
      for (int j = 0; j < w; ++j) m[j] = fmaxf(m[j], m[j + w]);
    float mx = fmaxf(m[0], row_max[r]);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    base_r[r] = mx == neg_inf() ? 0.f : mx * scale_log2;  // no key yet: keep everything finite
    scale_old[r] = exp2_approx(row_max[r] * scale_log2 - base_r[r]);
    row_max[r] = mx;
    row_sum[r] *= scale_old[r];  // per-lane partial; quad-reduced at the end
  }
#pragma unroll
  for (int b = 0; b < DB; ++b)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      acc[b][j * 4 + 0] *= scale_old[0];
      acc[b][j * 4 + 1] *= scale_old[0];
      acc[b][j * 4 + 2] *= scale_old[1];
      acc[b][j * 4 + 3] *= scale_old[1];
    }
  unsigned pf[4 * NT][4];
#pragma unroll
  for (int h = 0; h < NT; ++h) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float m[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float* p = s + (4 * h + j) * 8 + 2 * r;
        p[0] = exp2_approx(fmaf(p[0], scale_log2, -base_r[r]));
        p[1] = exp2_approx(fmaf(p[1], scale_log2, -base_r[r]));
        p[4] = exp2_approx(fmaf(p[4], scale_log2, -base_r[r]));
        p[5] = exp2_approx(fmaf(p[5], scale_log2, -base_r[r]));
        m[j] = (p[0] + p[1]) + (p[4] + p[5]);
      }
      row_sum[r] += (m[0] + m[1]) + (m[2] + m[3]);
    }
#pragma unroll
    for (int kk = 4 * h; kk < 4 * h + 4; ++kk) {
      pf[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
      pf[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
      pf[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
      pf[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
    wgmma_fence();
    issue_pv<T, HEAD_DIM>(acc, pf + 4 * h,
                          base + L::V_OFF + step.stage * L::STAGE_BYTES + (NT == 2 ? h : step.half) * BLOCK_N * 128);
  }
  wgmma_commit();
}

// Position in the stage ring (both consumer warpgroups read every stage in order).
template <int STAGES> struct RingCursor {
  int stage = 0, phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == STAGES) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// 16 bytes to global memory at p (16-byte aligned), marked as written once (evict-first: the output is not read
// again, and the K / V tiles other CTAs still read should stay in L2).
__device__ __forceinline__ void store_streaming(void* p, const unsigned (&x)[4]) {
  asm volatile("st.global.cs.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(x[0]), "r"(x[1]), "r"(x[2]), "r"(x[3])
               : "memory");
}

// Transposes a 4 x 4 matrix of 32-bit words held by the 4 lanes of a quad (lane tq holds row tq in x[0..3]): lane tq
// ends with column tq (x[k] = the word lane k held at index tq). Two exchange rounds, between lanes tq ^ 1 and then
// tq ^ 2; in each a lane keeps the words whose index agrees with its own in that bit and swaps the others.
__device__ __forceinline__ void quad_transpose(unsigned (&x)[4], int tq) {
  const bool odd = tq & 1, high = tq & 2;
#pragma unroll
  for (int m = 0; m < 4; m += 2) {  // word pairs (0, 1), (2, 3)
    const unsigned got = __shfl_xor_sync(0xffffffffu, odd ? x[m] : x[m + 1], 1);
    if (odd)
      x[m] = got;
    else
      x[m + 1] = got;
  }
#pragma unroll
  for (int m = 0; m < 2; ++m) {  // word pairs (0, 2), (1, 3)
    const unsigned got = __shfl_xor_sync(0xffffffffu, high ? x[m] : x[m + 2], 2);
    if (high)
      x[m] = got;
    else
      x[m + 2] = got;
  }
}

// A consumer warpgroup's part of one work item (the ring cursor runs on across items).
template <typename T, int HEAD_DIM, int STAGES>
__device__ __forceinline__ void consume(unsigned char* smem, T* __restrict__ out, long long o_tok, int o_head,
                                        const Item& w, int row_bit, float scale_log2, int consumer,
                                        RingCursor<STAGES>& ring) {
  using L = Layout<HEAD_DIM, STAGES>;
  constexpr int DB = HEAD_DIM / 64;  // 64-column output slabs
  const int tid = threadIdx.x & 127, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tq = lane & 3;
  const unsigned base = smem_addr(smem);
  const unsigned full_bar = base + L::BAR_OFF, empty_bar = base + L::BAR_OFF + STAGES * 8;
  const int4* info = reinterpret_cast<const int4*>(smem + L::INFO_OFF);

  const int row0 = w.tile_start + 64 * consumer, pos_lo = w.pos_lo, pos_hi = w.pos_hi;
  // This thread's two rows (g and g + 8 of its warp's 16) and whether they are queries of this tile.
  int pos[2];
  bool valid[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    pos[r] = row0 + warp * 16 + g + 8 * r;
    valid[r] = pos[r] >= pos_lo && pos[r] < pos_hi;
  }
  const int wg_lo = max(row0, pos_lo), wg_hi = min(row0 + 64, pos_hi);  // valid rows of this warpgroup
  const int first_row = row0 + warp * 16;

  // This warpgroup's Q tile (the producer's first batch; the caller waited for it) as wgmma A fragments, the
  // layout ldmatrix gives: k-step kk's matrices are rows 0-7 / 8-15 of the warp's 16 by columns 16 kk + 0-7 /
  // 8-15. Then the buffer goes back to the producer for the next item's Q.
  unsigned qf[HEAD_DIM / 16][4];
  {
    const unsigned q_tile = base + L::Q_OFF + consumer * L::TILE_BYTES;
    const int r = warp * 16 + (lane & 7) + (lane & 8);
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk)
      ldmatrix_x4(qf[kk], q_tile + swizzled<BLOCK_N>(r, 2 * kk + (lane >> 4)));
    mbar_arrive(base + L::Q_BAR_OFF + 8);
  }

  float acc[DB][32];
#pragma unroll
  for (int b = 0; b < DB; ++b)
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[b][i] = 0.f;
  float row_max[2] = {neg_inf(), neg_inf()}, row_sum[2] = {0.f, 0.f};

  // Walk the ring one stage at a time. The previous step's P V is waited for before a step with nothing live: a
  // warpgroup never holds a stage while passing over others, or the producer could wait for such a stage while the
  // warpgroup waits for a stage behind it (a long run of tiles only the other warpgroup attends to).
  //
  // Ping-pong: the two warpgroups take turns issuing their Q K^T (named barriers 1 and 2), so one's softmax runs
  // while the other's matrix products occupy the tensor cores. Both take one turn per stage, live or not, so their
  // turns pair up, across items too (the entry point starts and ends the alternation).
  const int my_bar = 1 + consumer, other_bar = 2 - consumer;
  Step pending = {0, 0, 0, 0, 0};
  bool more = true;  // every item sends at least one tile (see produce)
  while (more) {
    mbar_wait(full_bar + ring.stage * 8, ring.phase);
    const int4 t = info[ring.stage];
    Step step;
    step.stage = ring.stage;
    ring.advance();
    more = !(t.z & LAST);
    const bool rows = wg_lo < wg_hi;
    const bool live0 = ((t.z >> row_bit) & 1) && rows && t.x < wg_hi;
    const bool live1 = (t.z & TWO) && ((t.z >> (2 + row_bit)) & 1) && rows && t.y < wg_hi;
    step.count = int(live0) + int(live1);
    step.half = live0 ? 0 : 1;
    step.n00 = live0 ? t.x : t.y;
    step.n01 = t.y;
    if (step.count == 0) mbar_arrive(empty_bar + step.stage * 8);  // not needed here: released unread
    named_bar_sync(my_bar);
    if (step.count == 0) {
      wgmma_wait<0>();
      release(empty_bar, pending);
      pending.count = 0;
      named_bar_arrive(other_bar);
      continue;
    }
    if (step.count == 2)
      attend<T, HEAD_DIM, STAGES, 2>(acc, qf, row_max, row_sum, pos, base, step, pending, first_row, tq,
                                     scale_log2, other_bar);
    else
      attend<T, HEAD_DIM, STAGES, 1>(acc, qf, row_max, row_sum, pos, base, step, pending, first_row, tq,
                                     scale_log2, other_bar);
    pending = step;
  }
  wgmma_wait<0>();
  release(empty_bar, pending);

  // Epilogue: normalise, and store each row as 16-byte chunks (an empty CSR row outputs zeros). A quad's 4 lanes
  // hold a row's 64-column slab as 4-byte column pairs interleaved across lanes (lane tq: pair tq of every 8-column
  // chunk); a transpose within the quad gives each lane whole chunks (see quad_transpose), so a row takes 2
  // 16-byte stores per lane and slab instead of 8 4-byte ones (the scattered 4-byte stores cost ~9% of prefill-4k).
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    T* orow = out + (long long)(w.q_start + pos[r] - w.past) * o_tok + (long long)w.head * o_head;
#pragma unroll
    for (int b = 0; b < DB; ++b)
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // chunks 0-3, then 4-7 of the slab
        unsigned x[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int j = 4 * h + k;
          x[k] = pack2<T>(acc[b][j * 4 + 2 * r] * inv[r], acc[b][j * 4 + 2 * r + 1] * inv[r]);
        }
        quad_transpose(x, tq);  // the whole quad, valid row or not
        if (valid[r]) store_streaming(orow + b * 64 + (4 * h + tq) * 8, x);
      }
  }
}

}  // namespace sm90
}  // namespace cubsattn

// ---------------------------------------------------------------------------------------------------------------
// Entry point: 384 threads, dynamic shared memory Layout<HEAD_DIM, STAGES>::ALLOC bytes (mirrored by
// cubsattn/_prefill_sm90.py::smem_bytes); a grid of min(num_items, SMs) CTAs walks the num_tiles x H_q work items
// (persistent: the producer loads an item's Q and first K/V tiles while the consumers finish the previous one).
// maps: tensor maps of q, k and v (in that order; 3-D {D, heads, tokens}, boxes of 64 columns x 1 head x 64 tokens,
// 128-byte swizzle: cubsattn/_tma.py). v is also read directly (tiles crossing a sequence end).
// next_item: a zeroed int the CTAs draw items from.

template <typename T, int HEAD_DIM, int STAGES>
__global__ void __launch_bounds__(cubsattn::sm90::THREADS, 1) blocksparse_prefill_sm90(
    const cubsattn::sm90::TensorMap* __restrict__ maps,       // [3]: q, k, v
    const T* __restrict__ v, long long v_tok, int v_head,      // [T_k, H_kv, D]
    T* __restrict__ out, long long o_tok, int o_head,          // [T_q, H_q, D]
    const int* __restrict__ tiles,                             // [num_tiles, 2]: (sequence, first position)
    const int* __restrict__ cu_q, const int* __restrict__ cu_k,  // [batch + 1] each
    const int* __restrict__ indptr, const int* __restrict__ indices,  // [H_q, NB + 1], [H_q, nnz_stride]
    int num_heads, int group, int num_blocks, int nnz_stride, int block_size, float scale_log2, int num_items,
    int* __restrict__ next_item) {
  using namespace cubsattn;
  using namespace cubsattn::sm90;
  using L = Layout<HEAD_DIM, STAGES>;
  // A warpgroup holds its pending stage while it waits for the next: fewer than 3 stages can deadlock.
  static_assert(STAGES >= 3, "the consumers need at least 3 ring stages");
  static_assert(HEAD_DIM % 64 == 0, "HEAD_DIM must be a multiple of 64 (128-byte swizzle slabs)");
  static_assert(L::ITEM_SLOTS * sizeof(Item) <= L::BYTES - L::ITEM_OFF, "the work-item slots are too small");
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);

  if (threadIdx.x == 0) {
    const unsigned bars = smem_addr(smem + L::BAR_OFF);
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(bars + s * 8, 1);                                // full: the producer's arrival (+ its bytes)
      mbar_init(bars + (STAGES + s) * 8, 32 * CONSUMER_WARPS);  // empty: every consumer thread
    }
    mbar_init(smem_addr(smem + L::Q_BAR_OFF), 1);                       // Q full: the producer's arrival
    mbar_init(smem_addr(smem + L::Q_BAR_OFF + 8), 32 * CONSUMER_WARPS);  // Q empty: every consumer thread
    // The barriers' initialisation is visible to the tensor copies (async proxy) that complete on them.
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  // Registers: 384 threads start with 168 each; the producer needs few, the consumers (O, a pair's scores and P)
  // more: 128 x PRODUCER_REGS + 256 x CONSUMER_REGS = 384 x 168 (the pool a CTA starts with).
  //
  // Item n uses work-item slot n % 3. The producer loads item n + 1's Q and first tiles while the consumers work on
  // item n (they release the Q buffer once they hold item n's Q in registers).
  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS) : "memory");
    if (threadIdx.x >= 32) return;  // one warp issues the copies
    Item* slots = reinterpret_cast<Item*>(smem + L::ITEM_OFF);
    const unsigned q_full = smem_addr(smem + L::Q_BAR_OFF), q_empty = q_full + 8;
    if (threadIdx.x == 0)
      for (int m = 0; m < 3; ++m) tensormap_acquire(maps + m);
    int it = 0;
    // Lane 0 reads each item one ahead (Item::load) once the current item's first stage is issued, its number
    // drawn one item earlier, so the chain of dependent global loads (counter, schedule, cu_seqlens, indptr,
    // indices) is off the path from one item's last tile to the next item's Q. The warp reads an item after __syncwarp,
    // the consumers once its Q barrier completes. Slot (n + 1) % 3 was last read at the start of item n - 2, and
    // the producer has seen item n - 1's Q released before item n: the consumers are past it.
    const Schedule sched = {tiles, cu_q, cu_k, indptr, indices, next_item, num_items, num_heads, num_blocks,
                            nnz_stride, block_size};
    int drawn = 0;
    if (threadIdx.x == 0) {
      sched.load(slots[0], sched.draw());
      drawn = sched.draw();
    }
    for (int n = 0, slot = 0;; ++n, slot = L::next_slot(slot)) {
      if (n >= 1) mbar_wait(q_empty, (n - 1) & 1);  // the consumers have item n - 1's Q in registers
      __syncwarp();  // lane 0 wrote the slot
      const Item w = slots[slot];
      if (w.head < 0) {  // no work left: the consumers read the slot and stop
        if (threadIdx.x == 0) mbar_arrive(q_full);
        break;
      }
      produce<T, HEAD_DIM, STAGES>(smem, maps, v, v_tok, v_head, w, w.head / group,
                                   KeyWalk(w, indices, nnz_stride, block_size), it, sched,
                                   &slots[L::next_slot(slot)], drawn);
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS) : "memory");
    const int c = wg - 1;
    const int row_bit = block_size == 64 ? c : 0;  // the CSR row of this warpgroup's 64 rows
    RingCursor<STAGES> ring;
    // Warpgroup 0 takes the first ping-pong turn, and after the last item warpgroup 1's last hand-over (named
    // barrier 1). Doing this per item would let warpgroup 1 arrive twice in a row on barrier 1.
    if (c == 1) named_bar_arrive(1);
    const Item* slots = reinterpret_cast<const Item*>(smem + L::ITEM_OFF);
    for (int n = 0, slot = 0;; ++n, slot = L::next_slot(slot)) {
      mbar_wait(smem_addr(smem + L::Q_BAR_OFF), n & 1);  // Q of item n is in (and its slot)
      const Item w = slots[slot];
      if (w.head < 0) break;
      consume<T, HEAD_DIM, STAGES>(smem, out, o_tok, o_head, w, row_bit, scale_log2, c, ring);
    }
    if (c == 0) named_bar_sync(1);
  }
}
