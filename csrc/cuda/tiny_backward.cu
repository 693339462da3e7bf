// CUDA tiny path of the unrolled backward (n, m <= 8, 4 in float64, and at most 64 steps, e.g.
// mHC's 4 x 4 with 40 steps): a thread per problem, padded to 4 x 4 or 8 x 8 in registers, the
// replay and the reversed steps of tiny_problem.h (checked on the host by the GoogleTest suite).
// One read of S and dL/dP, one write of dL/dS per problem; no workspace. Each thread's step LSEs
// (max_steps x NMAX) live in dynamic shared memory (math::History) where a block's 128 of them
// fit (dev::history_bytes: 4 x 4 fp32 up to 48 steps), or in a local array elsewhere and under
// SINKHORN_CUDA_HISTORY=local (the H200 run: the mHC backward's local history cost about 2 GB of
// local-memory traffic at 1M problems; this kernel's took 2.06 ms there against the forward's
// 0.73).
#include <cstdint>

#include "../env_flag.h"
#include "tiny_common.cuh"
#include "sinkhorn_kernel.h"

namespace sinkhorn {
namespace {

using namespace dev;

template <int NMAX, typename scalar_t, bool SHARED_HISTORY>
__global__ void __launch_bounds__(kTinyThreads) tiny_backward_kernel(const BwdParams p) {
  using acc_t = typename AccOf<scalar_t>::type;
  using Problem = TinyProblem<NMAX, acc_t>;
  const int n = static_cast<int>(p.n), m = static_cast<int>(p.m);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < p.B;
       b += stride) {
    Problem q;
    load_tiny<scalar_t>(p, b, q);
    acc_t ds[NMAX * NMAX], uf[NMAX], ug[NMAX], dla[NMAX], dlb[NMAX];
    const scalar_t* G = static_cast<const scalar_t*>(p.grad_plan) + b * n * m;
    SK_UNROLL
    for (int i = 0; i < NMAX; ++i)
      SK_UNROLL
      for (int j = 0; j < NMAX; ++j)
        ds[i * NMAX + j] = i < n && j < m ? to_acc(G[i * m + j]) : acc_t(0);
    const acc_t* gf = static_cast<const acc_t*>(p.grad_f);
    const acc_t* gg = static_cast<const acc_t*>(p.grad_g);
    SK_UNROLL
    for (int a = 0; a < NMAX; ++a) {
      uf[a] = (gf != nullptr && a < n) ? gf[b * n + a] : acc_t(0);
      ug[a] = (gg != nullptr && a < m) ? gg[b * m + a] : acc_t(0);
    }
    int64_t steps = p.steps_used[b];
    steps = steps < 0 ? 0 : (steps > p.max_steps ? p.max_steps : steps);
    if constexpr (SHARED_HISTORY) {
      extern __shared__ __align__(16) unsigned char tiny_history[];
      const math::History<acc_t> hist{reinterpret_cast<acc_t*>(tiny_history) + threadIdx.x,
                                      static_cast<int>(blockDim.x)};
      q.backward(steps, p.start_row, hist, ds, uf, ug, dla, dlb);
    } else {
      acc_t hist[Problem::kMaxBackwardSteps * NMAX];
      q.backward(steps, p.start_row, hist, ds, uf, ug, dla, dlb);
    }
    store_tiny<NMAX>(static_cast<scalar_t*>(p.grad_scores) + b * n * m, n, m,
                     [&](int i, int j) { return ds[i * NMAX + j]; },
                     static_cast<acc_t*>(p.grad_log_a) + b * n, dla,
                     static_cast<acc_t*>(p.grad_log_b) + b * m, dlb);
  }
}

template <typename scalar_t>
void launch_typed(const BwdParams& p, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  tiny_switch(p.n, p.m, [&](auto pad) {
    constexpr int NMAX = decltype(pad)::value;
    const size_t per_thread = static_cast<size_t>(p.max_steps) * NMAX * sizeof(acc_t);
    launch_with_history(&tiny_backward_kernel<NMAX, scalar_t, false>,
                        &tiny_backward_kernel<NMAX, scalar_t, true>,
                        blocks_for(p.B, kTinyThreads), kTinyThreads, per_thread, stream, p);
  });
}

}  // namespace

bool tiny_backward_applies(const BwdParams& p) {
  static const bool disabled =
      env_is("SINKHORN_CUDA_BACKWARD", "block") || env_is("SINKHORN_CUDA_BACKWARD", "composite");
  // float64 up to 4 x 4 only: its 8 x 8 thread would need 4 KB of local memory, which the
  // driver reserves for every resident thread.
  const int64_t side = p.dtype == DType::Float64 ? 4 : 8;
  return !disabled && p.n >= 1 && p.m >= 1 && p.n <= side && p.m <= side &&
         p.max_steps <= TinyProblem<8, float>::kMaxBackwardSteps;
}

void launch_tiny_backward(const BwdParams& p, cudaStream_t stream) {
  if (p.B == 0) return;
  dtype_switch(p.dtype,
               [&](auto tag) { launch_typed<typename decltype(tag)::type>(p, stream); });
}

}  // namespace sinkhorn
