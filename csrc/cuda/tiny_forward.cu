// CUDA tiny path of the forward (n, m <= 8, e.g. mHC's 4 x 4, millions per call): a thread per
// problem, padded to 4 x 4 or 8 x 8 and held in registers (tiny_problem.h, whose math the
// GoogleTest suite checks on the host), all steps in one kernel, one read of S and one write of
// P. Per-problem early stopping is the thread's own loop exit: no host synchronisation.
#include <cstdint>

#include "../env_flag.h"
#include "tiny_common.cuh"
#include "sinkhorn_kernel.h"

namespace sinkhorn {
namespace {

using namespace dev;

constexpr int64_t kTinyMaxSide = 8;

template <int NMAX, typename scalar_t>
__global__ void __launch_bounds__(kTinyThreads) tiny_forward_kernel(const FwdParams p) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int n = static_cast<int>(p.n), m = static_cast<int>(p.m);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kTinyThreads;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kTinyThreads + threadIdx.x; b < p.B;
       b += stride) {
    TinyProblem<NMAX, acc_t> q;
    load_tiny<scalar_t>(p, b, q);
    acc_t error;
    // The scaling form: a multiplication an entry a step instead of an exponential, which
    // bounds a log-domain step on problems this small. Not for 8 x 8 in float64, whose K would
    // not fit in a thread's registers (ptxas: about 1 KB of local memory); it steps in the log
    // domain.
    int64_t used;
    if constexpr (NMAX == 4 || sizeof(acc_t) == sizeof(float)) {
      used = q.solve_scaled(p.steps, p.start_row, p.tol, &error);
    } else {
      used = q.solve(p.steps, p.start_row, p.tol, &error);
    }
    store_tiny<NMAX>(static_cast<scalar_t*>(p.plan) + b * n * m, n, m,
                     [&](int i, int j) { return q.plan(i, j); },
                     static_cast<acc_t*>(p.f) + b * n, q.f, static_cast<acc_t*>(p.g) + b * m, q.g);
    p.steps_used[b] = used;
    static_cast<acc_t*>(p.error)[b] = error;
  }
}

template <typename scalar_t>
void launch_typed(const FwdParams& p, cudaStream_t stream) {
  tiny_switch(p.n, p.m, [&](auto pad) {
    tiny_forward_kernel<decltype(pad)::value, scalar_t>
        <<<blocks_for(p.B, kTinyThreads), kTinyThreads, 0, stream>>>(p);
  });
}

}  // namespace

bool tiny_forward_applies(const FwdParams& p) {
  static const bool disabled =
      env_is("SINKHORN_CUDA_FORWARD", "block") || env_is("SINKHORN_CUDA_FORWARD", "large");
  return !disabled && p.n >= 1 && p.m >= 1 && p.n <= kTinyMaxSide && p.m <= kTinyMaxSide;
}

void launch_tiny_forward(const FwdParams& p, cudaStream_t stream) {
  if (p.B == 0) return;
  dtype_switch(p.dtype,
               [&](auto tag) { launch_typed<typename decltype(tag)::type>(p, stream); });
}

}  // namespace sinkhorn
