// Block-sparse paged attention of one query token per sequence (vLLM decode), GQA-aware, split-KV.
// query/out [S, Hq, D]; key_cache [num_blocks, Hkv, D/x, BS, x] and value_cache [num_blocks, Hkv, D, BS] (vLLM's
// layout, x = 16 bytes / element); block_tables int32 [S, max_blocks]; seq_lens int32 [S].
// Grid (num_splits, Hkv, S) x 128 threads (160 for paged_decode_bulk): one CTA computes all Hq/Hkv query heads of one
// kv head over one split (a range of logical cache blocks), reading each block that any of those heads needs once.
// 16-bit caches: paged_decode_bulk (tensor cores fed by bulk copies, sm_90) or paged_decode_mma (tensor cores fed by
// cp.async, sm_80); fp8 caches: paged_decode (CUDA cores). With num_splits > 1 the last CTA of each (sequence, kv head)
// to finish merges the splits' partial outputs (combine_splits_if_last); with one split a CTA writes `out` directly.
#include "common.cuh"
#include "layout.cuh"

namespace cubsattn {
namespace decode {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
// Tokens per pipeline stage: one lane per token in the QK product, so a stage is 1, 2 or 4 cache blocks (BS 32/16/8).
constexpr int kStageTokens = 32;
// A CTA's compacted block list (shared memory) holds the cache blocks one split needs: at most chunk_blocks of them
// (split_range). It is the last part of the dynamic shared memory, sized per launch to chunk_blocks entries, which
// the host (cubsattn/_decode_cuda.py, MAX_SPLIT_BLOCKS) keeps <= kMaxSplitBlocks: launches of short splits keep the
// shared memory, and so the CTAs per SM, that a fixed 512-entry list gave them, and 16 x 32k (cache block 16) can
// run 2 splits of 1024 blocks, 256 CTAs: one wave of two per SM on 132 SMs.
constexpr int kMaxSplitBlocks = 1024;

// Every scalar argument of the attention kernels, passed by value as one struct (the launcher's NumPy structured
// scalar _decode_cuda.PARAMS_DTYPE mirrors it field for field). CuPy converts every scalar argument on every launch:
// 17 conversions took ~1.7 us on a 2-core EPYC host, one structured scalar ~0.35 us; an eager decode call's
// bandwidth includes that host time.
struct DecodeParams {
  int q_stride_s, q_stride_h;  // query strides (elements) of the sequence and head axes
  int num_blocks;              // physical cache blocks; block ids outside [0, num_blocks) are skipped
  int max_blocks, bt_stride;   // block table width and row stride (elements)
  int max_seq_len;             // device seq_lens are clamped to it
  int log2_bs;                 // log2 of the cache block size (3, 4 or 5)
  int num_kv_heads, group;     // kv heads; query heads per kv head
  float qk_scale_log2;         // scale * k_scale * log2(e)
  float v_scale;
  int tp_rank, local_blocks;
  int vert_stride;             // <= 1: dense
  int sparse_block, sliding_step;
  int chunk_blocks;            // ceil(context blocks / num_splits): a sequence of n blocks uses ceil(n / it) splits
};
static_assert(sizeof(DecodeParams) == 17 * 4, "DecodeParams must have no padding (PARAMS_DTYPE mirrors it)");

// Compile-time shapes of one (cache element, head size) instantiation.
template <typename CT, int HEAD>
struct Shape {
  static constexpr int kX = 16 / (int)sizeof(CT);          // elements per 16-byte K chunk (vLLM's x)
  static constexpr int kChunks = HEAD / kX;                 // K chunks per token
  static constexpr int kVBytes = 8 * (int)sizeof(CT);       // one V chunk: 8 tokens of one channel d
  static constexpr int kKStageBytes = kStageTokens * HEAD * (int)sizeof(CT);
  static constexpr int kStageBytes = 2 * kKStageBytes;      // K then V
  // 4 stages keep >= 48 KB in flight per CTA for D <= 128 (bf16); 3 stages for D = 256 keep two CTAs per SM.
  static constexpr int kStages = kStageBytes <= 16384 ? 4 : 3;
  static constexpr int kPairs = 4 * HEAD;                   // (channel d, 8-token group g) pairs of a stage's V
  static constexpr int kPairsPerThread = (kPairs + kThreads - 1) / kThreads;
  static_assert(HEAD % kX == 0, "head size must be a multiple of x");
};

// Shared-memory carve-up (bytes) before the block list; the host computes the same total (_decode_cuda.smem_bytes).
template <typename CT, int HEAD, int GMAX>
struct Smem {
  using S = Shape<CT, HEAD>;
  static constexpr int kStagesOff = 0;
  static constexpr int kQOff = S::kStages * S::kStageBytes;                    // float q[GMAX][HEAD]
  static constexpr int kRedOff = kQOff + GMAX * HEAD * 4;                      // float red[kWarps][GMAX][32]
  static constexpr int kPOff = kRedOff + kWarps * GMAX * 32 * 4;               // float p[GMAX][32]
  static constexpr int kAlphaOff = kPOff + GMAX * 32 * 4;                      // float alpha[GMAX]
  static constexpr int kMlOff = kAlphaOff + GMAX * 4;                          // float2 ml[GMAX]
  static constexpr int kCountOff = kMlOff + GMAX * 8;                          // int count[kWarps]
  static constexpr int kListOff = kCountOff + kWarps * 4;                      // int2 list[chunk_blocks]
  static constexpr int kFixedBytes = kListOff;
  // The epilogue reduces the per-group accumulators through the (drained) stage buffers.
  static_assert(4 * GMAX * HEAD * 4 <= S::kStages * S::kStageBytes, "epilogue scratch must fit the stages");
};

// ---------------------------------------------------------------------------------------------------------------
// Asynchronous global -> shared copies (sm_80+): the stage pipeline keeps several cache blocks in flight per CTA.

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src));
}

__device__ __forceinline__ void cp_async_8(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(gmem_src));
}

template <int BYTES>
__device__ __forceinline__ void cp_async(void* smem_dst, const void* gmem_src) {
  if constexpr (BYTES == 16) {
    cp_async_16(smem_dst, gmem_src);
  } else {
    cp_async_8(smem_dst, gmem_src);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Cache element -> fp32. fp8 E4M3 (uint8) bits are moved under fp16's exponent/mantissa, which is exact and yields
// value * 2^-8 (the bias differs by 8); kFp8Unbias undoes that together with k_scale / v_scale, once per score or
// output instead of once per element.

template <typename CT>
struct Convert;

template <>
struct Convert<__nv_bfloat16> {
  static constexpr float kFp8Unbias = 1.0f;
  // 8 bf16 (one 16-byte chunk) -> 8 floats: a bf16 is the top half of an fp32.
  __device__ __forceinline__ static void chunk16(const uint4& r, float* f) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      f[2 * k] = __uint_as_float(w[k] << 16);
      f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  }
  __device__ __forceinline__ static void tokens8(const void* p, float* f) { chunk16(*static_cast<const uint4*>(p), f); }
};

template <>
struct Convert<__half> {
  static constexpr float kFp8Unbias = 1.0f;
  __device__ __forceinline__ static void chunk16(const uint4& r, float* f) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&w[k]));
      f[2 * k] = v.x;
      f[2 * k + 1] = v.y;
    }
  }
  __device__ __forceinline__ static void tokens8(const void* p, float* f) { chunk16(*static_cast<const uint4*>(p), f); }
};

template <>
struct Convert<unsigned char> {
  static constexpr float kFp8Unbias = 256.0f;
  // 4 E4M3 bytes -> 4 floats (times 2^-8).
  __device__ __forceinline__ static void word(unsigned w, float* f) {
    unsigned lo = __byte_perm(w, 0u, 0x1404);  // (b1 << 24) | (b0 << 8)
    unsigned hi = __byte_perm(w, 0u, 0x3424);  // (b3 << 24) | (b2 << 8)
    lo = (lo & 0x80008000u) | ((lo & 0x7f007f00u) >> 1);
    hi = (hi & 0x80008000u) | ((hi & 0x7f007f00u) >> 1);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&lo));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&hi));
    f[0] = a.x;
    f[1] = a.y;
    f[2] = b.x;
    f[3] = b.y;
  }
  __device__ __forceinline__ static void chunk16(const uint4& r, float* f) {
    word(r.x, f);
    word(r.y, f + 4);
    word(r.z, f + 8);
    word(r.w, f + 12);
  }
  __device__ __forceinline__ static void tokens8(const void* p, float* f) {
    const uint2 r = *static_cast<const uint2*>(p);
    word(r.x, f);
    word(r.y, f + 4);
  }
};


// ---------------------------------------------------------------------------------------------------------------
// Split combine, fused into the attention kernels (no second launch, whose host time every eager call paid, and no
// gap between two kernels). Every split CTA of a (sequence, kv head) stores its normalised partial rows and (max, sum);
// the last of the num_splits CTAs to take a ticket on `counter` (after a device-scope fence) merges them,
// out = sum_p w_p o_p / sum_p w_p with w_p = l_p * 2^(m_p - max m), and resets the ticket for the next launch (CUDA
// graph replays). The merge reads the splits in order, so the result does not depend on which CTA finishes last.
// All threads of the CTA call it; `row0` = seq * Hq + first query head of the group. Scratch comes from the caller's
// dynamic shared memory (free by now), not from static __shared__ variables, which would move the dynamic carve-up
// (the bulk kernel's copy stages) off its 128-byte alignment: a build with 80 static bytes (stages at 80 mod 128) ran
// paged_decode_bulk 25% slower on an H200, with SDPA and the fp8 kernel at their usual speed in that run, than the
// build without in the next run (the offset alone was not isolated).

template <typename T, int HEAD>
__device__ void combine_splits_if_last(T* __restrict__ out, const float* __restrict__ part_o,
                                       const float2* __restrict__ part_ml, int* __restrict__ counter, size_t row0,
                                       int group, int num_splits,
                                       int* last_s) {  // shared: 1 int
  __threadfence();  // this thread's partial stores are visible device-wide before the ticket
  __syncthreads();  // also: every thread is done with the scratch's earlier contents
  if (threadIdx.x == 0) *last_s = atomicAdd(counter, 1) == num_splits - 1;
  __syncthreads();
  if (!*last_s) return;
  __threadfence();  // the other splits' stores were fenced before their tickets: read them after ours
  if (threadIdx.x == 0) *counter = 0;
  // One pass per output column with a running max (a max pass first, then a sum pass, then the outputs cost three
  // dependent L2 round trips and two barriers at the very end of the launch, when nothing else hides them).
  // __ldcg: the partials were written by other SMs during this launch; read them from L2, never from a stale L1 line.
  constexpr int kVecs = HEAD / 4;  // float4 columns of one row
  for (int item = threadIdx.x; item < group * kVecs; item += blockDim.x) {
    const int i = item / kVecs, c = item % kVecs;
    const float2* ml = part_ml + (row0 + i) * num_splits;
    const float4* o = reinterpret_cast<const float4*>(part_o + (row0 + i) * num_splits * HEAD) + c;
    float m = neg_inf(), l = 0.0f;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
    for (int q = 0; q < num_splits; ++q) {
      // Loaded unconditionally so that the unrolled loads issue together; an empty split's row (never written) is
      // not used.
      const float2 v = __ldcg(ml + q);
      const float4 x = __ldcg(o + (size_t)q * kVecs);
      if (v.y > 0.0f) {  // an empty split has weight 0; a non-empty one a finite max
        const float m_new = fmaxf(m, v.x);
        const float a = exp2f(m - m_new), w = v.y * exp2f(v.x - m_new);
        l = fmaf(l, a, w);
        acc.x = fmaf(acc.x, a, w * x.x);
        acc.y = fmaf(acc.y, a, w * x.y);
        acc.z = fmaf(acc.z, a, w * x.z);
        acc.w = fmaf(acc.w, a, w * x.w);
        m = m_new;
      }
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    T* dst = out + (row0 + i) * HEAD + 4 * c;
    dst[0] = from_float<T>(acc.x * inv);
    dst[1] = from_float<T>(acc.y * inv);
    dst[2] = from_float<T>(acc.z * inv);
    dst[3] = from_float<T>(acc.w * inv);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The stripe offset of query head h0 + i of kv head `kvh`'s group (is_block_active's `offset`): per query head for
// sliding_step >= 0, per kv head for a negative step.

__device__ __forceinline__ int stripe_offset(int i, int kvh, const DecodeParams& p) {
  return p.sliding_step >= 0 ? (p.tp_rank * p.num_kv_heads * p.group + kvh * p.group + i) * p.sliding_step + 1
                             : (p.tp_rank * p.num_kv_heads + kvh) * (-p.sliding_step) + 1;
}

// Split `split` of one sequence (`len` > 0 tokens in `nblk` cache blocks) for kv head `kvh`: the logical cache blocks
// [x, y) it covers. The sequence uses min(num_splits, ceil(nblk / chunk_blocks)) splits (a short one leaves the
// highest empty). Without BALANCE they are equal ranges of chunk_blocks blocks, the last one shorter. With BALANCE
// each gets an equal share, to within one block, of the cache blocks the group needs: the dense local window (sparse
// blocks q_sb - local_blocks + 1 .. q_sb, all needed) and, before it, the blocks of the sparse blocks on some head's
// stripe (equal ranges give the split holding the window 12% more blocks to read than the others for Phi-3-small at
// 16 x 32k: 288 against 256 per kv head). A boundary before the window then falls inside or just before a needed
// sparse block, so a split needs exactly its share, at most ceil(nblk / used) <= chunk_blocks <= kMaxSplitBlocks
// blocks: its block list fits however many blocks it spans. Stripes repeat every vert_stride sparse blocks; the
// group's pattern over one period is a warp ballot of is_block_active (with no local window, so only the stripe term
// decides), which is why vert_stride > 32 and dense attention fall back to equal shares of all blocks. Every thread
// of each warp calls it.
//
// Measured on an H200 (Phi-3-small, graph replays against equal ranges in the same process): balanced, the CUDA-core
// fp8 kernel, whose CTAs take time in proportion to their blocks, took 11% less time at 16 x 32k (4 splits, 512
// blocks each) and 10% less at 1 x 128k (33 splits of 249); with forced splits of 64-128 blocks it was within 2.5%
// either way, with 2-32 blocks 3-32% slower (the heuristic's splits hold >= 1024 tokens). The tensor-core kernels,
// bandwidth-bound, gained 0.5% at 16 x 32k, lost 2% at 1 x 128k and 2-53% with forced splits of 2-128 blocks on
// 64 x 8k and 256 x 2k, so they keep equal ranges.

template <int GMAX, bool BALANCE>
__device__ int2 split_range(int split, int num_splits, int len, int nblk, int kvh, const DecodeParams& p) {
  if (!BALANCE) {  // empty (x >= y) past the sequence's end
    const int x = split * p.chunk_blocks;
    return make_int2(x, min(x + p.chunk_blocks, nblk));
  }
  const int used = min(num_splits, (nblk + p.chunk_blocks - 1) / p.chunk_blocks);
  if (split >= used) return make_int2(0, 0);
  if (used == 1) return make_int2(0, nblk);
  // Cost = needed cache blocks. Before the window (sparse blocks [0, win0), cache blocks [0, local0)): sparse block k
  // is needed when bit k % vs of `pattern` is set (m bits); then every block. Dense or vert_stride > 32: local0 = 0,
  // every block costs 1.
  int vs = 1, cbps = 1, win0 = 0, m = 1;
  unsigned pattern = 1u;
  if (p.vert_stride > 1 && p.vert_stride <= 32) {
    vs = p.vert_stride;
    cbps = p.sparse_block >> p.log2_bs;
    win0 = max(0, (len - 1) / p.sparse_block - p.local_blocks + 1);
    const int r = threadIdx.x & 31;
    bool on = false;
#pragma unroll
    for (int i = 0; i < GMAX; ++i)
      on |= i < p.group && r < vs && is_block_active(r, r, stripe_offset(i, kvh, p), 0, vs);
    pattern = __ballot_sync(0xffffffffu, on);
    m = __popc(pattern);
  }
  const int local0 = win0 * cbps;
  const long long before = (long long)cbps * ((win0 / vs) * m + __popc(pattern & ((1u << (win0 % vs)) - 1u)));
  const long long total = before + (nblk - local0);
  // First block of split s: where the needed blocks before it number exactly total * s / used.
  auto boundary = [&](int s) -> int {
    const long long t = total * s / used;
    if (t >= before) return local0 + (int)(t - before);
    const int c = (int)(t / cbps), part = (int)(t % cbps);  // c whole needed sparse blocks, then part of the next
    unsigned rest = pattern;
    for (int k = c % m; k > 0; --k) rest &= rest - 1u;  // the next one is the (c % m)-th stripe of its period
    return ((c / m) * vs + __ffs(rest) - 1) * cbps + part;
  };
  return make_int2(split == 0 ? 0 : boundary(split), boundary(split + 1));
}

// ---------------------------------------------------------------------------------------------------------------
// Block list: the logical cache blocks [j0, j1) of one sequence that at least one query head of kv head `kvh`'s group
// needs, compacted in order into list[] (chunk_blocks entries) as (physical block id, head mask | valid tokens << 8).
// The sparse rule is evaluated per cache block at sparse-block granularity (k_sb = j * BS / sparse_block, q_sb =
// (len - 1) / sparse_block); ids outside [0, num_blocks) are dropped. All NT threads of the CTA call it (count[]
// holds NT / 32 ints); returns the count.
//
// A round covers NT * per table entries, `per` consecutive ones per thread (as few as cover [j0, j1), at most kPer),
// all loaded before any is used: a split of up to kMaxSplitBlocks blocks costs one memory latency, not one per NT
// entries (7 of them for 1024 blocks and 160 threads, paid before the CTA's first bulk copy; in a one-wave launch
// every CTA pays them at once, with HBM idle). `per` is not fixed at kPer: the rule costs GMAX modulo operations per
// entry, and with 7 entries per thread on a 128-block split (256 x 2k) the build ran the bulk kernel 6% slower on an
// H200. Each thread appends its entries after the CTA-wide prefix of the counts before it (warp scan + count[]).
// The fp8 kernel passes MAX_PER = 1 (one entry per thread per round, as before): with kPer entries ptxas gave it 10-32
// more registers (sm_90), one resident CTA per SM fewer at group width 4 for D 64-96 and 256, and that kernel is
// instruction-bound, not latency-bound.

template <int GMAX, int NT = kThreads, int MAX_PER = (kMaxSplitBlocks + NT - 1) / NT>
__device__ int build_block_list(int2* list, int* count, const int* __restrict__ table_row, int j0, int j1, int len,
                                int kvh, const DecodeParams& p) {
  constexpr int kPer = MAX_PER;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int group = p.group, log2_bs = p.log2_bs, sparse_block = p.sparse_block;
  const int q_sb = (len - 1) / sparse_block;
  int offset[GMAX];
#pragma unroll
  for (int i = 0; i < GMAX; ++i) offset[i] = stripe_offset(i, kvh, p);
  const unsigned all_heads = (1u << group) - 1u;
  const int per = min(kPer, (j1 - j0 + NT - 1) / NT);
  int n_act = 0;
  for (int base = j0; base < j1; base += NT * per) {
    const int jt = base + tid * per;  // this thread's first entry
    int phys[kPer];
#pragma unroll
    for (int k = 0; k < kPer; ++k) phys[k] = k < per && jt + k < j1 ? table_row[jt + k] : -1;
    unsigned mask[kPer];
    int mine = 0;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      mask[k] = 0;
      if (phys[k] >= 0 && phys[k] < p.num_blocks) {  // also false for no entry (-1)
        if (p.vert_stride <= 1) {
          mask[k] = all_heads;
        } else {
          const int k_sb = ((jt + k) << log2_bs) / sparse_block;
#pragma unroll
          for (int i = 0; i < GMAX; ++i) {
            if (i < group && is_block_active(q_sb, k_sb, offset[i], p.local_blocks, p.vert_stride))
              mask[k] |= 1u << i;
          }
        }
      }
      mine += mask[k] != 0;
    }
    int incl = mine;  // inclusive scan of the counts over the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      incl += lane >= o ? v : 0;
    }
    if (lane == 31) count[warp] = incl;
    __syncthreads();
    int slot = n_act + incl - mine, total = 0;
#pragma unroll
    for (int w = 0; w < NT / 32; ++w) {
      slot += w < warp ? count[w] : 0;
      total += count[w];
    }
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      if (mask[k] != 0) {
        if (slot < p.chunk_blocks) {  // the list's capacity; a valid launch never fills it (split_range)
          const int ntok = min(1 << log2_bs, len - ((jt + k) << log2_bs));
          list[slot] = make_int2(phys[k], (int)mask[k] | (ntok << 8));
        }
        ++slot;
      }
    }
    n_act += total;
    __syncthreads();  // count[] is rewritten by the next round; list[] complete after the last
  }
  return min(n_act, p.chunk_blocks);
}

// ---------------------------------------------------------------------------------------------------------------
// The start of the two tensor-core kernels (paged_decode_mma, paged_decode_bulk). One CTA of the (num_splits, Hkv, S)
// grid works on split `split` of kv head blockIdx.y of sequence blockIdx.z. (paged_decode, the fp8 kernel, writes
// the same steps out: through this helper it ran 0.3-2% slower on the H200.)

struct SplitCta {
  int num_splits, split, kvh, seq, num_heads, h0;  // h0: the group's first query head
  int len, nblk, j0, j1;                           // clamped length, its cache blocks, this split's [j0, j1)
};

// Traps unless the launch gave at least FIXED_BYTES of dynamic shared memory plus a chunk_blocks-entry block list
// (the host computes the carve-up size separately: a mismatch must fail loudly, not corrupt), clamps the sequence
// length so that no input can make the kernel read outside the cache or the block table, and picks the split's
// logical cache blocks. A CTA whose split
// holds none writes what it owes (zeros with one split; else an empty partial, then the combine if it is the last
// split to finish) and gets false.
template <typename T, int HEAD, int GMAX, bool BALANCE, int THREADS, int FIXED_BYTES>
__device__ __forceinline__ bool begin_split(SplitCta& c, int split, T* __restrict__ out, float* __restrict__ part_o,
                                            float2* __restrict__ part_ml, int* __restrict__ counters,
                                            const int* __restrict__ seq_lens, const DecodeParams& p, int* count_s) {
  const int tid = threadIdx.x;
  {
    unsigned dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < (unsigned)FIXED_BYTES + 8u * (unsigned)p.chunk_blocks) __trap();
  }
  c.num_splits = gridDim.x;
  c.split = split;
  c.kvh = blockIdx.y;
  c.seq = blockIdx.z;
  c.num_heads = p.num_kv_heads * p.group;
  c.h0 = c.kvh * p.group;
  int len = min(seq_lens[c.seq], p.max_seq_len);
  len = min(len, p.max_blocks << p.log2_bs);
  c.len = len;
  c.nblk = len > 0 ? ((len - 1) >> p.log2_bs) + 1 : 0;
  const int2 range = split_range<GMAX, BALANCE>(split, c.num_splits, len, c.nblk, c.kvh, p);
  c.j0 = range.x;
  c.j1 = range.y;
  if (c.j0 < c.j1) return true;
  const size_t row0 = (size_t)c.seq * c.num_heads + c.h0;
  if (c.num_splits == 1) {
    for (int q = tid; q < p.group * HEAD; q += THREADS) out[row0 * HEAD + q] = from_float<T>(0.0f);
    return false;
  }
  if (tid < p.group) part_ml[(row0 + tid) * c.num_splits + split] = make_float2(neg_inf(), 0.0f);
  combine_splits_if_last<T, HEAD>(out, part_o, part_ml, counters + (size_t)c.seq * p.num_kv_heads + c.kvh, row0,
                                  p.group, c.num_splits, count_s);
  return false;
}

// ---------------------------------------------------------------------------------------------------------------
// Main kernel. T: query/output element; CT: cache element (T, or unsigned char for fp8 E4M3); GMAX: 4 or 8, the
// padded group width (group = Hq/Hkv <= GMAX; padded heads are computed but masked).
//
// Per CTA: (1) scan the split's logical cache blocks, apply the sparse rule per head at sparse-block granularity and
// compact the blocks that any head of the group needs into a shared list (physical id, head mask, valid tokens);
// (2) stream that list through a cp.async pipeline, 32 tokens per stage: QK on CUDA cores (warp = a quarter of the
// channels, lane = token), online softmax in fp32 (warp = head), PV (thread = (channel, 8-token group) pairs);
// (3) reduce, normalise, write `out` (one split) or the split's partial output and (max, sum) statistics.

// __launch_bounds__ min 2 CTAs: without it ptxas capped some instantiations at 128 registers and spilled; shared
// memory limits residency to 2-3 CTAs per SM anyway.
template <typename T, typename CT, int HEAD, int GMAX>
__global__ void __launch_bounds__(kThreads, 2) paged_decode(
    T* __restrict__ out,                     // [S, Hq, HEAD], contiguous; written when gridDim.x == 1
    float* __restrict__ part_o,              // [S, Hq, num_splits, HEAD]: normalised split outputs
    float2* __restrict__ part_ml,            // [S, Hq, num_splits]: (max score in log2 units, sum of exp2)
    int* __restrict__ counters,              // [S * Hkv] split tickets, zero between launches
    const T* __restrict__ query,             // [S, Hq, HEAD], strides (q_stride_s, q_stride_h, 1)
    const CT* __restrict__ key_cache,        // [num_blocks, Hkv, HEAD/x, BS, x]
    const CT* __restrict__ value_cache,      // [num_blocks, Hkv, HEAD, BS]
    const int* __restrict__ block_tables,    // [S, max_blocks], row stride bt_stride
    const int* __restrict__ seq_lens,        // [S]
    const DecodeParams p) {
  using S = Shape<CT, HEAD>;
  using M = Smem<CT, HEAD, GMAX>;
  using Cv = Convert<CT>;
  extern __shared__ __align__(128) unsigned char smem[];
  float* q_s = reinterpret_cast<float*>(smem + M::kQOff);
  float* red_s = reinterpret_cast<float*>(smem + M::kRedOff);
  float* p_s = reinterpret_cast<float*>(smem + M::kPOff);
  float* alpha_s = reinterpret_cast<float*>(smem + M::kAlphaOff);
  float2* ml_s = reinterpret_cast<float2*>(smem + M::kMlOff);
  int2* list_s = reinterpret_cast<int2*>(smem + M::kListOff);
  int* count_s = reinterpret_cast<int*>(smem + M::kCountOff);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  {
    unsigned dyn;  // the host computes the carve-up size separately: a mismatch must fail loudly, not corrupt
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < (unsigned)M::kFixedBytes + 8u * (unsigned)p.chunk_blocks) __trap();
  }
  const int num_splits = gridDim.x;
  const int split = blockIdx.x, kvh = blockIdx.y, seq = blockIdx.z;
  const int bs = 1 << p.log2_bs;
  const int num_heads = p.num_kv_heads * p.group;
  const int h0 = kvh * p.group;

  // Clamp so that no input can make the kernel read outside the cache or the block table.
  int len = min(seq_lens[seq], p.max_seq_len);
  len = min(len, p.max_blocks << p.log2_bs);
  const int nblk = len > 0 ? ((len - 1) >> p.log2_bs) + 1 : 0;
  const int2 range = split_range<GMAX, true>(split, num_splits, len, nblk, kvh, p);
  const int j0 = range.x, j1 = range.y;

  if (j0 >= j1) {  // nothing of this sequence in this split
    if (num_splits == 1) {
      for (int q = tid; q < p.group * HEAD; q += kThreads)
        out[((size_t)seq * num_heads + h0) * HEAD + q] = from_float<T>(0.0f);
      return;
    }
    if (tid < p.group)
      part_ml[((size_t)seq * num_heads + h0 + tid) * num_splits + split] = make_float2(neg_inf(), 0.0f);
    combine_splits_if_last<T, HEAD>(out, part_o, part_ml, counters + (size_t)seq * p.num_kv_heads + kvh,
                                    (size_t)seq * num_heads + h0, p.group, num_splits, count_s);
    return;
  }


  // ---- (1) compact the blocks the group needs ------------------------------------------------------------------
  const int n_act =
      build_block_list<GMAX, kThreads, 1>(list_s, count_s, block_tables + (size_t)seq * p.bt_stride, j0, j1, len, kvh,
                                          p);

  for (int q = tid; q < GMAX * HEAD; q += kThreads) {
    const int i = q / HEAD, d = q % HEAD;
    q_s[q] = i < p.group ? to_float<T>(query[(size_t)seq * p.q_stride_s + (size_t)(h0 + i) * p.q_stride_h + d]) : 0.0f;
  }
  __syncthreads();  // list_s and q_s complete

  // ---- (2) stream the active blocks -----------------------------------------------------------------------------
  const int blocks_per_stage = kStageTokens >> p.log2_bs;
  const int n_stages = (n_act + blocks_per_stage - 1) / blocks_per_stage;
  const size_t block_elems = (size_t)HEAD << p.log2_bs;  // one (block, kv head) slice of K or of V

  // Stage layout: K as [chunk c][stage token t] 16-byte chunks (lane = token reads consecutive chunks); V as
  // [8-token group g][channel d] chunks of 8 tokens (threads = consecutive d read consecutive chunks).
  auto load_stage = [&](int stage, int buf) {
    unsigned char* kbuf = smem + M::kStagesOff + buf * S::kStageBytes;
    unsigned char* vbuf = kbuf + S::kKStageBytes;
    const int first = stage * blocks_per_stage;
    // K: per block, HEAD/x chunks x BS tokens, contiguous in global memory; index = (block, c, token).
    for (int q = tid; q < kStageTokens * S::kChunks; q += kThreads) {
      const int tt = q & (bs - 1);
      const int rest = q >> p.log2_bs;
      const int c = rest % S::kChunks, e = rest / S::kChunks;
      if (first + e < n_act) {
        const size_t blk = (size_t)list_s[first + e].x * p.num_kv_heads + kvh;
        cp_async_16(kbuf + (c * kStageTokens + (e << p.log2_bs) + tt) * 16,
                    key_cache + blk * block_elems + (size_t)(c * bs + tt) * S::kX);
      }
    }
    // V: per block, HEAD rows of BS tokens; index = (block, d, 8-token group within the block).
    const int log2_gpb = p.log2_bs - 3;  // 8-token groups per block: 1, 2 or 4
    for (int q = tid; q < S::kPairs; q += kThreads) {
      const int gg = q & ((1 << log2_gpb) - 1);
      const int rest = q >> log2_gpb;
      const int d = rest % HEAD, e = rest / HEAD;
      if (first + e < n_act) {
        const size_t blk = (size_t)list_s[first + e].x * p.num_kv_heads + kvh;
        const int g = (e << log2_gpb) + gg;
        cp_async<S::kVBytes>(vbuf + (g * HEAD + d) * S::kVBytes,
                             value_cache + blk * block_elems + (size_t)d * bs + gg * 8);
      }
    }
  };

#pragma unroll
  for (int st = 0; st < S::kStages - 1; ++st) {
    if (st < n_stages) load_stage(st, st);
    cp_async_commit();
  }

  constexpr int kHeadsPerWarp = (GMAX + kWarps - 1) / kWarps;  // softmax: warp w owns heads w, w + 4
  float m_run[kHeadsPerWarp], l_lane[kHeadsPerWarp];
#pragma unroll
  for (int ii = 0; ii < kHeadsPerWarp; ++ii) {
    m_run[ii] = neg_inf();
    l_lane[ii] = 0.0f;
  }
  float acc[S::kPairsPerThread][GMAX];
#pragma unroll
  for (int k = 0; k < S::kPairsPerThread; ++k)
#pragma unroll
    for (int i = 0; i < GMAX; ++i) acc[k][i] = 0.0f;

  const float score_mul = p.qk_scale_log2 * Cv::kFp8Unbias;
  for (int st = 0; st < n_stages; ++st) {
    cp_async_wait<S::kStages - 2>();
    __syncthreads();  // stage st landed for every thread; buffer (st - 1) % kStages is free again
    {
      const int next = st + S::kStages - 1;
      if (next < n_stages) load_stage(next, next % S::kStages);
      cp_async_commit();
    }
    const unsigned char* kbuf = smem + M::kStagesOff + (st % S::kStages) * S::kStageBytes;
    const unsigned char* vbuf = kbuf + S::kKStageBytes;
    const int first = st * blocks_per_stage;

    // QK: lane = token of the stage, warp = every 4th chunk of channels; partial dots summed through red_s.
    {
      float sc[GMAX];
#pragma unroll
      for (int i = 0; i < GMAX; ++i) sc[i] = 0.0f;
#pragma unroll
      for (int c0 = 0; c0 < S::kChunks; c0 += kWarps) {
        const int c = c0 + warp;
        if (c < S::kChunks) {
          float kf[S::kX];
          Cv::chunk16(*reinterpret_cast<const uint4*>(kbuf + (c * kStageTokens + lane) * 16), kf);
#pragma unroll
          for (int i = 0; i < GMAX; ++i) {
            const float4* qv = reinterpret_cast<const float4*>(q_s + i * HEAD + c * S::kX);
#pragma unroll
            for (int v = 0; v < S::kX / 4; ++v) {
              const float4 qq = qv[v];
              sc[i] = fmaf(qq.x, kf[4 * v], sc[i]);
              sc[i] = fmaf(qq.y, kf[4 * v + 1], sc[i]);
              sc[i] = fmaf(qq.z, kf[4 * v + 2], sc[i]);
              sc[i] = fmaf(qq.w, kf[4 * v + 3], sc[i]);
            }
          }
        }
      }
#pragma unroll
      for (int i = 0; i < GMAX; ++i) red_s[(warp * GMAX + i) * 32 + lane] = sc[i];
    }
    __syncthreads();

    // Online softmax in base 2: warp w updates heads w and w + 4; lane = token.
    {
      const int e = lane >> p.log2_bs, tt = lane & (bs - 1);
      const int meta = first + e < n_act ? list_s[first + e].y : 0;  // absent block: no head, no token
      const bool tok_ok = tt < (meta >> 8);
#pragma unroll
      for (int ii = 0; ii < kHeadsPerWarp; ++ii) {
        const int i = warp + ii * kWarps;
        if (i < GMAX) {
          float x = 0.0f;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) x += red_s[(w * GMAX + i) * 32 + lane];
          // select, not multiply: a masked token's score may be computed from garbage (even NaN)
          x = tok_ok && ((meta >> i) & 1) ? x * score_mul : neg_inf();
          const float m_new = fmaxf(m_run[ii], warp_max(x));
          const float m_use = m_new == neg_inf() ? 0.0f : m_new;  // all masked so far: p = 0, alpha irrelevant
          const float p = exp2f(x - m_use);
          const float alpha = exp2f(m_run[ii] - m_use);
          l_lane[ii] = l_lane[ii] * alpha + p;
          m_run[ii] = m_new;
          p_s[i * 32 + lane] = p;
          if (lane == 0) alpha_s[i] = alpha;
        }
      }
    }
    __syncthreads();

    // PV: thread = pairs (channel d, 8-token group g), fixed across stages, so acc stays in registers.
    {
      float alpha[GMAX];
#pragma unroll
      for (int i = 0; i < GMAX; ++i) alpha[i] = alpha_s[i];
#pragma unroll
      for (int k = 0; k < S::kPairsPerThread; ++k) {
        const int pair = tid + k * kThreads;
        if (pair < S::kPairs) {
          const int d = pair % HEAD, g = pair / HEAD;
#pragma unroll
          for (int i = 0; i < GMAX; ++i) acc[k][i] *= alpha[i];
          const int e = (g * 8) >> p.log2_bs;
          if (first + e < n_act) {  // an absent block's buffer holds stale or uninitialised data: skip it
            float vf[8];
            Cv::tokens8(vbuf + (g * HEAD + d) * S::kVBytes, vf);
            const int valid = (list_s[first + e].y >> 8) - ((g * 8) & (bs - 1));
            if (valid < 8) {  // tokens past the sequence end: p is 0 but the cache may hold NaN there
#pragma unroll
              for (int t = 0; t < 8; ++t) vf[t] = t < valid ? vf[t] : 0.0f;
            }
#pragma unroll
            for (int i = 0; i < GMAX; ++i) {
              const float4 p0 = *reinterpret_cast<const float4*>(p_s + i * 32 + g * 8);
              const float4 p1 = *reinterpret_cast<const float4*>(p_s + i * 32 + g * 8 + 4);
              float a = acc[k][i];
              a = fmaf(p0.x, vf[0], a);
              a = fmaf(p0.y, vf[1], a);
              a = fmaf(p0.z, vf[2], a);
              a = fmaf(p0.w, vf[3], a);
              a = fmaf(p1.x, vf[4], a);
              a = fmaf(p1.y, vf[5], a);
              a = fmaf(p1.z, vf[6], a);
              a = fmaf(p1.w, vf[7], a);
              acc[k][i] = a;
            }
          }
        }
      }
    }
  }

  // ---- (3) epilogue ---------------------------------------------------------------------------------------------
  cp_async_wait<0>();
  __syncthreads();  // every stage consumed: the stage buffers become scratch
#pragma unroll
  for (int ii = 0; ii < kHeadsPerWarp; ++ii) {
    const int i = warp + ii * kWarps;
    if (i < GMAX) {
      const float l = warp_sum(l_lane[ii]);
      if (lane == 0) ml_s[i] = make_float2(m_run[ii], l);
    }
  }
  float* o_s = reinterpret_cast<float*>(smem + M::kStagesOff);  // [4 groups][GMAX][HEAD]
#pragma unroll
  for (int k = 0; k < S::kPairsPerThread; ++k) {
    const int pair = tid + k * kThreads;
    if (pair < S::kPairs) {
      const int d = pair % HEAD, g = pair / HEAD;
#pragma unroll
      for (int i = 0; i < GMAX; ++i) o_s[(g * GMAX + i) * HEAD + d] = acc[k][i];
    }
  }
  __syncthreads();
  const float v_mul = p.v_scale * Cv::kFp8Unbias;
  for (int q = tid; q < p.group * HEAD; q += kThreads) {
    const int i = q / HEAD, d = q % HEAD;
    float o = 0.0f;
#pragma unroll
    for (int g = 0; g < 4; ++g) o += o_s[(g * GMAX + i) * HEAD + d];
    const float l = ml_s[i].y;
    o = l > 0.0f ? o * (v_mul / l) : 0.0f;
    if (num_splits == 1) {
      out[((size_t)seq * num_heads + h0 + i) * HEAD + d] = from_float<T>(o);
    } else {
      part_o[(((size_t)seq * num_heads + h0 + i) * num_splits + split) * HEAD + d] = o;
    }
  }
  if (num_splits > 1) {
    if (tid < p.group) part_ml[((size_t)seq * num_heads + h0 + tid) * num_splits + split] = ml_s[tid];
    combine_splits_if_last<T, HEAD>(out, part_o, part_ml, counters + (size_t)seq * p.num_kv_heads + kvh,
                                    (size_t)seq * num_heads + h0, p.group, num_splits, count_s);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core kernel for 16-bit caches (cache element == T): same grid, block list, split and partial-output contract
// as paged_decode. mma.sync m16n8k16 with the group's query heads as rows 0..7 (rows 8..15 are zero): S = Q K^T takes
// K's B fragments straight from vLLM's [D/x][BS][x] chunks through ldmatrix, and P V takes V's from [D][BS]. A stage
// is 64 tokens; warp w owns tokens 16w..16w+15 of every stage with its own online-softmax state and accumulator, so
// a stage needs no synchronisation beyond the pipeline's; the 4 warps merge in the epilogue. Measured on an H200
// (Phi-3-small, 64 x 8k): the CUDA-core kernel above reached 2.1 TB/s, instruction-bound; this one does ~5x fewer
// instructions per byte.

namespace tc {

constexpr int kStageTokens = 64;  // 16 per warp: one m16n8k16 k-step of P V

template <int HEAD>
struct Shape {
  static constexpr int kKStageBytes = kStageTokens * HEAD * 2;
  static constexpr int kStageBytes = 2 * kKStageBytes;
  static constexpr int kStages = HEAD <= 128 ? 3 : 2;  // 96 KB (two CTAs per SM) / 128 KB for D = 256
  static constexpr int kCountOff = kStages * kStageBytes;                // int count[kWarps]
  static constexpr int kMlOff = kCountOff + kWarps * 4;                  // float2 ml[kWarps][8]
  static constexpr int kListOff = kMlOff + kWarps * 8 * 8;               // int2 list[chunk_blocks]
  static constexpr int kFixedBytes = kListOff;
  static_assert(HEAD % 16 == 0, "head size must be a multiple of 16");
  static_assert(kWarps * 8 * HEAD * 4 <= kStages * kStageBytes, "epilogue scratch must fit the stages");
};

// c[0..1] += A B for rows 0..7 of a m16n8k16 tile whose rows 8..15 are zero: A = {a0, 0, a2, 0}; the zero rows'
// outputs are discarded so they cost no accumulator registers.
template <typename T>
__device__ __forceinline__ void mma_rows8(float (&c)[2], unsigned a0, unsigned a2, unsigned b0, unsigned b1);

template <>
__device__ __forceinline__ void mma_rows8<__nv_bfloat16>(float (&c)[2], unsigned a0, unsigned a2, unsigned b0,
                                                        unsigned b1) {
  float junk0, junk1;
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(c[0]), "=f"(c[1]), "=f"(junk0), "=f"(junk1)
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(0.0f), "f"(0.0f));
  (void)junk0;
  (void)junk1;
}

template <>
__device__ __forceinline__ void mma_rows8<__half>(float (&c)[2], unsigned a0, unsigned a2, unsigned b0, unsigned b1) {
  float junk0, junk1;
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(c[0]), "=f"(c[1]), "=f"(junk0), "=f"(junk1)
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(0.0f), "f"(0.0f));
  (void)junk0;
  (void)junk1;
}

// Which of this lane's 4 score slots (tokens 16w + 2t, +1, 16w + 8 + 2t, +1 of a 64-token stage whose cache blocks
// are list[first ..]) hold a token that query head g = lane / 4 attends to: bit k for slot k.
__device__ __forceinline__ unsigned valid_bits(const int2* list, int first, int n_act, int warp, int lane,
                                               int log2_bs) {
  const int g = lane >> 2, t = lane & 3;
  unsigned bits = 0;
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    const int tok = 16 * warp + 8 * n + 2 * t;
    const int e = tok >> log2_bs, tt = tok & ((1 << log2_bs) - 1);
    const int meta = first + e < n_act ? list[first + e].y : 0;  // absent block: no head, no token
    const int ntok = meta >> 8;
    if ((meta >> g) & 1) bits |= ((tt < ntok ? 1u : 0u) | (tt + 1 < ntok ? 2u : 0u)) << (2 * n);
  }
  return bits;
}

// One warp's share of a stage: 16 tokens against the group's query heads (rows g of the A fragments qa0 / qa2).
// k_lane / v_lane: this lane's ldmatrix row address for k-step 0 / channel tile 0, k_step / v_step: the byte step to
// the next 16 channels of K / of V. Updates the online-softmax state of row g (m_run in log2 units, l_run = this
// lane's share of the sum) and O[g][8j + 2t .. + 1] in o[j].
template <typename T, int HEAD>
__device__ __forceinline__ void attend16(const unsigned char* k_lane, int k_step, const unsigned char* v_lane,
                                         int v_step, unsigned valid, const unsigned (&qa0)[HEAD / 16],
                                         const unsigned (&qa2)[HEAD / 16], float score_mul, float& m_run,
                                         float& l_run, float (&o)[HEAD / 8][2]) {
  // S = Q K^T: n-tile 0 = tokens 16w..16w+7, n-tile 1 = 16w+8..16w+15.
  float s0[2] = {0.0f, 0.0f}, s1[2] = {0.0f, 0.0f};
#pragma unroll
  for (int kk = 0; kk < HEAD / 16; ++kk) {
    unsigned b[4];
    ldmatrix_x4(b, smem_addr(k_lane + kk * k_step));
    mma_rows8<T>(s0, qa0[kk], qa2[kk], b[0], b[1]);
    mma_rows8<T>(s1, qa0[kk], qa2[kk], b[2], b[3]);
  }

  // Online softmax of row g over the lane's 4 tokens, then across the 4 lanes of the row. Select, not multiply: a
  // masked token's score may come from garbage (even NaN).
  float x[4] = {s0[0], s0[1], s1[0], s1[1]};
#pragma unroll
  for (int k = 0; k < 4; ++k) x[k] = (valid >> k) & 1 ? x[k] * score_mul : neg_inf();
  float mx = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  const float m_new = fmaxf(m_run, mx);
  const float m_use = m_new == neg_inf() ? 0.0f : m_new;
  const float alpha = exp2f(m_run - m_use);
  float p[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) p[k] = exp2f(x[k] - m_use);
  l_run = l_run * alpha + (p[0] + p[1]) + (p[2] + p[3]);
  m_run = m_new;
  if (__any_sync(0xffffffffu, alpha != 1.0f)) {
#pragma unroll
    for (int j = 0; j < HEAD / 8; ++j) {
      o[j][0] *= alpha;
      o[j][1] *= alpha;
    }
  }
  const unsigned pa0 = pack2<T>(p[0], p[1]), pa2 = pack2<T>(p[2], p[3]);

  // O += P V: k = the warp's 16 tokens, n = 16 channels per ldmatrix.
#pragma unroll
  for (int nn = 0; nn < HEAD / 16; ++nn) {
    unsigned b[4];
    ldmatrix_x4(b, smem_addr(v_lane + nn * v_step));
    mma_rows8<T>(o[2 * nn], pa0, pa2, b[0], b[1]);
    mma_rows8<T>(o[2 * nn + 1], pa0, pa2, b[2], b[3]);
  }
}

}  // namespace tc

template <typename T, int HEAD>
__global__ void __launch_bounds__(kThreads, 1) paged_decode_mma(
    T* __restrict__ out,                     // [S, Hq, HEAD], contiguous; written when gridDim.x == 1
    float* __restrict__ part_o,              // [S, Hq, num_splits, HEAD]: normalised split outputs
    float2* __restrict__ part_ml,            // [S, Hq, num_splits]: (max score in log2 units, sum of exp2)
    int* __restrict__ counters,              // [S * Hkv] split tickets, zero between launches
    const T* __restrict__ query,             // [S, Hq, HEAD], strides (q_stride_s, q_stride_h, 1)
    const T* __restrict__ key_cache,         // [num_blocks, Hkv, HEAD/8, BS, 8]
    const T* __restrict__ value_cache,       // [num_blocks, Hkv, HEAD, BS]
    const int* __restrict__ block_tables,    // [S, max_blocks], row stride bt_stride
    const int* __restrict__ seq_lens,        // [S]
    const DecodeParams p) {
  using S = tc::Shape<HEAD>;
  extern __shared__ __align__(128) unsigned char smem[];
  int2* list_s = reinterpret_cast<int2*>(smem + S::kListOff);
  int* count_s = reinterpret_cast<int*>(smem + S::kCountOff);
  float2* ml_s = reinterpret_cast<float2*>(smem + S::kMlOff);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  SplitCta c;  // the last split (dense local window) is scheduled first
  if (!begin_split<T, HEAD, 8, false, kThreads, S::kFixedBytes>(c, gridDim.x - 1 - blockIdx.x, out, part_o, part_ml,
                                                                counters, seq_lens, p, count_s))
    return;
  const int num_splits = c.num_splits, split = c.split, kvh = c.kvh, seq = c.seq;
  const int num_heads = c.num_heads, h0 = c.h0, len = c.len, j0 = c.j0, j1 = c.j1;
  const int bs = 1 << p.log2_bs;

  const int n_act =
      build_block_list<8>(list_s, count_s, block_tables + (size_t)seq * p.bt_stride, j0, j1, len, kvh, p);

  // Fragment coordinates: row (query head) g = lane / 4, column pair 2t, 2t + 1 with t = lane % 4.
  const int g = lane >> 2, t = lane & 3;
  unsigned qa0[HEAD / 16], qa2[HEAD / 16];  // A fragments of Q (rows g < group; rows 8..15 are the zero registers)
  {
    const T* qrow = query + (size_t)seq * p.q_stride_s + (size_t)(h0 + g) * p.q_stride_h;
#pragma unroll
    for (int kk = 0; kk < HEAD / 16; ++kk) {
      if (g < p.group) {
        const int d = 16 * kk + 2 * t;
        qa0[kk] = pack2<T>(to_float<T>(qrow[d]), to_float<T>(qrow[d + 1]));
        qa2[kk] = pack2<T>(to_float<T>(qrow[d + 8]), to_float<T>(qrow[d + 9]));
      } else {
        qa0[kk] = qa2[kk] = 0u;
      }
    }
  }

  const int blocks_per_stage = tc::kStageTokens >> p.log2_bs;
  const int n_stages = (n_act + blocks_per_stage - 1) / blocks_per_stage;
  const size_t block_elems = (size_t)HEAD << p.log2_bs;
  const int log2_gpb = p.log2_bs - 3;         // 8-token groups per cache block
  const int chunks = HEAD << p.log2_bs >> 3;  // 16-byte chunks of one (block, kv head) slice of K or of V

  // Stage layout as in paged_decode: K [chunk c][64 tokens] and V [8-token group][d], 16-byte chunks. Consecutive
  // threads copy consecutive 16-byte chunks of one contiguous 4 KB (D 128, BS 16) slice.
  auto load_stage = [&](int stage, int buf) {
    unsigned char* kbuf = smem + buf * S::kStageBytes;
    unsigned char* vbuf = kbuf + S::kKStageBytes;
    const int first = stage * blocks_per_stage;
    for (int e = 0; e < blocks_per_stage && first + e < n_act; ++e) {
      const size_t blk = (size_t)list_s[first + e].x * p.num_kv_heads + kvh;
      const unsigned char* ksrc = reinterpret_cast<const unsigned char*>(key_cache + blk * block_elems);
      const unsigned char* vsrc = reinterpret_cast<const unsigned char*>(value_cache + blk * block_elems);
      for (int q = tid; q < chunks; q += kThreads) {
        const int c = q >> p.log2_bs, tt = q & (bs - 1);
        cp_async_16(kbuf + (c * tc::kStageTokens + (e << p.log2_bs) + tt) * 16, ksrc + q * 16);
        const int d = q >> log2_gpb, gg = q & ((1 << log2_gpb) - 1);
        cp_async_16(vbuf + (((e << log2_gpb) + gg) * HEAD + d) * 16, vsrc + q * 16);
      }
    }
  };

#pragma unroll
  for (int st = 0; st < S::kStages - 1; ++st) {
    if (st < n_stages) load_stage(st, st);
    cp_async_commit();
  }

  float m_run = neg_inf(), l_run = 0.0f;  // row g's running max (log2 units) and this lane's share of the sum
  float o[HEAD / 8][2];                    // O[g][8j + 2t], O[g][8j + 2t + 1]
#pragma unroll
  for (int j = 0; j < HEAD / 8; ++j) o[j][0] = o[j][1] = 0.0f;

  // ldmatrix row addresses: lane l supplies row (l % 8) of matrix (l / 8).
  const int mat = lane >> 3, mrow = lane & 7;
  const int k_lane = ((mat & 1) * tc::kStageTokens + 16 * warp + 8 * (mat >> 1) + mrow) * 16;
  const int v_lane = ((2 * warp + (mat & 1)) * HEAD + 8 * (mat >> 1) + mrow) * 16;

  for (int st = 0; st < n_stages; ++st) {
    cp_async_wait<S::kStages - 2>();
    __syncthreads();
    {
      const int next = st + S::kStages - 1;
      if (next < n_stages) load_stage(next, next % S::kStages);
      cp_async_commit();
    }
    const unsigned char* kbuf = smem + (st % S::kStages) * S::kStageBytes;
    unsigned char* vbuf = smem + (st % S::kStages) * S::kStageBytes + S::kKStageBytes;
    const int first = st * blocks_per_stage;

    // The last stage may hold absent blocks (stale or uninitialised buffer) and a partial block whose tail slots
    // may hold NaN: P is 0 there, but 0 * NaN is NaN inside the MMA, so zero those V entries first.
    if (st == n_stages - 1 &&
        (first + blocks_per_stage > n_act || (list_s[n_act - 1].y >> 8) < bs)) {
      for (int q = tid; q < 8 * HEAD; q += kThreads) {
        const int grp = q / HEAD, e = (grp * 8) >> p.log2_bs;
        const int valid = first + e < n_act ? (list_s[first + e].y >> 8) - ((grp * 8) & (bs - 1)) : 0;
        if (valid < 8) {
          unsigned short* v = reinterpret_cast<unsigned short*>(vbuf + q * 16);
#pragma unroll
          for (int k = 0; k < 8; ++k)
            if (k >= valid) v[k] = 0;
        }
      }
      __syncthreads();
    }

    tc::attend16<T, HEAD>(kbuf + k_lane, 2 * tc::kStageTokens * 16, vbuf + v_lane, 16 * 16,
                          tc::valid_bits(list_s, first, n_act, warp, lane, p.log2_bs), qa0, qa2, p.qk_scale_log2, m_run,
                          l_run, o);
  }

  // ---- epilogue: merge the 4 warps' (max, sum, O) of each head ----------------------------------------------------
  cp_async_wait<0>();
  __syncthreads();  // every stage consumed: the stage buffers become scratch
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
  if (t == 0) ml_s[warp * 8 + g] = make_float2(m_run, l_run);
  float* o_s = reinterpret_cast<float*>(smem);  // [kWarps][8 heads][HEAD]
#pragma unroll
  for (int j = 0; j < HEAD / 8; ++j)
    *reinterpret_cast<float2*>(o_s + (warp * 8 + g) * HEAD + 8 * j + 2 * t) = make_float2(o[j][0], o[j][1]);
  __syncthreads();
  for (int q = tid; q < p.group * HEAD; q += kThreads) {
    const int i = q / HEAD, d = q % HEAD;
    float mx = neg_inf();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, ml_s[w * 8 + i].x);
    const float m_use = mx == neg_inf() ? 0.0f : mx;
    float l = 0.0f, acc = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float2 ml = ml_s[w * 8 + i];
      const float f = exp2f(ml.x - m_use);  // 0 for a warp that saw no token of this head (its O is 0 too)
      l = fmaf(ml.y, f, l);
      acc = fmaf(o_s[(w * 8 + i) * HEAD + d], f, acc);
    }
    const float val = l > 0.0f ? acc * (p.v_scale / l) : 0.0f;
    if (num_splits == 1) {
      out[((size_t)seq * num_heads + h0 + i) * HEAD + d] = from_float<T>(val);
    } else {
      part_o[(((size_t)seq * num_heads + h0 + i) * num_splits + split) * HEAD + d] = val;
      if (d == 0) part_ml[((size_t)seq * num_heads + h0 + i) * num_splits + split] = make_float2(mx, l);
    }
  }
  if (num_splits > 1)
    combine_splits_if_last<T, HEAD>(out, part_o, part_ml, counters + (size_t)seq * p.num_kv_heads + kvh,
                                    (size_t)seq * num_heads + h0, p.group, num_splits, count_s);
}

// ---------------------------------------------------------------------------------------------------------------
// Hopper (sm_90) kernel for 16-bit caches: the grid, block list, math (tc::attend16) and partial-output contract of
// paged_decode_mma, fed by a warp-specialised ring of 1-D bulk copies (TMA without a tensor map). In vLLM's layout
// each (cache block, kv head) slice of K and of V is one contiguous run of HEAD * BS * 2 bytes, so one lane of the
// producer warp moves it with a single cp.async.bulk that completes on its stage's "full" mbarrier; the four
// consumer warps wait there and hand the slot back through its "empty" mbarrier. Up to STAGES stages of 64 tokens
// stay in flight per CTA with no CTA-wide barrier in the loop (paged_decode_mma's cp.async pipeline keeps the four
// warps in lockstep and every thread issues 16-byte copies). A stage holds the slices back to back: K slice e at
// e * slice ([HEAD/8][BS][8]), V slice e at kKStageBytes + e * slice ([HEAD][BS]).

namespace bulk {

constexpr int kConsumerWarps = 4;
constexpr int kThreads = 32 * (kConsumerWarps + 1);  // + the producer warp

template <int HEAD, int STAGES>
struct Shape {
  static constexpr int kKStageBytes = tc::kStageTokens * HEAD * 2;
  static constexpr int kStageBytes = 2 * kKStageBytes;
  static constexpr int kBarOff = STAGES * kStageBytes;              // uint64 full[STAGES], empty[STAGES]
  static constexpr int kCountOff = kBarOff + 2 * STAGES * 8;        // int count[kThreads / 32] (8 reserved)
  static constexpr int kMlOff = kCountOff + 8 * 4;                  // float2 ml[kConsumerWarps][8]
  static constexpr int kListOff = kMlOff + kConsumerWarps * 8 * 8;  // int2 list[chunk_blocks]
  static constexpr int kFixedBytes = kListOff;
  static_assert(kThreads / 32 <= 8, "count[] reserves 8 ints");
  static_assert(kConsumerWarps * 8 * HEAD * 4 <= STAGES * kStageBytes, "epilogue scratch must fit the stages");
};

#if __CUDA_ARCH__ >= 900
// (mbar_arrive_expect_tx: common.cuh.)

// Global -> shared copy of `bytes` (a multiple of 16, both addresses 16-byte aligned), completing on `bar`.
__device__ __forceinline__ void bulk_load(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
#endif

}  // namespace bulk

// Compiled for sm_80 as a trap: the launcher (cubsattn/_decode_cuda.py) selects it only on compute capability >= 9.0.
template <typename T, int HEAD, int STAGES>
__global__ void __launch_bounds__(bulk::kThreads, HEAD <= 128 ? 2 : 1) paged_decode_bulk(
    T* __restrict__ out,                     // [S, Hq, HEAD], contiguous; written when gridDim.x == 1
    float* __restrict__ part_o,              // [S, Hq, num_splits, HEAD]: normalised split outputs
    float2* __restrict__ part_ml,            // [S, Hq, num_splits]: (max score in log2 units, sum of exp2)
    int* __restrict__ counters,              // [S * Hkv] split tickets, zero between launches
    const T* __restrict__ query,             // [S, Hq, HEAD], strides (q_stride_s, q_stride_h, 1)
    const T* __restrict__ key_cache,         // [num_blocks, Hkv, HEAD/8, BS, 8]
    const T* __restrict__ value_cache,       // [num_blocks, Hkv, HEAD, BS]
    const int* __restrict__ block_tables,    // [S, max_blocks], row stride bt_stride
    const int* __restrict__ seq_lens,        // [S]
    const DecodeParams p) {
#if __CUDA_ARCH__ >= 900
  using S = bulk::Shape<HEAD, STAGES>;
  constexpr int kThreads = bulk::kThreads, kConsumers = bulk::kConsumerWarps;
  extern __shared__ __align__(128) unsigned char smem[];
  int2* list_s = reinterpret_cast<int2*>(smem + S::kListOff);
  int* count_s = reinterpret_cast<int*>(smem + S::kCountOff);
  float2* ml_s = reinterpret_cast<float2*>(smem + S::kMlOff);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  SplitCta c;  // the last split (dense local window) is scheduled first
  if (!begin_split<T, HEAD, 8, false, kThreads, S::kFixedBytes>(c, gridDim.x - 1 - blockIdx.x, out, part_o, part_ml,
                                                                counters, seq_lens, p, count_s))
    return;
  const int num_splits = c.num_splits, split = c.split, kvh = c.kvh, seq = c.seq;
  const int num_heads = c.num_heads, h0 = c.h0, len = c.len, j0 = c.j0, j1 = c.j1;
  const int bs = 1 << p.log2_bs;

  const unsigned stage0 = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const unsigned full0 = stage0 + S::kBarOff, empty0 = full0 + STAGES * 8;
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, kConsumers * 32);  // every consumer lane releases its own reads
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  // Its __syncthreads also publish the barrier initialisation.
  const int n_act =
      build_block_list<8, kThreads>(list_s, count_s, block_tables + (size_t)seq * p.bt_stride, j0, j1, len, kvh, p);
  const int blocks_per_stage = tc::kStageTokens >> p.log2_bs;
  const int n_stages = (n_act + blocks_per_stage - 1) / blocks_per_stage;
  const int slice = HEAD << p.log2_bs << 1;  // bytes of one (cache block, kv head) slice of K or of V

  const int g = lane >> 2, t = lane & 3;
  float m_run = neg_inf(), l_run = 0.0f;  // row g's running max (log2 units) and this lane's share of the sum
  float o[HEAD / 8][2];                    // O[g][8j + 2t], O[g][8j + 2t + 1]
#pragma unroll
  for (int j = 0; j < HEAD / 8; ++j) o[j][0] = o[j][1] = 0.0f;

  if (warp == kConsumers) {
    // ---- producer: lane 2e moves K slice e of a stage, lane 2e + 1 its V slice ------------------------------------
    const size_t block_elems = (size_t)HEAD << p.log2_bs;
    for (int st = 0; st < n_stages; ++st) {
      const int slot = st % STAGES;
      if (st >= STAGES) mbar_wait(empty0 + 8 * slot, ((st / STAGES) - 1) & 1);
      const int first = st * blocks_per_stage;
      const int nb = min(blocks_per_stage, n_act - first);
      if (lane == 0) mbar_arrive_expect_tx(full0 + 8 * slot, 2 * nb * slice);
      __syncwarp();
      if (lane < 2 * nb) {
        const int e = lane >> 1, is_v = lane & 1;
        const size_t blk = (size_t)list_s[first + e].x * p.num_kv_heads + kvh;
        bulk::bulk_load(stage0 + slot * S::kStageBytes + is_v * S::kKStageBytes + e * slice,
                        (is_v ? value_cache : key_cache) + blk * block_elems, slice, full0 + 8 * slot);
      }
    }
  } else {
    // ---- consumers: warp w takes tokens 16w .. 16w + 15 of every stage --------------------------------------------
    unsigned qa0[HEAD / 16], qa2[HEAD / 16];  // A fragments of Q (rows g < group; rows 8..15 are zero registers)
    {
      const T* qrow = query + (size_t)seq * p.q_stride_s + (size_t)(h0 + g) * p.q_stride_h;
#pragma unroll
      for (int kk = 0; kk < HEAD / 16; ++kk) {
        if (g < p.group) {
          const int d = 16 * kk + 2 * t;
          qa0[kk] = pack2<T>(to_float<T>(qrow[d]), to_float<T>(qrow[d + 1]));
          qa2[kk] = pack2<T>(to_float<T>(qrow[d + 8]), to_float<T>(qrow[d + 9]));
        } else {
          qa0[kk] = qa2[kk] = 0u;
        }
      }
    }
    // ldmatrix rows (lane l supplies row l % 8 of matrix l / 8). K: token 16w + 8 (mat / 2) + row, 16-byte channel
    // chunk (mat % 2) of the k-step; V: channel 8 (mat / 2) + row of the 16-channel tile, tokens 16w + 8 (mat % 2)..+7.
    // (V rows sit BS * 2 bytes apart, a 2-way bank conflict for BS 16 that the contiguous bulk copies cannot swizzle.)
    const int mat = lane >> 3, mrow = lane & 7;
    const int tk = 16 * warp + 8 * (mat >> 1) + mrow;
    const int k_lane = (tk >> p.log2_bs) * slice + (((mat & 1) << p.log2_bs) + (tk & (bs - 1))) * 16;
    const int tv = 16 * warp + 8 * (mat & 1);
    const int v_lane =
        S::kKStageBytes + (tv >> p.log2_bs) * slice + ((8 * (mat >> 1) + mrow) * bs + (tv & (bs - 1))) * 2;
    const int step = 32 << p.log2_bs;  // K: 2 chunks x BS tokens x 16 bytes; V: 16 channels x BS tokens x 2 bytes

    for (int st = 0; st < n_stages; ++st) {
      const int slot = st % STAGES;
      mbar_wait(full0 + 8 * slot, (st / STAGES) & 1);
      unsigned char* buf = smem + slot * S::kStageBytes;
      const int first = st * blocks_per_stage;
      if (st == n_stages - 1) {
        // Absent blocks (stale or never-written slot) and a partial block's tail slots (the cache may hold NaN
        // there): P is 0 for them, but 0 * NaN is NaN inside the MMA, so zero this warp's V entries first.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int tok0 = 16 * warp + 8 * h, e = tok0 >> p.log2_bs, tt = tok0 & (bs - 1);
          const int valid = first + e < n_act ? (list_s[first + e].y >> 8) - tt : 0;
          if (valid < 8) {
            for (int d = lane; d < HEAD; d += 32) {
              unsigned short* v =
                  reinterpret_cast<unsigned short*>(buf + S::kKStageBytes + e * slice + (d * bs + tt) * 2);
#pragma unroll
              for (int k = 0; k < 8; ++k)
                if (k >= valid) v[k] = 0;
            }
          }
        }
        __syncwarp();
      }
      tc::attend16<T, HEAD>(buf + k_lane, step, buf + v_lane, step,
                            tc::valid_bits(list_s, first, n_act, warp, lane, p.log2_bs), qa0, qa2, p.qk_scale_log2,
                            m_run, l_run, o);
      mbar_arrive(empty0 + 8 * slot);
    }
  }

  // ---- epilogue: merge the consumer warps' (max, sum, O) of each head ---------------------------------------------
  __syncthreads();  // every stage landed and was consumed: the stage buffers become scratch
  float* o_s = reinterpret_cast<float*>(smem);  // [kConsumers][8 heads][HEAD]
  if (warp < kConsumers) {
    l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
    l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
    if (t == 0) ml_s[warp * 8 + g] = make_float2(m_run, l_run);
#pragma unroll
    for (int j = 0; j < HEAD / 8; ++j)
      *reinterpret_cast<float2*>(o_s + (warp * 8 + g) * HEAD + 8 * j + 2 * t) = make_float2(o[j][0], o[j][1]);
  }
  __syncthreads();
  for (int q = tid; q < p.group * HEAD; q += kThreads) {
    const int i = q / HEAD, d = q % HEAD;
    float mx = neg_inf();
#pragma unroll
    for (int w = 0; w < kConsumers; ++w) mx = fmaxf(mx, ml_s[w * 8 + i].x);
    const float m_use = mx == neg_inf() ? 0.0f : mx;
    float l = 0.0f, acc = 0.0f;
#pragma unroll
    for (int w = 0; w < kConsumers; ++w) {
      const float2 ml = ml_s[w * 8 + i];
      const float f = exp2f(ml.x - m_use);  // 0 for a warp that saw no token of this head (its O is 0 too)
      l = fmaf(ml.y, f, l);
      acc = fmaf(o_s[(w * 8 + i) * HEAD + d], f, acc);
    }
    const float val = l > 0.0f ? acc * (p.v_scale / l) : 0.0f;
    if (num_splits == 1) {
      out[((size_t)seq * num_heads + h0 + i) * HEAD + d] = from_float<T>(val);
    } else {
      part_o[(((size_t)seq * num_heads + h0 + i) * num_splits + split) * HEAD + d] = val;
      if (d == 0) part_ml[((size_t)seq * num_heads + h0 + i) * num_splits + split] = make_float2(mx, l);
    }
  }
  if (num_splits > 1)
    combine_splits_if_last<T, HEAD>(out, part_o, part_ml, counters + (size_t)seq * p.num_kv_heads + kvh,
                                    (size_t)seq * num_heads + h0, p.group, num_splits, count_s);
#else
  __trap();
#endif
}

}  // namespace decode
}  // namespace cubsattn
