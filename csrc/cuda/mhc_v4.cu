// CUDA kernel of the DeepSeek-V4 mHC Sinkhorn and of the paper's (V4 on the transpose with
// eps = 0), forward and backward: a thread per problem, the n x n problem in registers, the
// per-problem math of mhc_v4_math.h (the CPU kernel runs the same functions on SIMD lanes, so
// the CPU tests check this math). One read of the logits (and of dL/dcomb) and one write per
// problem, in 16-byte words where n * n values fill whole words and the tensors are aligned. The
// float32 forward keeps everything in registers (ptxas, sm_90: no stack at any n; float64 from
// n = 3 on still has some).
//
// The backward recomputes the forward in the thread and keeps each normalisation's divisors,
// (2 iters - 1) x n values, for the walk back. The second GPU run (H200) measured that history in
// local memory at 0.48 ms for 1M problems of 4 x 4 against 0.152 ms for the forward: about 2 GB of
// local-memory traffic. It now lives in dynamic shared memory, entry k of consecutive threads in
// consecutive words (math::History), where a block's 128 histories fit (dev::history_bytes: fp32
// n = 4 up to 24 iterations); elsewhere, and under SINKHORN_CUDA_HISTORY=local, in a local array
// as before.
#include <cstdint>

#include "../mhc_v4_math.h"
#include "../n_switch.h"
#include "kernel_common.cuh"
#include "mhc_problem.cuh"
#include "sinkhorn_kernel.h"

namespace sinkhorn {
namespace {

using dev::aligned16;
using dev::blocks_for;

constexpr int kThreads = 128;

// Problem b's NN values from src into x (mhc::load_row), each transposed for the paper's
// variant (a compile-time permutation of registers).
template <int N, typename T>
__device__ __forceinline__ void load_problem(const T* src, int64_t b, T* x, bool words,
                                             bool transpose) {
  constexpr int NN = N * N;
  T raw[NN];
  mhc::load_row<NN>(src, b, raw, words);
#pragma unroll
  for (int k = 0; k < NN; ++k) x[k] = transpose ? raw[v4::transposed(k, N)] : raw[k];
}

// x into problem b of dst, the inverse of load_problem.
template <int N, typename T>
__device__ __forceinline__ void store_problem(T* dst, int64_t b, const T* x, bool words,
                                              bool transpose) {
  constexpr int NN = N * N;
  T raw[NN];
#pragma unroll
  for (int k = 0; k < NN; ++k) raw[transpose ? v4::transposed(k, N) : k] = x[k];
  mhc::store_row<NN>(dst, b, raw, words);
}

// Problems [blockIdx.x * blockDim.x, ...) one per thread, in a grid-stride loop
// (mhc::run_problem). With paper set, each problem is loaded and stored transposed. BACKWARD:
// out = dL/dlogits from grad = dL/dcomb, the divisors in shared memory (SHARED_HISTORY) or a
// local array; the forward keeps no history at all.
template <int N, typename T, bool BACKWARD, bool SHARED_HISTORY>
__global__ void __launch_bounds__(kThreads)
    mhc_v4_kernel(const T* __restrict__ logits, const T* __restrict__ grad, T* __restrict__ out,
                  int64_t B, int iters, T eps, bool paper, bool words) {
  constexpr int NN = N * N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += stride) {
    T x[NN], g[NN];
    load_problem<N>(logits, b, x, words, paper);
    if constexpr (BACKWARD) load_problem<N>(grad, b, g, words, paper);
    mhc::run_problem<N, T, BACKWARD, SHARED_HISTORY>(x, g, iters, eps, paper);
    store_problem<N>(out, b, g, words, paper);
  }
}

template <typename T>
void launch_typed(const V4Params& p, cudaStream_t stream) {
  const bool words = aligned16(p.logits) && aligned16(p.out) &&
                     (p.grad == nullptr || aligned16(p.grad));
  n_switch<v4::kMaxN>(p.n, [&](auto n) {  // the front door admits n <= kMaxN only
    constexpr int N = decltype(n)::value;
    const T* logits = static_cast<const T*>(p.logits);
    const T* grad = static_cast<const T*>(p.grad);
    T* out = static_cast<T*>(p.out);
    const T eps = static_cast<T>(p.eps);
    if (grad == nullptr) {
      mhc_v4_kernel<N, T, false, false><<<blocks_for(p.B, kThreads), kThreads, 0, stream>>>(
          logits, grad, out, p.B, p.iters, eps, p.paper, words);
      return;
    }
    const size_t per_thread = static_cast<size_t>(v4::normalisations(p.iters)) * N * sizeof(T);
    dev::launch_with_history(&mhc_v4_kernel<N, T, true, false>, &mhc_v4_kernel<N, T, true, true>,
                             blocks_for(p.B, kThreads), kThreads, per_thread, stream, logits,
                             grad, out, p.B, p.iters, eps, p.paper, words);
  });
}

}  // namespace

void launch_mhc_v4(const V4Params& p, cudaStream_t stream) {
  if (p.B == 0) return;
  if (p.dtype == DType::Float64) {
    launch_typed<double>(p, stream);
  } else {
    launch_typed<float>(p, stream);
  }
}

}  // namespace sinkhorn
