// CUDA unrolled backward of the log-domain Sinkhorn operator (MATH.md section 2.1): the exact
// gradient of the steps the forward ran, the same algorithm as the CPU kernel, every formula from
// sinkhorn_math.h.
//
// Work mapping: thread block b owns problem b (grid-stride), as in the forward, so each problem
// replays and reverses its own step count without waiting for the others. The replay uses the
// forward's LSE passes (kernel_common.cuh) and records every step's LSE in the workspace: the
// O(K(n + m)) memory of the unrolled gradient. Reverse row steps give a thread to each column,
// walking down the rows: S and dS are read coalesced, u_f and the LSE are broadcast loads, and the
// column sum stays in a register. Reverse column steps give a warp to each row, lanes striding
// over the columns, and a warp sum gives the row sum. Within a phase every value of dS, u_f and
// u_g has exactly one writer, and a barrier ends each phase: no atomics.
#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "kernel_common.cuh"
#include "sinkhorn_kernel.h"

namespace sinkhorn {
namespace {

using namespace dev;

// Accumulation-type values of workspace per problem: default log a (n) and log b (m), the
// replayed potentials f (n) and g (m), the upstream gradients u_f (n) and u_g (m), one LSE row
// per step (max_steps x max(n, m)), and, when the scores are half or bfloat16, an n x m dS
// accumulator so that the reverse steps do not round dS after every subtraction.
__host__ __device__ inline int64_t problem_stride(int64_t n, int64_t m, int64_t max_steps,
                                                  bool ds_buffer) {
  return 3 * (n + m) + max_steps * (n > m ? n : m) + (ds_buffer ? n * m : 0);
}

// One problem's slices of the batched arrays and of the workspace.
template <typename scalar_t>
struct Problem {
  using acc_t = typename AccOf<scalar_t>::type;
  const scalar_t* S;          // (n, m), masked entries -inf
  const scalar_t* G;          // (n, m), dL/dP
  const acc_t* log_a;         // (n), the caller's or the defaults in the workspace
  const acc_t* log_b;         // (m)
  acc_t *f, *g;               // (n), (m): the potentials after the replay
  acc_t *u_f, *u_g;           // (n), (m): dL/df, dL/dg flowing back through the steps
  acc_t* lse;                 // (max_steps, L): step t's row or column LSEs at lse + t * L
  acc_t* dS;                  // (n, m): grad_scores itself for float/double, else the workspace
  acc_t *grad_log_a, *grad_log_b;
  int64_t n, m, L;
};

// Forward replay with tol = 0 for K steps, recording each step's LSE. The passes and their order
// are the block forward's, so the potentials are its bit for bit (the tiny and large forward
// paths sum in other orders: equal up to rounding).
template <int BLOCK, typename scalar_t, typename acc_t = typename AccOf<scalar_t>::type>
__device__ void replay(const Problem<scalar_t>& q, int64_t K, bool start_row) {
  for (int64_t t = 0; t < K; ++t) {  // K is block-uniform: every thread meets each barrier
    acc_t* rec = q.lse + t * q.L;
    if (is_row_step(t, start_row)) {
      row_lse_pass<BLOCK>(q.S, q.g, q.n, q.m, [&](int64_t i, acc_t lse) {
        rec[i] = lse;
        q.f[i] = math::potential(q.log_a[i], lse);
      });
    } else {
      col_lse_pass<BLOCK>(q.S, q.f, q.n, q.m, [&](int64_t j, acc_t lse) {
        rec[j] = lse;
        q.g[j] = math::potential(q.log_b[j], lse);
      });
    }
    __syncthreads();  // publishes the step's potential to the next step's readers
  }
}

// The output P = exp(S + f ⊕ g) (MATH.md section 2.1): dS = Γ = Ḡ ⊙ P, u_g = dL/dg + Γᵀ1 by
// column sums (column_sums: a thread, or a few threads, per column), then, after a barrier,
// u_f = dL/df + Γ1 with a warp per row re-reading dS. Also zeroes d(log a) and d(log b).
template <int BLOCK, typename scalar_t, typename acc_t = typename AccOf<scalar_t>::type>
__device__ void gamma_pass(const Problem<scalar_t>& q, const acc_t* grad_f, const acc_t* grad_g) {
  const int64_t n = q.n, m = q.m;
  column_sums<BLOCK, acc_t>(
      n, m, [&](int64_t j) { return q.g[j]; },
      [&](int64_t i, int64_t j) {
        return Inputs<acc_t>{{to_acc(q.G[i * m + j]), to_acc(q.S[i * m + j]), q.f[i], 0}};
      },
      [&](int64_t i, int64_t j, acc_t gj, const Inputs<acc_t>& in) {
        const acc_t gamma = in.v[0] * math::exp_(in.v[1] + in.v[2] + gj);
        q.dS[i * m + j] = gamma;
        return gamma;
      },
      [&](int64_t j, acc_t sum) {
        q.u_g[j] = (grad_g != nullptr ? grad_g[j] : acc_t(0)) + sum;
        q.grad_log_b[j] = 0;
      });
  for (int64_t i = threadIdx.x; i < n; i += BLOCK) q.grad_log_a[i] = 0;
  __syncthreads();  // dS of every column is complete before the row sums read it
  for (int64_t i = warp_id(); i < n; i += BLOCK / 32) {  // warp-uniform: the sum needs all lanes
    acc_t sum = 0;
    for (int64_t j = lane_id(); j < m; j += 32) sum += q.dS[i * m + j];
    sum = warp_sum(sum);
    if (lane_id() == 0) q.u_f[i] = (grad_f != nullptr ? grad_f[i] : acc_t(0)) + sum;
  }
  __syncthreads();
}

// Reverse of row step t, f_i = log a_i - LSE_j(S_ij + g_j) (MATH.md section 2.1). With
// R_ij = exp(S_ij + g_j - lse_t[i]), g as step t read it: dS -= u_f ⊙ R, u_g -= Rᵀ u_f and
// d(log a_i) += u_f_i on rows that have an allowed entry. Column sums (column_sums) walk down
// the rows.
// The step consumed u_f (it overwrote f), but other threads still read u_f here, so instead of
// zeroing it the next reverse step that writes it (column step t - 1) overwrites rather than adds.
// Likewise u_g restarts from zero when column step t + 1 consumed it.
template <int BLOCK, typename scalar_t, typename acc_t = typename AccOf<scalar_t>::type>
__device__ void reverse_row_step(const Problem<scalar_t>& q, int64_t t, int64_t K) {
  const int64_t n = q.n, m = q.m;
  const acc_t* lse = q.lse + t * q.L;
  const bool restart = t + 1 < K;
  column_sums<BLOCK, acc_t>(
      n, m,
      [&](int64_t j) {  // step t - 1 was the column step that last set g; before step 0, g = 0
        return t > 0 ? math::potential(q.log_b[j], q.lse[(t - 1) * q.L + j]) : acc_t(0);
      },
      [&](int64_t i, int64_t j) {
        return Inputs<acc_t>{{q.u_f[i], to_acc(q.S[i * m + j]), lse[i], q.dS[i * m + j]}};
      },
      [&](int64_t i, int64_t j, acc_t gb, const Inputs<acc_t>& in) {
        const acc_t w = in.v[0] * math::step_weight(in.v[1] + gb, in.v[2]);
        q.dS[i * m + j] = in.v[3] - w;
        return w;
      },
      [&](int64_t j, acc_t sum) { q.u_g[j] = (restart ? acc_t(0) : q.u_g[j]) - sum; });
  for (int64_t i = threadIdx.x; i < n; i += BLOCK)
    if (lse[i] > math::neg_inf<acc_t>()) q.grad_log_a[i] += q.u_f[i];
}

// Reverse of column step t, symmetrically: C_ij = exp(S_ij + f_i - lse_t[j]); dS -= C ⊙ u_g,
// u_f -= C u_g, d(log b_j) += u_g_j. A warp per row, lanes over the columns, a warp sum of the
// row; lane 0 alone writes u_f_i.
template <int BLOCK, typename scalar_t, typename acc_t = typename AccOf<scalar_t>::type>
__device__ void reverse_col_step(const Problem<scalar_t>& q, int64_t t, int64_t K) {
  const int64_t n = q.n, m = q.m;
  const acc_t* lse = q.lse + t * q.L;
  const bool restart = t + 1 < K;
  for (int64_t i = warp_id(); i < n; i += BLOCK / 32) {  // warp-uniform: the sum needs all lanes
    const acc_t fb = t > 0 ? math::potential(q.log_a[i], q.lse[(t - 1) * q.L + i]) : acc_t(0);
    acc_t sum = 0;
    load_then_update<acc_t>(
        lane_id(), m, 32,
        [&](int64_t j) {
          return Inputs<acc_t>{{q.u_g[j], to_acc(q.S[i * m + j]), lse[j], q.dS[i * m + j]}};
        },
        [&](int64_t j, const Inputs<acc_t>& in) {
          const acc_t w = in.v[0] * math::step_weight(in.v[1] + fb, in.v[2]);
          q.dS[i * m + j] = in.v[3] - w;
          sum += w;
        });
    sum = warp_sum(sum);
    if (lane_id() == 0) q.u_f[i] = (restart ? acc_t(0) : q.u_f[i]) - sum;
  }
  for (int64_t j = threadIdx.x; j < m; j += BLOCK)
    if (lse[j] > math::neg_inf<acc_t>()) q.grad_log_b[j] += q.u_g[j];
}

// Block b (grid-stride) differentiates problem b alone. Every branch that reaches a barrier
// depends only on block-uniform values (K, t, the presence of the optional inputs).
template <typename scalar_t, int BLOCK>
__global__ void __launch_bounds__(BLOCK) backward_kernel(const BwdParams p) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr bool kDsBuffer = !std::is_same<scalar_t, acc_t>::value;
  const int64_t n = p.n, m = p.m;
  const int64_t stride = problem_stride(n, m, p.max_steps, kDsBuffer);
  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {
    acc_t* ws = static_cast<acc_t*>(p.workspace) + b * stride;
    Problem<scalar_t> q;
    q.S = stage_scores<BLOCK>(static_cast<const scalar_t*>(p.scores) + b * n * m, n * m,
                              p.staged);
    q.G = static_cast<const scalar_t*>(p.grad_plan) + b * n * m;
    q.f = ws + n + m;
    q.g = q.f + n;
    q.u_f = q.g + m;
    q.u_g = q.u_f + n;
    q.lse = q.u_g + m;
    scalar_t* grad_scores = static_cast<scalar_t*>(p.grad_scores) + b * n * m;
    if constexpr (kDsBuffer) {
      q.dS = q.lse + p.max_steps * (n > m ? n : m);
    } else {
      q.dS = grad_scores;
    }
    q.grad_log_a = static_cast<acc_t*>(p.grad_log_a) + b * n;
    q.grad_log_b = static_cast<acc_t*>(p.grad_log_b) + b * m;
    q.n = n;
    q.m = m;
    q.L = n > m ? n : m;
    // The front door cannot check steps_used without a host synchronisation; clamping keeps a
    // bad value from writing past this problem's LSE records.
    const int64_t used = p.steps_used[b];
    const int64_t K = used < 0 ? 0 : (used > p.max_steps ? p.max_steps : used);

    for (int64_t t = threadIdx.x; t < n; t += BLOCK) q.f[t] = acc_t(0);
    for (int64_t t = threadIdx.x; t < m; t += BLOCK) q.g[t] = acc_t(0);
    if (p.log_a != nullptr) {
      q.log_a = static_cast<const acc_t*>(p.log_a) + b * n;
      q.log_b = static_cast<const acc_t*>(p.log_b) + b * m;
    } else {
      // u_g is free until the gamma pass: it parks the column flags.
      default_marginals<BLOCK>(q.S, n, m, q.u_g, ws, ws + n);
      q.log_a = ws;
      q.log_b = ws + n;
    }
    __syncthreads();  // publishes the zeroed potentials and the default marginals

    replay<BLOCK>(q, K, p.start_row);
    gamma_pass<BLOCK>(q, p.grad_f ? static_cast<const acc_t*>(p.grad_f) + b * n : nullptr,
                      p.grad_g ? static_cast<const acc_t*>(p.grad_g) + b * m : nullptr);
    for (int64_t t = K - 1; t >= 0; --t) {
      if (is_row_step(t, p.start_row)) {
        reverse_row_step<BLOCK>(q, t, K);
      } else {
        reverse_col_step<BLOCK>(q, t, K);
      }
      __syncthreads();  // the step's u_f or u_g and dS are complete before the next step
    }
    if constexpr (kDsBuffer) {  // one rounding of dS, after the barrier that completed it
      for (int64_t k = threadIdx.x; k < n * m; k += BLOCK) store(grad_scores + k, q.dS[k]);
    }
  }
}

// S staged in shared memory when it fits: the replay and the reverse steps read it every step.
template <typename scalar_t>
void launch_typed(const BwdParams& p, cudaStream_t stream) {
  launch_per_problem<scalar_t>(p, stream, [](auto block) {
    return &backward_kernel<scalar_t, decltype(block)::value>;
  });
}

}  // namespace

size_t backward_workspace_bytes(const BwdParams& p) {
  if (tiny_backward_applies(p)) return 0;
  const bool half = p.dtype == DType::Float16 || p.dtype == DType::BFloat16;
  return static_cast<size_t>(p.B * problem_stride(p.n, p.m, p.max_steps, half)) *
         acc_bytes(p.dtype);
}

void launch_backward(const BwdParams& p, cudaStream_t stream) {
  if (p.B == 0) return;
  if (tiny_backward_applies(p)) return launch_tiny_backward(p, stream);
  dtype_switch(p.dtype,
               [&](auto tag) { launch_typed<typename decltype(tag)::type>(p, stream); });
}

}  // namespace sinkhorn
