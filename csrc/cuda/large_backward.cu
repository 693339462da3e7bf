// CUDA reverse steps of the unrolled backward composed for large problems
// (ops/sinkhorn_backward_composite.cpp, MATH.md section 2.1): one step's
// w = u (x) exp(S + before - lse), dS -= w and the sums of w along the step's axis, in one pass
// over S and dS instead of ATen's six, and the step's bookkeeping (the other potential from the
// previous step's LSEs, which problems ran the step, the marginal's gradient, the consumed
// upstream) in the same two launches instead of about eight ATen vector ops. The weights come
// from math::step_weight, as in the block backward (sinkhorn_backward.cu).
//   row step:    a thread per column walks a strip of rows (strip_sums.cuh; coalesced over the
//                columns), its strip's column sum into the workspace; then a thread per column
//                subtracts the strips' sums from target, and a thread per row does the
//                bookkeeping                                              (row_step, tail)
//   column step: a warp per row, lanes over the columns, a warp sum; then a thread per column
//                does the bookkeeping                                     (col_step, tail)
#include <cstdint>

#include "kernel_common.cuh"
#include "sinkhorn_kernel.h"
#include "strip_sums.cuh"

namespace sinkhorn {
namespace {

using namespace dev;

using strip_sums::strips_of;

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535;  // the grid's y and z dimensions

template <typename acc_t>
struct Step {
  const acc_t *S, *other_lm, *before_lse, *lse;
  const int64_t* steps_used;
  acc_t *dS, *u, *dl, *target, *partial;
  int64_t B, n, m, t, lse_stride, before_stride;

  explicit Step(const ReverseStepParams& p)
      : S(static_cast<const acc_t*>(p.S)),
        other_lm(static_cast<const acc_t*>(p.other_log_marginal)),
        before_lse(static_cast<const acc_t*>(p.before_lse)),
        lse(static_cast<const acc_t*>(p.lse)),
        steps_used(p.steps_used),
        dS(static_cast<acc_t*>(p.dS)),
        u(static_cast<acc_t*>(p.u)),
        dl(static_cast<acc_t*>(p.grad_log_marginal)),
        target(static_cast<acc_t*>(p.target)),
        partial(static_cast<acc_t*>(p.workspace)),
        B(p.B),
        n(p.n),
        m(p.m),
        t(p.t),
        lse_stride(p.lse_stride),
        before_stride(p.before_stride) {}

  __device__ bool ran(int64_t b) const { return steps_used[b] > t; }
  // The other axis' potential x of problem b as the step read it (other: that axis' length).
  __device__ acc_t before(int64_t b, int64_t x, int64_t other) const {
    return before_lse ? math::potential(other_lm[b * other + x], before_lse[b * before_stride + x])
                      : acc_t(0);
  }
  __device__ acc_t lse_at(int64_t b, int64_t x) const { return lse[b * lse_stride + x]; }
};

// Grid (column blocks, strips, problems). A problem that did not run the step has u = 0: its
// strip sums are 0 and dS stays.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) row_step_kernel(const Step<acc_t> q) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t strip = blockIdx.y, b = blockIdx.z;
  if (j >= q.m) return;
  acc_t* partial = q.partial + (b * strips_of(q.n) + strip) * q.m + j;
  if (!q.ran(b)) {
    *partial = 0;
    return;
  }
  const strip_sums::Rows rows = strip_sums::rows_of(strip, q.n);
  const acc_t* S = q.S + b * q.n * q.m;
  acc_t* dS = q.dS + b * q.n * q.m;
  const acc_t* u = q.u + b * q.n;
  const acc_t gb = q.before(b, j, q.m);
  acc_t sum = 0;
  load_then_update<acc_t>(
      rows.first, rows.last, 1,
      [&](int64_t i) {
        return Inputs<acc_t>{{u[i], S[i * q.m + j], q.lse_at(b, i), dS[i * q.m + j]}};
      },
      [&](int64_t i, const Inputs<acc_t>& in) {
        const acc_t w = in.v[0] * math::step_weight(in.v[1] + gb, in.v[2]);
        dS[i * q.m + j] = in.v[3] - w;
        sum += w;
      });
  *partial = sum;
}

// A warp per row (column step).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) col_step_kernel(const Step<acc_t> q) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  if (row >= q.B * q.n) return;  // warp-uniform: the sum needs every lane
  const int64_t b = row / q.n, i = row % q.n;
  if (!q.ran(b)) return;  // u = 0: nothing changes
  const acc_t* S = q.S + row * q.m;
  acc_t* dS = q.dS + row * q.m;
  const acc_t* u = q.u + b * q.m;
  const acc_t fb = q.before(b, i, q.n);
  acc_t sum = 0;
  load_then_update<acc_t>(
      lane_id(), q.m, 32,
      [&](int64_t j) { return Inputs<acc_t>{{u[j], S[j], q.lse_at(b, j), dS[j]}}; },
      [&](int64_t j, const Inputs<acc_t>& in) {
        const acc_t w = in.v[0] * math::step_weight(in.v[1] + fb, in.v[2]);
        dS[j] = in.v[3] - w;
        sum += w;
      });
  sum = warp_sum(sum);
  if (lane_id() == 0) q.target[row] -= sum;
}

// After the step kernel, a thread per entry: for a row step, target_j -= the strips' sums of
// column j (x < B * m); for both, the step axis' bookkeeping (x < B * len): where problem b ran
// the step, dl += u where the LSE is finite, then u = 0. Both touch different arrays.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) tail_kernel(const Step<acc_t> q, bool row) {
  const int64_t x = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row && x < q.B * q.m) {
    const int64_t b = x / q.m, j = x % q.m;
    q.target[x] -= strip_sums::column_total(q.partial, b, strips_of(q.n), q.m, j);
  }
  const int64_t len = row ? q.n : q.m;
  if (x < q.B * len) {
    const int64_t b = x / len;
    if (!q.ran(b)) return;
    if (q.lse_at(b, x % len) > math::neg_inf<acc_t>()) q.dl[x] += q.u[x];
    q.u[x] = 0;
  }
}

template <typename acc_t>
void launch_typed(const ReverseStepParams& p, cudaStream_t stream) {
  const Step<acc_t> q(p);
  if (p.row) {
    const dim3 grid(static_cast<unsigned>((p.m + kThreads - 1) / kThreads),
                    static_cast<unsigned>(strips_of(p.n)), static_cast<unsigned>(p.B));
    row_step_kernel<acc_t><<<grid, kThreads, 0, stream>>>(q);
  } else {
    col_step_kernel<acc_t><<<blocks_for(p.B * p.n * 32, kThreads), kThreads, 0, stream>>>(q);
  }
  const int64_t tail = p.B * (p.row ? (p.m > p.n ? p.m : p.n) : p.m);
  tail_kernel<acc_t><<<blocks_for(tail, kThreads), kThreads, 0, stream>>>(q, p.row);
}

}  // namespace

bool reverse_step_fits(const ReverseStepParams& p) {
  // The grid's y and z (row step), and x of the column step's warp per row and the tail's
  // thread per entry, which have no grid-stride loop.
  const int64_t max_x = int64_t(0x7fffffff) * kThreads;
  return p.B <= kMaxGrid && strips_of(p.n) <= kMaxGrid && p.B * p.n * 32 <= max_x &&
         p.B * p.m <= max_x;
}

size_t reverse_step_workspace_bytes(const ReverseStepParams& p) {
  if (!p.row) return 0;
  return static_cast<size_t>(p.B * strips_of(p.n) * p.m) * acc_bytes(p.dtype);
}

void launch_reverse_step(const ReverseStepParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.n == 0 || p.m == 0) return;
  if (p.dtype == DType::Float64) {
    launch_typed<double>(p, stream);
  } else {
    launch_typed<float>(p, stream);
  }
}

}  // namespace sinkhorn
