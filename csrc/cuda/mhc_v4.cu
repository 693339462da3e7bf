// CUDA kernel of the DeepSeek-V4 mHC Sinkhorn and of the paper's (V4 on the transpose with
// eps = 0), forward and backward: a thread per problem, the n x n problem in registers, the
// per-problem math of mhc_v4_math.h (the CPU kernel runs the same functions on SIMD lanes, so
// the CPU tests check this math). One read of the logits (and of dL/dcomb) and one write per
// problem; the backward recomputes the forward in the thread and keeps its divisors in a local
// array of (2 kMaxIters - 1) x n. The float32 forward keeps everything in registers (ptxas, sm_90:
// no stack at any n; float64 from n = 3 on still has some).
#include <cstdint>

#include "../mhc_v4_math.h"
#include "../n_switch.h"
#include "kernel_common.cuh"
#include "sinkhorn_kernel.h"

namespace sinkhorn {
namespace {

using dev::blocks_for;

template <typename T>
struct DeviceOps {
  using E = T;
  static SK_HD T exp(T x) { return math::exp_(x); }
  static SK_HD T log(T x) { return math::log_(x); }
  static SK_HD T max(T a, T b) { return a > b ? a : b; }
};

constexpr int kThreads = 128;

// Problems [blockIdx.x * kThreads, ...) one per thread, in a grid-stride loop. With paper set,
// each problem is loaded and stored transposed, eps is 0, and a problem the linear domain
// cannot take runs the log-domain twin (V4Params::paper). BACKWARD: out = dL/dlogits from
// grad = dL/dcomb, with the divisors in a local array; the forward has no local array at all.
template <int N, typename T, bool BACKWARD>
__global__ void __launch_bounds__(kThreads)
    mhc_v4_kernel(const T* __restrict__ logits, const T* __restrict__ grad, T* __restrict__ out,
                  int64_t B, int iters, T eps, bool paper) {
  using Problem = v4::Problem<N, T, DeviceOps<T>>;
  constexpr int NN = N * N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; b < B; b += stride) {
    T x[NN], g[NN];
#pragma unroll
    for (int k = 0; k < NN; ++k) x[k] = logits[b * NN + (paper ? v4::transposed(k, N) : k)];
    const bool in_log = paper && Problem::needs_log_domain(x);
    if constexpr (BACKWARD) {
      T hist[(2 * v4::kMaxIters - 1) * N];
#pragma unroll
      for (int k = 0; k < NN; ++k) g[k] = grad[b * NN + (paper ? v4::transposed(k, N) : k)];
      if (in_log) {
        Problem::log_backward(x, g, iters, hist);
      } else {
        Problem::backward(x, g, iters, eps, hist);
      }
    } else {
#pragma unroll
      for (int k = 0; k < NN; ++k) g[k] = x[k];
      if (in_log) {
        Problem::log_forward(g, iters);
      } else {
        Problem::forward(g, iters, eps, nullptr);
      }
    }
#pragma unroll
    for (int k = 0; k < NN; ++k) out[b * NN + (paper ? v4::transposed(k, N) : k)] = g[k];
  }
}

template <typename T>
void launch_typed(const V4Params& p, cudaStream_t stream) {
  n_switch<v4::kMaxN>(p.n, [&](auto n) {  // the front door admits n <= kMaxN only
    constexpr int N = decltype(n)::value;
    auto kernel = p.grad != nullptr ? &mhc_v4_kernel<N, T, true> : &mhc_v4_kernel<N, T, false>;
    kernel<<<blocks_for(p.B, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(p.logits), static_cast<const T*>(p.grad), static_cast<T*>(p.out),
        p.B, p.iters, static_cast<T>(p.eps), p.paper);
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
