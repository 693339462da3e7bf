// CUDA forward of the log-domain Sinkhorn operator (MATH.md section 1), every formula from
// sinkhorn_math.h.
//
// Work mapping: thread block b owns problem b for all its steps, so problems never wait for each
// other and each stops on its own without leaving the device. Within a block, row passes give a
// warp to each row and column passes a thread to each column, so loads of S are coalesced in
// both. The potentials live in the outputs f and g; the workspace holds, per problem, the
// default log-marginals and one LSE per row or column. When S fits (kernel_common.cuh,
// staged_bytes), the block first copies it to shared memory and every step reads it there.
#include "sinkhorn_kernel.h"

#include <algorithm>
#include <climits>
#include <cstdint>

#include "kernel_common.cuh"

namespace sinkhorn {
namespace {

using namespace dev;

// One problem's slices of the batched arrays.
template <typename scalar_t>
struct Problem {
  using acc_t = typename AccOf<scalar_t>::type;
  const scalar_t* S;   // (n, m)
  scalar_t* P;         // (n, m)
  acc_t* f;            // (n), the row potentials, rewritten in place by row steps
  acc_t* g;            // (m), the column potentials
  const acc_t* log_a;  // (n), the caller's or the defaults in the workspace
  const acc_t* log_b;  // (m)
  acc_t* lse;          // (max(n, m)) workspace: LSEs awaiting the stop decision
  int64_t n, m;
};

// Row step, f_i <- log a_i - LSE_j(S_ij + g_j), on row_lse_pass (a warp per row). With `defer`
// the LSE waits in the scratch for the stop decision and lane 0 adds the row's error under the
// current f; otherwise f_i is updated at once (nobody else reads f in a row step). Returns this
// thread's error part.
template <int BLOCK, typename scalar_t, typename acc_t = typename AccOf<scalar_t>::type>
__device__ acc_t row_pass(const Problem<scalar_t>& q, bool defer) {
  acc_t err = 0;
  row_lse_pass<BLOCK>(q.S, q.g, q.n, q.m, [&](int64_t i, acc_t lse) {
    if (defer) {
      err += math::marginal_error(q.log_a[i], lse, q.f[i]);
      q.lse[i] = lse;
    } else {
      q.f[i] = math::potential(q.log_a[i], lse);
    }
  });
  return err;
}

// Column step, g_j <- log b_j - LSE_i(S_ij + f_i), on col_lse_pass (a thread per column).
// `defer` as above.
template <int BLOCK, typename scalar_t, typename acc_t = typename AccOf<scalar_t>::type>
__device__ acc_t col_pass(const Problem<scalar_t>& q, bool defer) {
  acc_t err = 0;
  col_lse_pass<BLOCK>(q.S, q.f, q.n, q.m, [&](int64_t j, acc_t lse) {
    if (defer) {
      err += math::marginal_error(q.log_b[j], lse, q.g[j]);
      q.lse[j] = lse;
    } else {
      q.g[j] = math::potential(q.log_b[j], lse);
    }
  });
  return err;
}

// Writes P = exp(S + f ⊕ g) with a warp per row and returns (to every thread) the L1 error of the
// row sums, sum_i |sum_j P_ij - a_i|, accumulated in acc_t before the plan is rounded.
template <int BLOCK, typename scalar_t, typename acc_t = typename AccOf<scalar_t>::type>
__device__ acc_t write_plan_rows(const Problem<scalar_t>& q) {
  acc_t err = 0;
  for (int64_t i = warp_id(); i < q.n; i += BLOCK / 32) {  // warp-uniform: the sum needs all lanes
    const acc_t sum = warp_sum(plan_row(q.S + i * q.m, q.f[i], q.g, q.P + i * q.m, q.m));
    if (lane_id() == 0) err += fabs(sum - math::exp_(q.log_a[i]));
  }
  return block_sum<BLOCK>(err);
}

// The same with a thread per column (coalesced stores) and the error of the column sums.
template <int BLOCK, typename scalar_t, typename acc_t = typename AccOf<scalar_t>::type>
__device__ acc_t write_plan_cols(const Problem<scalar_t>& q) {
  acc_t err = 0;
  for (int64_t j = threadIdx.x; j < q.m; j += BLOCK) {
    const acc_t gj = q.g[j];
    acc_t sum = 0;
    load_then_update<acc_t>(
        0, q.n, 1,
        [&](int64_t i) { return Inputs<acc_t>{{to_acc(q.S[i * q.m + j]), q.f[i], 0, 0}}; },
        [&](int64_t i, const Inputs<acc_t>& in) {
          const acc_t v = math::exp_(in.v[0] + in.v[1] + gj);
          store(q.P + i * q.m + j, v);
          sum += v;
        });
    err += fabs(sum - math::exp_(q.log_b[j]));
  }
  return block_sum<BLOCK>(err);
}

// Block b (grid-stride, in case B exceeds the grid limit) solves problem b alone. All control
// flow that reaches a barrier depends only on block-uniform values (k, the broadcast error), so
// every thread takes it. A step's potentials are published by the barrier that ends it.
template <typename scalar_t, int BLOCK>
__global__ void __launch_bounds__(BLOCK) forward_kernel(const FwdParams p) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t n = p.n, m = p.m, ws_stride = n + m + (n > m ? n : m);
  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {
    acc_t* ws = static_cast<acc_t*>(p.workspace) + b * ws_stride;
    Problem<scalar_t> q;
    q.S = stage_scores<BLOCK>(static_cast<const scalar_t*>(p.scores) + b * n * m, n * m,
                              p.staged);
    q.P = static_cast<scalar_t*>(p.plan) + b * n * m;
    q.f = static_cast<acc_t*>(p.f) + b * n;
    q.g = static_cast<acc_t*>(p.g) + b * m;
    q.lse = ws + n + m;
    q.n = n;
    q.m = m;
    for (int64_t t = threadIdx.x; t < n; t += BLOCK) q.f[t] = acc_t(0);
    for (int64_t t = threadIdx.x; t < m; t += BLOCK) q.g[t] = acc_t(0);
    if (p.log_a != nullptr) {
      q.log_a = static_cast<const acc_t*>(p.log_a) + b * n;
      q.log_b = static_cast<const acc_t*>(p.log_b) + b * m;
    } else {
      default_marginals<BLOCK>(q.S, n, m, q.lse, ws, ws + n);
      q.log_a = ws;
      q.log_b = ws + n;
    }
    acc_t mass = 0;
    for (int64_t i = threadIdx.x; i < n; i += BLOCK) mass += math::exp_(q.log_a[i]);
    // Also the barrier that publishes the zeroed potentials and the default marginals.
    const acc_t threshold = static_cast<acc_t>(p.tol) * block_sum<BLOCK>(mass);

    int64_t k = 0;
    bool stopped = false;
    acc_t stop_error = 0;
    for (; k < p.steps; ++k) {
      const bool row = is_row_step(k, p.start_row);
      // Stopping (MATH.md section 1): before step k >= 1, the error of the marginal this step
      // fixes, under the current potentials, decides whether to run it.
      const bool check = p.tol > 0 && k >= 1;
      acc_t err = row ? row_pass<BLOCK>(q, check) : col_pass<BLOCK>(q, check);
      if (check) {
        err = block_sum<BLOCK>(err);  // the same value in every thread: a uniform decision
        if (err <= threshold) {
          stopped = true;
          stop_error = err;
          break;
        }
        acc_t* pot = row ? q.f : q.g;
        const acc_t* log_marg = row ? q.log_a : q.log_b;
        const int64_t len = row ? n : m;
        for (int64_t t = threadIdx.x; t < len; t += BLOCK)
          pot[t] = math::potential(log_marg[t], q.lse[t]);
      }
      __syncthreads();
    }
    // The reported error is of the marginal that step k would fix (the last step left it).
    const acc_t plan_error =
        is_row_step(k, p.start_row) ? write_plan_rows<BLOCK>(q) : write_plan_cols<BLOCK>(q);
    if (threadIdx.x == 0) {
      p.steps_used[b] = k;
      static_cast<acc_t*>(p.error)[b] = stopped ? stop_error : plan_error;
    }
  }
}

template <typename scalar_t>
void launch_typed(const FwdParams& p, cudaStream_t stream) {
  launch_per_problem<scalar_t>(p, stream, [](auto block) {
    return &forward_kernel<scalar_t, decltype(block)::value>;
  });
}

}  // namespace

size_t forward_workspace_bytes(const FwdParams& p) {
  if (tiny_forward_applies(p)) return 0;
  if (large_forward_applies(p)) return large_forward_workspace_bytes(p);
  // Per problem: default log a (n), default log b (m), and the LSE scratch (max(n, m)).
  return static_cast<size_t>(p.B * (p.n + p.m + std::max(p.n, p.m))) * acc_bytes(p.dtype);
}

void launch_forward(const FwdParams& p, cudaStream_t stream) {
  if (p.B == 0) return;
  if (tiny_forward_applies(p)) return launch_tiny_forward(p, stream);
  if (large_forward_applies(p)) return launch_large_forward(p, stream);
  dtype_switch(p.dtype,
               [&](auto tag) { launch_typed<typename decltype(tag)::type>(p, stream); });
}

}  // namespace sinkhorn
