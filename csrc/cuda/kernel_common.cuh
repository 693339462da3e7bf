// Device building blocks shared by the CUDA forward and backward kernels: dtype conversions,
// warp and block reductions, the default marginals and the row and column LSE passes of one
// Sinkhorn step. Every formula comes from sinkhorn_math.h; nothing here sees ATen.
//
// Conventions: a block owns one problem; BLOCK is a multiple of 32; row passes give a warp to
// each row and column passes a thread to each column, so loads of S are coalesced in both.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <type_traits>
#include <cub/block/block_reduce.cuh>

#include "../sinkhorn_math.h"
#include "../sinkhorn_params.h"

namespace sinkhorn {
namespace dev {

using math::Lse;

constexpr unsigned kFullMask = 0xffffffffu;

// Accumulation type: double for double scores, float for every other dtype (MATH.md: Numerics).
template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Explicit conversions: PyTorch compiles CUDA sources with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit half <-> float operators.
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(double* p, double x) { *p = x; }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }
__device__ __forceinline__ int warp_id() { return threadIdx.x >> 5; }

// Step k is a row step when (k even) == start_row (MATH.md section 1).
__device__ __forceinline__ bool is_row_step(int64_t k, bool start_row) {
  return ((k & 1) == 0) == start_row;
}

// Sum over the block, returned to every thread. It is also a block barrier (twice: the second
// lets the next call reuse the shared storage), which the callers rely on to publish writes.
template <int BLOCK, typename T>
__device__ T block_sum(T v) {
  using Reduce = cub::BlockReduce<T, BLOCK>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ T total;
  const T s = Reduce(tmp).Sum(v);
  if (threadIdx.x == 0) total = s;
  __syncthreads();
  const T r = total;
  __syncthreads();
  return r;
}

// Butterfly merges of per-lane partials; every lane ends with the warp's total.
template <typename T>
__device__ __forceinline__ Lse<T> warp_lse(Lse<T> s) {
  for (int off = 16; off > 0; off >>= 1) {
    const Lse<T> o{__shfl_xor_sync(kFullMask, s.max, off), __shfl_xor_sync(kFullMask, s.sum, off)};
    s = math::lse_merge(s, o);
  }
  return s;
}
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Default marginals of one n x m problem from the finite pattern of S (MATH.md section 1, masks;
// an entry counts as allowed unless it is -inf, as in reference.default_log_marginals). Columns:
// a thread per column scans down its rows, its flag parked in `scratch` (m values) until both
// counts are known. Rows: a warp per row, lanes striding over the columns, then a warp vote.
// Contains block barriers: every thread of the block must call it. The last writes of log_b are
// not published: the caller needs a barrier before other threads read it.
template <int BLOCK, typename scalar_t, typename acc_t>
__device__ void default_marginals(const scalar_t* S, int64_t n, int64_t m, acc_t* scratch,
                                  acc_t* log_a, acc_t* log_b) {
  const acc_t masked = math::neg_inf<acc_t>();
  long long cols = 0;
  for (int64_t j = threadIdx.x; j < m; j += BLOCK) {
    bool alive = false;
    for (int64_t i = 0; i < n && !alive; ++i) alive = to_acc(S[i * m + j]) != masked;
    scratch[j] = alive ? acc_t(1) : acc_t(0);
    cols += alive;
  }
  long long rows = 0;
  for (int64_t i = warp_id(); i < n; i += BLOCK / 32) {  // warp-uniform: the vote needs all lanes
    bool alive = false;
    for (int64_t j = lane_id(); j < m && !alive; j += 32) alive = to_acc(S[i * m + j]) != masked;
    alive = __any_sync(kFullMask, alive);
    if (lane_id() == 0) {
      log_a[i] = math::default_log_a<acc_t>(alive);
      rows += alive;
    }
  }
  rows = block_sum<BLOCK>(rows);
  cols = block_sum<BLOCK>(cols);
  for (int64_t j = threadIdx.x; j < m; j += BLOCK)  // same thread that parked the flag
    log_b[j] = math::default_log_b<acc_t>(scratch[j] != acc_t(0), rows, cols);
}

// Row LSEs of a step, LSE_j(S_ij + g_j): a warp per row, lanes striding over the columns
// (coalesced loads), an online LSE per lane merged by shuffles; lane 0 then calls use(i, lse).
// A warp takes kRowsPerWarp rows at once: their loads and their shuffle merges are independent,
// so the warp waits once per group of rows instead of once per row (the H100 and H200 runs found
// the block kernels latency-bound). Each row's sum runs in the same order as one row alone.
// No barrier inside; the row loop is warp-uniform because the merge needs all lanes.
// Fewer rows than warps times kRowsPerWarp take fewer rows a warp (down to one), so that short,
// wide problems keep every warp busy; the count depends on n and BLOCK only, so the backward's
// replay splits its rows as the forward did.
constexpr int kRowsPerWarp = 4;
template <int BLOCK, typename scalar_t, typename acc_t, typename Use>
__device__ __forceinline__ void row_lse_pass(const scalar_t* S, const acc_t* g, int64_t n,
                                             int64_t m, Use&& use) {
  constexpr int R = kRowsPerWarp, kWarps = BLOCK / 32;
  const int64_t per_warp = (n + kWarps - 1) / kWarps;
  const int rows = per_warp < R ? static_cast<int>(per_warp) : R;  // warp-uniform, >= 1 if n > 0
  for (int64_t i0 = int64_t(warp_id()) * rows; i0 < n; i0 += kWarps * rows) {
    Lse<acc_t> s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = math::lse_empty<acc_t>();
    for (int64_t j = lane_id(); j < m; j += 32) {
      const acc_t gj = g[j];
      // The rows' loads first, then their pushes: a load written inside its push's condition was
      // issued after the previous row's push (ptxas, sm_90), so the rows' loads did not overlap.
      acc_t x[R];
#pragma unroll
      for (int r = 0; r < R; ++r)
        x[r] = r < rows && i0 + r < n ? to_acc(S[(i0 + r) * m + j]) : math::neg_inf<acc_t>();
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (r < rows && i0 + r < n) math::lse_push(s[r], x[r] + gj);
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (r < rows) s[r] = warp_lse(s[r]);
    if (lane_id() == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (r < rows && i0 + r < n) use(i0 + r, math::lse_value(s[r]));
    }
  }
}

// The online LSE of N values already in registers, pushed (math::lse_push) in four chains
// (entry k into chain k % 4) merged at the end.
template <int N, typename acc_t>
__device__ __forceinline__ Lse<acc_t> lse_pushed(const acc_t (&x)[N]) {
  Lse<acc_t> c[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) c[q] = math::lse_empty<acc_t>();
#pragma unroll
  for (int k = 0; k < N; ++k) math::lse_push(c[k % 4], x[k]);
  return math::lse_merge(math::lse_merge(c[0], c[1]), math::lse_merge(c[2], c[3]));
}

// The LSE of N values already in registers (-inf: a masked or absent entry), as a running Lse:
// their maximum, then the sum of exp(x - max), with no branch an entry and one exponential each
// (an online push costs a compare, a branch and the same exponential). When the maximum is not
// finite (+inf), or a value is NaN, the values are pushed one by one instead (math::lse_push),
// so those cases give exactly what the online pushes give (a NaN spreads; +inf entries as
// lse_push treats them). An all -inf set gives the empty state.
template <int N, typename acc_t>
__device__ __forceinline__ Lse<acc_t> lse_of(const acc_t (&x)[N]) {
  acc_t mx = math::neg_inf<acc_t>();
  bool nan = false;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    mx = x[k] > mx ? x[k] : mx;
    nan = nan || x[k] != x[k];
  }
  if (nan || mx == -math::neg_inf<acc_t>()) return lse_pushed(x);  // rare
  if (mx == math::neg_inf<acc_t>()) return math::lse_empty<acc_t>();
  acc_t sum[4] = {0, 0, 0, 0};
#pragma unroll
  for (int k = 0; k < N; ++k) sum[k % 4] += math::exp_(x[k] - mx);  // exp(-inf) = 0
  return Lse<acc_t>{mx, (sum[0] + sum[1]) + (sum[2] + sum[3])};
}

// A fold of value(k) for k = first, first + stride, ... < end (stride > 0) in four independent
// chains (k, k + stride, k + 2 stride, k + 3 stride; the remainder into the first), each started
// from `empty` and grown by push(state, value), combined at the end as merge(merge(chain 0,
// chain 1), merge(chain 2, chain 3)). The four values of a round are loaded together: one chain
// of dependent pushes leaves a thread waiting on each load (the H200's large-path row pass, one
// 4-byte load in flight a thread, ran at half of the copy bandwidth: 0.13 ms at 8192^2 fp32
// against 0.065 ms for a read of S).
template <typename T, typename Value, typename Push, typename Merge>
__device__ __forceinline__ T fold_strided(int64_t first, int64_t end, int64_t stride, T empty,
                                          Value&& value, Push&& push, Merge&& merge) {
  T s[4] = {empty, empty, empty, empty};
  int64_t k = first;
  for (; k + 3 * stride < end; k += 4 * stride) {
    decltype(value(k)) x[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) x[c] = value(k + c * stride);
#pragma unroll
    for (int c = 0; c < 4; ++c) push(s[c], x[c]);
  }
  for (; k < end; k += stride) push(s[0], value(k));
  return merge(merge(s[0], s[1]), merge(s[2], s[3]));
}

// The online LSE of value(k) over the same range (fold_strided).
template <typename acc_t, typename Value>
__device__ __forceinline__ Lse<acc_t> lse_strided(int64_t first, int64_t end, int64_t stride,
                                                  Value&& value) {
  return fold_strided(
      first, end, stride, math::lse_empty<acc_t>(), value,
      [](Lse<acc_t>& s, acc_t x) { math::lse_push(s, x); },
      [](Lse<acc_t> a, Lse<acc_t> b) { return math::lse_merge(a, b); });
}

// The plain sum of value(k) over the same range (fold_strided).
template <typename acc_t, typename Value>
__device__ __forceinline__ acc_t sum_strided(int64_t first, int64_t end, int64_t stride,
                                             Value&& value) {
  return fold_strided(
      first, end, stride, acc_t(0), value, [](acc_t& s, acc_t x) { s += x; },
      [](acc_t a, acc_t b) { return a + b; });
}

// Column LSEs, LSE_i(S_ij + f_i): a thread per column, so consecutive threads read consecutive
// entries of each row (coalesced); f_i is a broadcast load. A thread walks its column in four
// independent running LSEs (lse_strided). When the block is wider than the columns (e.g. 512
// threads for 128 columns), several threads share a column (split_columns below); every thread
// of the block must call this pass.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Lse<acc_t> column_part(const scalar_t* S, const acc_t* f, int64_t n,
                                                  int64_t m, int64_t j, int64_t first,
                                                  int64_t every) {
  return lse_strided<acc_t>(first, n, every,
                            [&](int64_t i) { return to_acc(S[i * m + j]) + f[i]; });
}

// The column split shared by col_lse_pass and column_sums: part(j, first, every) reduces column
// j over rows first, first + every, ... to a partial P; merge combines two partials; use(j, P)
// takes a column's total. A thread per column, or, when the block is wider than the columns,
// G = BLOCK / (m rounded up to a warp) threads per column, each taking every G-th row, their
// partials merged in shared memory (P must be trivially constructible) by the first of them.
// That branch is block-uniform (m is) and holds two barriers: every thread must call this.
template <int BLOCK, typename P, typename Part, typename Merge, typename Use>
__device__ __forceinline__ void split_columns(int64_t m, Part&& part, Merge&& merge, Use&& use) {
  const int64_t width = (m + 31) / 32 * 32;  // threads per row group
  const int64_t groups = width > 0 && width < BLOCK ? BLOCK / width : 1;  // m = 0: no column
  if (groups == 1) {
    for (int64_t j = threadIdx.x; j < m; j += BLOCK) use(j, part(j, int64_t(0), int64_t(1)));
    return;
  }
  __shared__ P parts[BLOCK];
  const int64_t group = threadIdx.x / width, j = threadIdx.x % width;
  const bool works = group < groups && j < m;
  if (works) parts[threadIdx.x] = part(j, group, groups);
  __syncthreads();
  if (group == 0 && works) {
    P total = parts[j];
    for (int64_t r = 1; r < groups; ++r) total = merge(total, parts[r * width + j]);
    use(j, total);
  }
  __syncthreads();  // parts is free again for the next pass
}

template <int BLOCK, typename scalar_t, typename acc_t, typename Use>
__device__ __forceinline__ void col_lse_pass(const scalar_t* S, const acc_t* f, int64_t n,
                                             int64_t m, Use&& use) {
  split_columns<BLOCK, Lse<acc_t>>(
      m,
      [&](int64_t j, int64_t first, int64_t every) {
        return column_part(S, f, n, m, j, first, every);
      },
      [](Lse<acc_t> a, Lse<acc_t> b) { return math::lse_merge(a, b); },
      [&](int64_t j, Lse<acc_t> total) { use(j, math::lse_value(total)); });
}


// The values a per-entry update reads from memory, up to four (for a reverse step: the upstream,
// the score, the LSE and the entry of dS it updates; for the others, what they need).
template <typename T>
struct Inputs {
  T v[4];
};

// update(x, load(x)) for x = first, first + stride, ... < end (stride > 0), in order, four
// entries at a time with their four loads issued before the first update. An update that stores
// (dS) could alias the next entry's loads as far as the compiler knows, so loads written inside
// it waited for the previous entry's store: one load in flight a thread (ptxas, sm_90). The
// caller guarantees what the compiler could not: update(x) writes nothing load(y) reads, y != x.
template <typename T, typename Load, typename Update>
__device__ __forceinline__ void load_then_update(int64_t first, int64_t end, int64_t stride,
                                                 Load&& load, Update&& update) {
  int64_t x = first;
  for (; x + 3 * stride < end; x += 4 * stride) {
    Inputs<T> in[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) in[k] = load(x + k * stride);
#pragma unroll
    for (int k = 0; k < 4; ++k) update(x + k * stride, in[k]);
  }
#pragma unroll 1
  for (; x < end; x += stride) update(x, load(x));  // at most three: no unrolled copies
}

// A row of the plan, out[j] = exp((s[j] + fi) + g[j]) for j = lane, lane + 32, ... < m (a warp
// per row), four entries' loads issued before their stores (the store could alias them as far
// as the compiler knows). Returns the lane's share of the row's sum.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t plan_row(const scalar_t* s, acc_t fi, const acc_t* g,
                                          scalar_t* out, int64_t m) {
  acc_t sum = 0;
  load_then_update<acc_t>(
      lane_id(), m, 32, [&](int64_t j) { return Inputs<acc_t>{{to_acc(s[j]), g[j], 0, 0}}; },
      [&](int64_t j, const Inputs<acc_t>& in) {
        const acc_t v = math::exp_(in.v[0] + fi + in.v[1]);
        store(out + j, v);
        sum += v;
      });
  return sum;
}

// Column sums of a per-entry value over the rows, sum_i value(i, j, c, load(i, j)) with
// c = column(j) taken once per column, then use(j, sum): split_columns for plain sums. value may
// write entry (i, j) (each entry has one caller); its loads come from load (load_then_update).
// Each thread adds its rows in order. Every thread of the block must call it.
template <int BLOCK, typename acc_t, typename Column, typename Load, typename Value, typename Use>
__device__ __forceinline__ void column_sums(int64_t n, int64_t m, Column&& column, Load&& load,
                                            Value&& value, Use&& use) {
  split_columns<BLOCK, acc_t>(
      m,
      [&](int64_t j, int64_t first, int64_t every) {
        const auto c = column(j);
        acc_t sum = 0;
        load_then_update<acc_t>(
            first, n, every, [&](int64_t i) { return load(i, j); },
            [&](int64_t i, const Inputs<acc_t>& in) { sum += value(i, j, c, in); });
        return sum;
      },
      [](acc_t a, acc_t b) { return a + b; }, use);
}

// Block size by problem size, as a compile-time constant for fn: about 32 entries per thread per
// pass, at most 512 threads, and a single warp for problems of up to 1024 entries. The first
// runs (H100, H200) found the block kernels latency-bound with 128 threads for 128 x 128 (each
// row warp walked 32 rows, each column thread 128 rows); the row and column passes above keep
// every thread busy at any of these sizes. Shared by the forward and the backward, so that the
// backward's replay runs the forward's passes at the same block size, bit for bit.
template <typename F>
void block_size_switch(int64_t entries, F&& fn) {
  if (entries <= 1024) {
    fn(std::integral_constant<int, 32>{});
  } else if (entries <= 2048) {
    fn(std::integral_constant<int, 64>{});
  } else if (entries <= 4096) {
    fn(std::integral_constant<int, 128>{});
  } else if (entries <= 8192) {
    fn(std::integral_constant<int, 256>{});
  } else {
    fn(std::integral_constant<int, 512>{});
  }
}


// On-chip problems: a block copies its problem's scores into dynamic shared memory once, and
// every later pass reads them there instead of from global memory (one read of S per problem).
// The bytes of dynamic shared memory the block kernels take for an n x m problem of elem-byte
// scores, or 0 when S does not fit in kMaxStagedBytes (two blocks per SM stay resident on
// Hopper), exceeds the device's opt-in limit, or SINKHORN_CUDA_SMEM=0 turns staging off.
constexpr size_t kMaxStagedBytes = 96 * 1024;
size_t staged_bytes(int64_t n, int64_t m, size_t elem);
// The current device's opt-in limit of shared memory per block in bytes (0 if the query fails).
int shared_memory_optin();
// The current device's multiprocessor count (0 if the query fails).
int multiprocessors();
// Whether the current device supports cooperative launches (false if the query fails).
bool cooperative_launch();

// Copies a problem's scores to shared memory (when staged) and returns where the passes should
// read them. Contains a barrier before the copy (earlier readers of the buffer are done) and
// after it (the copy is complete): every thread of the block must call it. When the source is
// 16-byte aligned and a whole number of 16-byte words, the copy moves 16-byte words, four loads
// in flight per thread before their stores (one element per thread per round trip was the first
// runs' copy). The branch depends on block-uniform values only.
struct alignas(16) Words16 {
  unsigned int w[4];
};
template <int BLOCK, typename scalar_t>
__device__ const scalar_t* stage_scores(const scalar_t* S, int64_t nm, bool staged) {
  if (!staged) return S;
  extern __shared__ __align__(16) unsigned char staged_scores[];
  scalar_t* dst = reinterpret_cast<scalar_t*>(staged_scores);
  __syncthreads();
  const int64_t bytes = nm * static_cast<int64_t>(sizeof(scalar_t));
  if (reinterpret_cast<uintptr_t>(S) % 16 == 0 && bytes % 16 == 0) {
    const Words16* src = reinterpret_cast<const Words16*>(S);
    Words16* out = reinterpret_cast<Words16*>(staged_scores);
    const int64_t words = bytes / 16;
    int64_t k = threadIdx.x;
    for (; k + 3 * BLOCK < words; k += 4 * BLOCK) {
      Words16 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = src[k + u * BLOCK];
#pragma unroll
      for (int u = 0; u < 4; ++u) out[k + u * BLOCK] = v[u];
    }
    for (; k < words; k += BLOCK) out[k] = src[k];
  } else {
    for (int64_t k = threadIdx.x; k < nm; k += BLOCK) dst[k] = S[k];
  }
  __syncthreads();
  return dst;
}

// Raises the current device's limit of dynamic shared memory for `kernel` to at least `bytes`
// (staging.cu); never lowers it, so that another host thread launching the same kernel with
// more bytes at the same time keeps the limit its launch needs.
void raise_dynamic_shared(const void* kernel, size_t bytes);

// Lets `kernel` launch with `bytes` of dynamic shared memory: above the default 48 KiB a kernel
// must opt in (up to the device's limit, which the callers check).
template <typename... P>
void allow_dynamic_shared(void (*kernel)(P...), size_t bytes) {
  if (bytes > 48 * 1024) raise_dynamic_shared(reinterpret_cast<const void*>(kernel), bytes);
}

// Whether `dynamic` bytes of dynamic shared memory fit beside the static shared memory `kernel`
// declares (its passes' scratch arrays) within the device's opt-in limit; false if a query fails.
template <typename... P>
bool fits_with_static_shared(void (*kernel)(P...), size_t dynamic) {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return dynamic + attr.sharedSizeBytes <= static_cast<size_t>(shared_memory_optin());
}

// Thread-per-problem backwards (tiny, mHC) keep each thread's history of its forward steps in
// dynamic shared memory (math::History) when a block of `threads` histories of per_thread bytes
// fits in kHistoryBytes (and the device's opt-in limit): the bytes to launch with, or 0 for the
// local array (also under SINKHORN_CUDA_HISTORY=local). No smaller blocks: a long history in
// shared memory would cap the SM at a few warps, where the local array keeps many more resident
// (a review's count: 2 warps against 8 for float64 mHC at n = 8). kHistoryBytes: two such
// blocks stay resident per SM on Hopper (4x4 fp32 mHC, 20 iterations: 78 KB for 128 threads).
constexpr size_t kHistoryBytes = 96 * 1024;
size_t history_bytes(size_t per_thread, int threads);

// Launches a thread-per-problem backward with `threads` threads a block: `shared` (its histories
// in `history_bytes` of dynamic shared memory) where they fit, else `local` (local arrays).
template <typename... P, typename... A>
void launch_with_history(void (*local)(P...), void (*shared)(P...), unsigned grid, int threads,
                         size_t per_thread, cudaStream_t stream, const A&... args) {
  const size_t bytes = history_bytes(per_thread, threads);
  if (bytes == 0) {
    local<<<grid, threads, 0, stream>>>(args...);
    return;
  }
  allow_dynamic_shared(shared, bytes);
  shared<<<grid, threads, bytes, stream>>>(args...);
}

// Whether a pointer lies on a 16-byte boundary (nullptr does): the condition of 16-byte loads.
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Blocks of per_block work items that cover `work`, within the grid's x limit (kernels loop
// over the rest), at least one.
inline unsigned blocks_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < INT_MAX ? blocks : INT_MAX));
}

// Launches a block-per-problem kernel (the forward's or the backward's): one block per problem
// (grid-stride beyond INT_MAX), its size from block_size_switch, the scores staged in shared
// memory when they fit (params.staged). kernel_for(block) names the instantiation for a block
// size given as std::integral_constant.
// S is not staged where it would not fit beside the kernel's static shared memory (devices with
// a smaller opt-in limit than Hopper's: 99 KB on sm_86 and sm_89).
template <typename scalar_t, typename Params, typename KernelFor>
void launch_per_problem(const Params& p, cudaStream_t stream, KernelFor&& kernel_for) {
  const unsigned grid = blocks_for(p.B, 1);
  block_size_switch(p.n * p.m, [&](auto block) {
    auto* kernel = kernel_for(block);
    size_t smem = staged_bytes(p.n, p.m, sizeof(scalar_t));
    if (smem > 0 && !fits_with_static_shared(kernel, smem)) smem = 0;
    Params q = p;
    q.staged = smem > 0;
    allow_dynamic_shared(kernel, smem);
    kernel<<<grid, decltype(block)::value, smem, stream>>>(q);
  });
}

// The tiny paths' padding (tiny_problem.h): fn(std::integral_constant<int, 4 or 8>).
template <typename F>
void tiny_switch(int64_t n, int64_t m, F&& fn) {
  if (n <= 4 && m <= 4) {
    fn(std::integral_constant<int, 4>{});
  } else {
    fn(std::integral_constant<int, 8>{});
  }
}

// Calls fn with TypeTag<scalar_t> for the element type `dtype` names: the one place that maps
// the params' dtype to the kernels' template argument.
template <typename T>
struct TypeTag {
  using type = T;
};
template <typename F>
void dtype_switch(DType dtype, F&& fn) {
  switch (dtype) {
    case DType::Float32: fn(TypeTag<float>{}); break;
    case DType::Float64: fn(TypeTag<double>{}); break;
    case DType::Float16: fn(TypeTag<__half>{}); break;
    case DType::BFloat16: fn(TypeTag<__nv_bfloat16>{}); break;
  }
}

}  // namespace dev
}  // namespace sinkhorn
