// The implicit backward's conjugate gradients (ops/sinkhorn_implicit.cpp, MATH.md section 2.2) in
// one cooperative kernel: the ATen loop runs cg_max_iter iterations of about fifteen small ops
// each, whatever the convergence (no host synchronisation), which the H200 measured at 42-47 ms
// for 16 x 1024^2 fp32, mostly launches. Here every iteration is four phases separated by grid
// barriers, and the loop ends on the device once every problem has converged:
//   u = Pn p                    (a matrix-vector pass over P)
//   v = Pn^T (rinv u)           (the other pass; a column pass is strip partials, then a merge)
//   the CG update of each problem, a block per problem: Ap = c p - v + (1 - w) p + alpha w (w.p),
//   the step, y, res, p and rz, and whether it has converged
// A pass over P's rows is a warp per row; over its columns a thread per column and strip of
// rows (coalesced both ways), so that the transposed solve (flip: Pn = P^T) reads P in place.
// Each problem follows the ATen loop's iteration exactly (the same masks and safe divisions), up
// to the order of its sums.
#include <cooperative_groups.h>

#include <cstdint>

#include "../env_flag.h"
#include "cooperative.cuh"
#include "kernel_common.cuh"
#include "sinkhorn_kernel.h"
#include "strip_sums.cuh"

namespace sinkhorn {
namespace {

using namespace dev;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
using strip_sums::strips_of;

inline __host__ __device__ int64_t col_blocks_of(int64_t m) {
  return (m + kThreads - 1) / kThreads;
}

// The workspace, in accumulation-type values: per problem res and p (M), u (N), v (M), the
// column pass's partials (strips(n) x m), and rz, the stopping threshold and the converged flag.
template <typename acc_t>
struct CgWork {
  acc_t *res, *p, *u, *v, *partial, *rz, *stop, *done;
  int64_t N, M;

  __host__ __device__ CgWork(void* base, const CgParams& q) {
    acc_t* at = static_cast<acc_t*>(base);
    N = q.flip ? q.m : q.n;
    M = q.flip ? q.n : q.m;
    res = at;
    p = res + q.B * M;
    u = p + q.B * M;
    v = u + q.B * N;
    partial = v + q.B * M;
    rz = partial + q.B * strips_of(q.n) * q.m;
    stop = rz + q.B;
    done = stop + q.B;
  }
  static int64_t values(const CgParams& q) {
    return q.B * (3 * q.m + 3 * q.n + strips_of(q.n) * q.m + 3);  // 2M + N + M <= 3(n + m)
  }
};

// safe_div of the ATen loop: 0 where the divisor is 0.
template <typename acc_t>
__device__ __forceinline__ acc_t safe_div(acc_t num, acc_t den) {
  return den != acc_t(0) ? num / den : acc_t(0);
}

// out[b, r] = sum_c P[b, r, c] x[b, c] (scale[b, c] if given), a warp per row of every problem
// whose solve still runs, the grid's warps striding over them.
template <typename acc_t>
__device__ __forceinline__ void row_pass(const CgParams& q, const CgWork<acc_t>& w,
                                         const acc_t* x, const acc_t* scale, acc_t* out) {
  const acc_t* P = static_cast<const acc_t*>(q.P);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp_id(); r < q.B * q.n;
       r += warps) {  // warp-uniform: the sum needs every lane
    const int64_t b = r / q.n;
    if (w.done[b] != acc_t(0)) continue;
    const acc_t* row = P + r * q.m;
    const acc_t* xb = x + b * q.m;
    const acc_t* sb = scale ? scale + b * q.m : nullptr;
    const acc_t total = warp_sum(sum_strided<acc_t>(  // four loads in flight a lane
        lane_id(), q.m, 32, [&](int64_t c) { return row[c] * (sb ? sb[c] * xb[c] : xb[c]); }));
    if (lane_id() == 0) out[r] = total;
  }
}

// The column pass's partials: work block v = (column block, strip, problem), a thread per
// column summing P[b, r, c] x[b, r] (scale[b, r] if given) over the strip's rows.
template <typename acc_t>
__device__ __forceinline__ void col_partials(const CgParams& q, const CgWork<acc_t>& w,
                                             const acc_t* x, const acc_t* scale) {
  const acc_t* P = static_cast<const acc_t*>(q.P);
  const int64_t cb = col_blocks_of(q.m), strips = strips_of(q.n);
  for (int64_t v = blockIdx.x; v < cb * strips * q.B; v += gridDim.x) {
    const int64_t b = v / (cb * strips), strip = (v / cb) % strips;
    const int64_t c = (v % cb) * kThreads + threadIdx.x;
    if (c >= q.m || w.done[b] != acc_t(0)) continue;
    const strip_sums::Rows rows = strip_sums::rows_of(strip, q.n);
    const acc_t* xb = x + b * q.n;
    const acc_t* sb = scale ? scale + b * q.n : nullptr;
    acc_t s = 0;
    for (int64_t r = rows.first; r < rows.last; ++r)
      s += P[(b * q.n + r) * q.m + c] * (sb ? sb[r] * xb[r] : xb[r]);
    w.partial[(b * strips + strip) * q.m + c] = s;
  }
}

// out[b, c] = the sum of the column's strip partials, a thread per column.
template <typename acc_t>
__device__ __forceinline__ void col_merge(const CgParams& q, const CgWork<acc_t>& w, acc_t* out) {
  const int64_t strips = strips_of(q.n), stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t x = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; x < q.B * q.m;
       x += stride) {
    const int64_t b = x / q.m, c = x % q.m;
    if (w.done[b] != acc_t(0)) continue;
    out[x] = strip_sums::column_total(w.partial, b, strips, q.m, c);
  }
}

// One problem's setup, a block: y = 0, res = rhs, p = dinv res, rz = res.(dinv res), the
// threshold tol^2 |rhs|^2, and whether it has already converged (a finite residual within it).
template <typename acc_t>
__device__ __forceinline__ void setup_problem(const CgParams& q, const CgWork<acc_t>& w,
                                              int64_t b) {
  const int64_t M = w.M;
  const acc_t* rhs = static_cast<const acc_t*>(q.rhs) + b * M;
  const acc_t* dinv = static_cast<const acc_t*>(q.dinv) + b * M;
  acc_t* y = static_cast<acc_t*>(q.y) + b * M;
  acc_t rz = 0, rr = 0;
  for (int64_t j = threadIdx.x; j < M; j += kThreads) {
    const acc_t r = rhs[j], z = dinv[j] * r;
    y[j] = 0;
    w.res[b * M + j] = r;
    w.p[b * M + j] = z;
    rz += r * z;
    rr += r * r;
  }
  rz = block_sum<kThreads>(rz);
  rr = block_sum<kThreads>(rr);
  if (threadIdx.x == 0) {
    const acc_t stop = static_cast<acc_t>(q.tol * q.tol) * rr;
    w.rz[b] = rz;
    w.stop[b] = stop;
    // Converged already only when finite: a NaN or inf residual runs an iteration, so that it
    // spreads into y as it does in the ATen loop (where 0 x a non-finite step is NaN).
    w.done[b] = (rr <= stop && rr - rr == acc_t(0)) ? acc_t(1) : acc_t(0);
  }
}

// One CG iteration of problem b, a block, given v = Pn^T rinv Pn p (the ATen loop's body; a
// converged problem is skipped: its step would be 0).
template <typename acc_t>
__device__ __forceinline__ void update_problem(const CgParams& q, const CgWork<acc_t>& w,
                                               int64_t b) {
  if (w.done[b] != acc_t(0)) return;  // block-uniform
  const int64_t M = w.M;
  const acc_t* c = static_cast<const acc_t*>(q.c) + b * M;
  const acc_t* wv = static_cast<const acc_t*>(q.w) + b * M;
  const acc_t* dinv = static_cast<const acc_t*>(q.dinv) + b * M;
  const acc_t alpha = static_cast<const acc_t*>(q.alpha)[b];
  acc_t* y = static_cast<acc_t*>(q.y) + b * M;
  acc_t* res = w.res + b * M;
  acc_t* p = w.p + b * M;
  const acc_t* v = w.v + b * M;
  acc_t wp = 0;
  for (int64_t j = threadIdx.x; j < M; j += kThreads) wp += wv[j] * p[j];
  wp = block_sum<kThreads>(wp);
  auto Ap = [&](int64_t j) {
    return c[j] * p[j] - v[j] + (acc_t(1) - wv[j]) * p[j] + alpha * wv[j] * wp;
  };
  acc_t pAp = 0;
  for (int64_t j = threadIdx.x; j < M; j += kThreads) pAp += p[j] * Ap(j);
  pAp = block_sum<kThreads>(pAp);
  const acc_t rz = w.rz[b], step = safe_div(rz, pAp);
  acc_t rz_next = 0, rr = 0;
  for (int64_t j = threadIdx.x; j < M; j += kThreads) {
    const acc_t r = res[j] - step * Ap(j);
    y[j] += step * p[j];
    res[j] = r;
    rz_next += r * (dinv[j] * r);
    rr += r * r;
  }
  rz_next = block_sum<kThreads>(rz_next);  // also a barrier: every Ap(j) has read p
  rr = block_sum<kThreads>(rr);
  const acc_t beta = safe_div(rz_next, rz);
  for (int64_t j = threadIdx.x; j < M; j += kThreads) p[j] = dinv[j] * res[j] + beta * p[j];
  if (threadIdx.x == 0) {
    w.rz[b] = rz_next;
    if (!(rr > w.stop[b])) w.done[b] = acc_t(1);
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) cg_kernel(const CgParams q, CgWork<acc_t> w) {
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  const acc_t* rinv = static_cast<const acc_t*>(q.rinv);
  for (int64_t b = blockIdx.x; b < q.B; b += gridDim.x) setup_problem(q, w, b);
  grid.sync();
  for (int64_t it = 0; it < q.iters; ++it) {
    if (all_set<kThreads>(w.done, q.B)) break;  // every problem has converged
    if (q.flip) {  // Pn = P^T: u = P^T p is the column pass, v = P (rinv u) the row pass
      col_partials(q, w, w.p, static_cast<const acc_t*>(nullptr));
      grid.sync();
      col_merge(q, w, w.u);
      grid.sync();
      row_pass(q, w, w.u, rinv, w.v);
    } else {
      row_pass(q, w, w.p, static_cast<const acc_t*>(nullptr), w.u);
      grid.sync();
      col_partials(q, w, w.u, rinv);
      grid.sync();
      col_merge(q, w, w.v);
    }
    grid.sync();
    for (int64_t b = blockIdx.x; b < q.B; b += gridDim.x) update_problem(q, w, b);
    grid.sync();
  }
}

template <typename acc_t>
bool launch_typed(const CgParams& q, cudaStream_t stream) {
  static const bool forced = env_is("SINKHORN_CUDA_CG", "device");
  CgParams params = q;
  CgWork<acc_t> work(q.workspace, q);
  void* args[] = {&params, &work};
  const int64_t most = col_blocks_of(q.m) * strips_of(q.n) * q.B;
  const int64_t rows = (q.B * q.n + kWarps - 1) / kWarps;
  return launch_cooperative(cg_kernel<acc_t>, kThreads, most > rows ? most : rows, args, stream,
                            forced);
}

}  // namespace

size_t cg_workspace_bytes(const CgParams& q) {
  return static_cast<size_t>(q.dtype == DType::Float64 ? CgWork<double>::values(q)
                                                       : CgWork<float>::values(q)) *
         acc_bytes(q.dtype);
}

bool launch_cg(const CgParams& q, cudaStream_t stream) {
  static const bool disabled = env_is("SINKHORN_CUDA_CG", "aten");
  if (disabled || q.B == 0) return false;
  return q.dtype == DType::Float64 ? launch_typed<double>(q, stream)
                                   : launch_typed<float>(q, stream);
}

}  // namespace sinkhorn
