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
// No barrier inside; the row loop is warp-uniform because the merge needs all lanes.
template <int BLOCK, typename scalar_t, typename acc_t, typename Use>
__device__ __forceinline__ void row_lse_pass(const scalar_t* S, const acc_t* g, int64_t n,
                                             int64_t m, Use&& use) {
  for (int64_t i = warp_id(); i < n; i += BLOCK / 32) {
    const scalar_t* row = S + i * m;
    Lse<acc_t> s = math::lse_empty<acc_t>();
    for (int64_t j = lane_id(); j < m; j += 32) math::lse_push(s, to_acc(row[j]) + g[j]);
    const acc_t lse = math::lse_value(warp_lse(s));
    if (lane_id() == 0) use(i, lse);
  }
}

// Column LSEs, LSE_i(S_ij + f_i): a thread per column, so consecutive threads read consecutive
// entries of each row (coalesced); f_i is a broadcast load. The thread then calls use(j, lse).
// A thread walks its column in four independent running LSEs (rows i, i + 1, i + 2, i + 3),
// merged at the end: one chain of dependent pushes would leave the thread waiting on each
// exponential (the first H100 run found the block kernels latency-bound, with a block per
// problem and few warps per SM).
template <int BLOCK, typename scalar_t, typename acc_t, typename Use>
__device__ __forceinline__ void col_lse_pass(const scalar_t* S, const acc_t* f, int64_t n,
                                             int64_t m, Use&& use) {
  constexpr int kChains = 4;
  for (int64_t j = threadIdx.x; j < m; j += BLOCK) {
    Lse<acc_t> s[kChains];
#pragma unroll
    for (int c = 0; c < kChains; ++c) s[c] = math::lse_empty<acc_t>();
    int64_t i = 0;
    for (; i + kChains <= n; i += kChains) {
#pragma unroll
      for (int c = 0; c < kChains; ++c)
        math::lse_push(s[c], to_acc(S[(i + c) * m + j]) + f[i + c]);
    }
    for (; i < n; ++i) math::lse_push(s[0], to_acc(S[i * m + j]) + f[i]);
    const Lse<acc_t> total =
        math::lse_merge(math::lse_merge(s[0], s[1]), math::lse_merge(s[2], s[3]));
    use(j, math::lse_value(total));
  }
}


// Block size by problem size, as a compile-time constant for fn: about 32 or more entries per
// thread per pass, and a single warp for tiny problems (mHC's 4x4) so that large batches of
// them fill the GPU with many small blocks. Shared by every kernel so their launches agree.
template <typename F>
void block_size_switch(int64_t entries, F&& fn) {
  if (entries <= 1024) {
    fn(std::integral_constant<int, 32>{});
  } else if (entries <= 4096) {
    fn(std::integral_constant<int, 64>{});
  } else if (entries <= 16384) {
    fn(std::integral_constant<int, 128>{});
  } else {
    fn(std::integral_constant<int, 256>{});
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

// Copies a problem's scores to shared memory (when staged) and returns where the passes should
// read them. Contains a barrier before the copy (earlier readers of the buffer are done) and
// after it (the copy is complete): every thread of the block must call it.
template <int BLOCK, typename scalar_t>
__device__ const scalar_t* stage_scores(const scalar_t* S, int64_t nm, bool staged) {
  if (!staged) return S;
  extern __shared__ __align__(16) unsigned char staged_scores[];
  scalar_t* dst = reinterpret_cast<scalar_t*>(staged_scores);
  __syncthreads();
  for (int64_t k = threadIdx.x; k < nm; k += BLOCK) dst[k] = S[k];
  __syncthreads();
  return dst;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory: above the default 48 KiB a kernel
// must opt in (up to the device's limit, which the callers check).
template <typename... P>
void allow_dynamic_shared(void (*kernel)(P...), size_t bytes) {
  if (bytes > 48 * 1024)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         static_cast<int>(bytes));
}

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
template <typename scalar_t, typename Params, typename KernelFor>
void launch_per_problem(const Params& p, cudaStream_t stream, KernelFor&& kernel_for) {
  const unsigned grid = blocks_for(p.B, 1);
  const size_t smem = staged_bytes(p.n, p.m, sizeof(scalar_t));
  Params q = p;
  q.staged = smem > 0;
  block_size_switch(p.n * p.m, [&](auto block) {
    auto* kernel = kernel_for(block);
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
