// CUDA path of the forward for large problems (n * m >= 2^20, e.g. OT at 2000 x 2000 or 8192 x
// 8192, and few problems too large for shared memory, e.g. attention's 8 heads of 512 x 512):
// the whole GPU works on each step instead of one block per problem. Each step is a few
// kernels enqueued by the host loop (no host synchronisation; CUDA graphs capture it):
//   row step:    a warp per row computes LSE_j(S_ij + g_j)                          (row_lse);
//                with few rows (short, wide problems) a warp per chunk of a row, the chunks
//                merged by a thread per row                                          (merge)
//   column step: blocks of a row strip (32 to 256 rows) x up to 256 columns compute partial
//                LSEs over their strip (with fewer columns, several threads per column, merged
//                in shared memory), then a block per 32 columns merges the strips: a lane
//                per column, the warps over the strips                    (col_partial, col_merge)
//   then a block per problem checks the stopping rule on the marginal the step fixes and, unless
//   the problem stops, updates the potentials                                       (update)
// With SINKHORN_CUDA_FUSED=1, a row step followed by a column step (every iteration but a lone
// first or last step) is fused when 1024 <= m <= 16384 (8192 in float64): one kernel reads S
// once for both (large_fused.cuh), then the row update, the column merge and the column update
// run, so an iteration reads S once instead of twice. It is off by default: on an H100 it was
// the slower of the two (n = m = 8192: 0.80 ms an iteration fused, 0.47 unfused;
// benchmarks/results/large_ot_cuda*.md). A stopped problem's flag makes every later
// kernel skip it. With tol > 0 the launches continue after every problem has stopped (they
// return at once): deciding to stop the loop would need the host to read the flags. The LSEs
// are merged from strips and chunks, so they can differ from the block kernel's (and the
// backward's replay) by rounding. Every formula comes from sinkhorn_math.h. tests/emu runs every
// kernel here in emulation.
#include <cstdint>

#include "../env_flag.h"
#include "kernel_common.cuh"
#include "large_fused.cuh"
#include "large_work.cuh"
#include "sinkhorn_kernel.h"

namespace sinkhorn {
namespace {

using namespace dev;
using namespace large;

// Row LSEs LSE_j(S_ij + g_j) of every problem that has not stopped (g == nullptr: g = 0), a warp
// per (row, chunk of w.chunk_cols columns): into w.lse when a row is one chunk, else into the
// chunk partials (row_merge_kernel merges them).
template <typename scalar_t, typename acc_t = typename AccOf<scalar_t>::type>
__global__ void __launch_bounds__(kThreads) row_lse_kernel(const FwdParams p, Work<acc_t> w,
                                                          const acc_t* g) {
  const int64_t segments = p.B * p.n * w.chunks;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp_id(); t < segments;
       t += warps) {  // warp-uniform: the merge needs every lane
    const int64_t r = t / w.chunks, c = t % w.chunks, b = r / p.n, i = r % p.n;
    if (w.done[b] != acc_t(0)) continue;
    const scalar_t* row = static_cast<const scalar_t*>(p.scores) + (b * p.n + i) * p.m;
    const acc_t* gb = g ? g + b * p.m : nullptr;
    const int64_t j0 = c * w.chunk_cols, j1 = j0 + w.chunk_cols < p.m ? j0 + w.chunk_cols : p.m;
    Lse<acc_t> s = math::lse_empty<acc_t>();
    for (int64_t j = j0 + lane_id(); j < j1; j += 32)
      math::lse_push(s, to_acc(row[j]) + (gb ? gb[j] : acc_t(0)));
    s = warp_lse(s);
    if (lane_id() != 0) continue;
    if (w.chunks == 1) {
      w.lse[b * w.L + i] = math::lse_value(s);
    } else {
      w.row_max[t] = s.max;  // t = (b * n + i) * chunks + c
      w.row_sum[t] = s.sum;
    }
  }
}

// Column partial LSEs over one strip of rows, LSE_{i in strip}(S_ij + f_i) (f == nullptr: 0):
// grid (column blocks, strips, problems), cols_per_block(m) columns a block. Thread t takes
// column t % cols and every (kThreads / cols)-th row of the strip from row t / cols, so a warp
// reads consecutive addresses; the threads of a column merge in shared memory.
template <typename scalar_t, typename acc_t = typename AccOf<scalar_t>::type>
__global__ void __launch_bounds__(kThreads) col_partial_kernel(const FwdParams p, Work<acc_t> w,
                                                              const acc_t* f) {
  __shared__ acc_t smax[kThreads], ssum[kThreads];
  const int64_t b = blockIdx.z, strip = blockIdx.y;
  if (w.done[b] != acc_t(0)) return;  // block-uniform
  const int64_t cols = cols_per_block(p.m), subs = kThreads / cols;
  const int64_t c = threadIdx.x % cols, sub = threadIdx.x / cols;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * cols + c;
  const int64_t i0 = strip * w.strip_rows;
  const int64_t i1 = i0 + w.strip_rows < p.n ? i0 + w.strip_rows : p.n;
  const scalar_t* S = static_cast<const scalar_t*>(p.scores) + b * p.n * p.m;
  const acc_t* fb = f ? f + b * p.n : nullptr;
  Lse<acc_t> s = math::lse_empty<acc_t>();
  if (j < p.m)
    for (int64_t i = i0 + sub; i < i1; i += subs)
      math::lse_push(s, to_acc(S[i * p.m + j]) + (fb ? fb[i] : acc_t(0)));
  if (subs > 1) {  // block-uniform
    smax[threadIdx.x] = s.max;
    ssum[threadIdx.x] = s.sum;
    __syncthreads();
    if (sub != 0) return;
    for (int64_t k = 1; k < subs; ++k)
      s = math::lse_merge(s, Lse<acc_t>{smax[k * cols + c], ssum[k * cols + c]});
  }
  if (j >= p.m) return;
  const int64_t k = (b * w.strips + strip) * p.m + j;
  w.part_max[k] = s.max;
  w.part_sum[k] = s.sum;
}

// Merges a row's chunk partials (row_lse_kernel: consecutive) into w.lse, a thread per (problem,
// row). Rows are split into chunks only when there are few of them (row_chunks_of).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) row_merge_kernel(const FwdParams p, Work<acc_t> w) {
  const int64_t len = p.n, parts = w.chunks;
  const acc_t* mx = w.row_max;
  const acc_t* sum = w.row_sum;
  const int64_t total = p.B * len;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; t < total;
       t += stride) {
    const int64_t b = t / len, x = t % len;
    if (w.done[b] != acc_t(0)) continue;
    const int64_t first = t * parts;
    Lse<acc_t> s = math::lse_empty<acc_t>();
    for (int64_t k = 0; k < parts; ++k)
      s = math::lse_merge(s, Lse<acc_t>{mx[first + k], sum[first + k]});
    w.lse[b * w.L + x] = math::lse_value(s);
  }
}

// Merges the column strips' partial LSEs (col_partial_kernel, or the fused pass) into w.lse:
// grid (column groups of 32, problems). Lane l takes column 32 * blockIdx.x + l, so a warp reads
// 32 consecutive partials of a strip; warp v takes strips v, v + kRowWarps, ... in four
// independent chains; the warps' results meet in shared memory. The H200 run found the
// merge that gave a thread a whole column (a serial chain over up to 256 strips, with m threads
// in all: 32 blocks at m = 8192) at 0.115 ms a call, nearly a pass over S.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) col_merge_kernel(const FwdParams p, Work<acc_t> w) {
  __shared__ Lse<acc_t> warps[kThreads];  // warp v's result for lane l at v * 32 + l
  const int64_t b = blockIdx.y, x = static_cast<int64_t>(blockIdx.x) * 32 + lane_id();
  if (w.done[b] != acc_t(0)) return;  // block-uniform
  constexpr int kChains = 4;
  Lse<acc_t> s[kChains];
#pragma unroll
  for (int c = 0; c < kChains; ++c) s[c] = math::lse_empty<acc_t>();
  if (x < p.m) {
    const acc_t* mx = w.part_max + b * w.strips * p.m + x;
    const acc_t* sum = w.part_sum + b * w.strips * p.m + x;
    int64_t k = warp_id();
    for (; k + (kChains - 1) * kRowWarps < w.strips; k += kChains * kRowWarps) {
#pragma unroll
      for (int c = 0; c < kChains; ++c) {
        const int64_t at = (k + c * kRowWarps) * p.m;
        s[c] = math::lse_merge(s[c], Lse<acc_t>{mx[at], sum[at]});
      }
    }
    for (; k < w.strips; k += kRowWarps)
      s[0] = math::lse_merge(s[0], Lse<acc_t>{mx[k * p.m], sum[k * p.m]});
  }
  warps[threadIdx.x] =
      math::lse_merge(math::lse_merge(s[0], s[1]), math::lse_merge(s[2], s[3]));
  __syncthreads();
  if (warp_id() == 0 && x < p.m) {
    Lse<acc_t> total = warps[lane_id()];
    for (int v = 1; v < kRowWarps; ++v) total = math::lse_merge(total, warps[v * 32 + lane_id()]);
    w.lse[b * w.L + x] = math::lse_value(total);
  }
}

// The default marginals (MATH.md section 1) from the LSEs of S itself (an empty row or column
// has LSE -inf): phase 0 takes the row LSEs, writes log a and counts the allowed rows; phase 1
// takes the column LSEs and writes log b. Then the stopping threshold tol * sum(a) (also for
// given marginals: phase 2). A block per problem.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) marginals_kernel(const FwdParams p, Work<acc_t> w,
                                                            int phase) {
  const int64_t b = blockIdx.x;
  const acc_t* lse = w.lse + b * w.L;
  if (phase == 0) {
    long long count = 0;
    for (int64_t i = threadIdx.x; i < p.n; i += kThreads) {
      const bool alive = lse[i] > math::neg_inf<acc_t>();
      w.log_a[b * p.n + i] = math::default_log_a<acc_t>(alive);
      count += alive ? 1 : 0;
    }
    count = block_sum<kThreads>(count);
    // Exact in acc_t: n < 2^24 (at most 65535 strips of 256 rows).
    if (threadIdx.x == 0) w.rows[b] = static_cast<acc_t>(count);
    return;
  }
  if (phase == 1) {
    long long count = 0;  // exact beyond 2^24 columns, unlike a float count
    for (int64_t j = threadIdx.x; j < p.m; j += kThreads)
      count += lse[j] > math::neg_inf<acc_t>() ? 1 : 0;
    const long long cols = block_sum<kThreads>(count);
    const long long rows = static_cast<long long>(w.rows[b]);
    for (int64_t j = threadIdx.x; j < p.m; j += kThreads)
      w.log_b[b * p.m + j] =
          math::default_log_b<acc_t>(lse[j] > math::neg_inf<acc_t>(), rows, cols);
    return;
  }
  const acc_t* la = p.log_a ? static_cast<const acc_t*>(p.log_a) + b * p.n : w.log_a + b * p.n;
  acc_t mass = 0;
  for (int64_t i = threadIdx.x; i < p.n; i += kThreads)
    mass += la[i] > math::neg_inf<acc_t>() ? math::exp_(la[i]) : acc_t(0);
  mass = block_sum<kThreads>(mass);
  if (threadIdx.x == 0) {
    w.threshold[b] = static_cast<acc_t>(p.tol) * mass;
    w.done[b] = acc_t(0);
  }
}

// Step k's stopping check and potential update, a block per problem (MATH.md section 1: before
// a step k >= 1, the L1 error of the marginal it fixes, under the current potentials, decides
// whether it runs). final: after the last step, record the steps and the error of the marginal
// the last step did not fix for the problems that did not stop.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) update_kernel(const FwdParams p, Work<acc_t> w,
                                                         bool row, int64_t k, bool check,
                                                         bool final) {
  const int64_t b = blockIdx.x;
  if (w.done[b] != acc_t(0)) return;  // block-uniform
  const int64_t len = row ? p.n : p.m;
  acc_t* pot = static_cast<acc_t*>(row ? p.f : p.g) + b * len;
  const acc_t* lm = row ? (p.log_a ? static_cast<const acc_t*>(p.log_a) : w.log_a)
                        : (p.log_b ? static_cast<const acc_t*>(p.log_b) : w.log_b);
  lm += b * len;
  const acc_t* lse = w.lse + b * w.L;
  if (check || final) {
    acc_t err = 0;
    for (int64_t t = threadIdx.x; t < len; t += kThreads)
      err += math::marginal_error(lm[t], lse[t], pot[t]);
    err = block_sum<kThreads>(err);  // also a barrier: every thread has read pot
    if (final || err <= w.threshold[b]) {
      if (threadIdx.x == 0) {
        p.steps_used[b] = k;
        static_cast<acc_t*>(p.error)[b] = err;
        if (!final) w.done[b] = acc_t(1);
      }
      return;
    }
  }
  for (int64_t t = threadIdx.x; t < len; t += kThreads) pot[t] = math::potential(lm[t], lse[t]);
}

// P = exp(S + f_i + g_j), elementwise over every problem.
template <typename scalar_t, typename acc_t = typename AccOf<scalar_t>::type>
__global__ void __launch_bounds__(kThreads) plan_kernel(const FwdParams p) {
  const int64_t total = p.B * p.n * p.m;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const scalar_t* S = static_cast<const scalar_t*>(p.scores);
  const acc_t* f = static_cast<const acc_t*>(p.f);
  const acc_t* g = static_cast<const acc_t*>(p.g);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; t < total;
       t += stride) {
    const int64_t b = t / (p.n * p.m), r = t % (p.n * p.m), i = r / p.m, j = r % p.m;
    store(static_cast<scalar_t*>(p.plan) + t,
          math::exp_(to_acc(S[t]) + f[b * p.n + i] + g[b * p.m + j]));
  }
}

template <typename scalar_t>
void launch_typed(const FwdParams& p, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Work<acc_t> w(p.workspace, p);
  const unsigned row_grid = blocks_for(p.B * p.n * w.chunks, kRowWarps);
  const unsigned row_merge_grid = blocks_for(p.B * p.n, kThreads);
  const dim3 col_grid(blocks_for(p.m, cols_per_block(p.m)), static_cast<unsigned>(w.strips),
                      static_cast<unsigned>(p.B));
  const dim3 merge_grid(blocks_for(p.m, 32), static_cast<unsigned>(p.B));
  const unsigned problems = static_cast<unsigned>(p.B);
  acc_t* f = static_cast<acc_t*>(p.f);
  acc_t* g = static_cast<acc_t*>(p.g);
  auto lse_pass = [&](bool row, const acc_t* pot) {
    if (row) {
      row_lse_kernel<scalar_t><<<row_grid, kThreads, 0, stream>>>(p, w, pot);
      if (w.chunks > 1) row_merge_kernel<acc_t><<<row_merge_grid, kThreads, 0, stream>>>(p, w);
    } else {
      col_partial_kernel<scalar_t><<<col_grid, kThreads, 0, stream>>>(p, w, pot);
      col_merge_kernel<acc_t><<<merge_grid, kThreads, 0, stream>>>(p, w);
    }
  };
  cudaMemsetAsync(f, 0, sizeof(acc_t) * p.B * p.n, stream);
  cudaMemsetAsync(g, 0, sizeof(acc_t) * p.B * p.m, stream);
  cudaMemsetAsync(w.done, 0, sizeof(acc_t) * p.B, stream);  // 0.0 is all zero bits
  if (p.log_a == nullptr) {  // the defaults from the LSEs of S (potentials still zero)
    lse_pass(true, nullptr);
    marginals_kernel<acc_t><<<problems, kThreads, 0, stream>>>(p, w, 0);
    lse_pass(false, nullptr);
    marginals_kernel<acc_t><<<problems, kThreads, 0, stream>>>(p, w, 1);
  }
  marginals_kernel<acc_t><<<problems, kThreads, 0, stream>>>(p, w, 2);
  static const bool fused_on = env_is("SINKHORN_CUDA_FUSED", "1");  // opt-in (see the top)
  acc_t* history = static_cast<acc_t*>(p.history);
  const bool fuse = fused_on && history == nullptr && fused_applies(p, sizeof(acc_t));
  for (int64_t k = 0; k < p.steps; ++k) {
    const bool row = ((k % 2) == 0) == p.start_row;
    if (fuse && row && k + 1 < p.steps) {
      // Step k's row LSEs and step k + 1's column partials in one read of S (large_fused.cuh).
      launch_row_col<scalar_t>(p, w, stream);
      update_kernel<acc_t><<<problems, kThreads, 0, stream>>>(p, w, true, k, p.tol > 0 && k >= 1,
                                                              false);
      col_merge_kernel<acc_t><<<merge_grid, kThreads, 0, stream>>>(p, w);
      update_kernel<acc_t><<<problems, kThreads, 0, stream>>>(p, w, false, k + 1, p.tol > 0,
                                                              false);
      ++k;
      continue;
    }
    lse_pass(row, row ? g : f);
    if (history != nullptr) {  // the replay keeps step k's LSEs
      cudaMemcpyAsync(history + k * p.B * w.L, w.lse, sizeof(acc_t) * p.B * w.L,
                      cudaMemcpyDeviceToDevice, stream);
    }
    update_kernel<acc_t><<<problems, kThreads, 0, stream>>>(p, w, row, k, p.tol > 0 && k >= 1,
                                                            false);
  }
  if (history != nullptr) return;  // a replay: no plan, no final error
  // The marginal the last step did not fix is the one step `steps` would fix.
  const bool next_row = ((p.steps % 2) == 0) == p.start_row;
  lse_pass(next_row, next_row ? g : f);
  update_kernel<acc_t><<<problems, kThreads, 0, stream>>>(p, w, next_row, p.steps, false, true);
  plan_kernel<scalar_t><<<blocks_for(p.B * p.n * p.m, kThreads), kThreads, 0, stream>>>(p);
}

}  // namespace

bool large_forward_applies(const FwdParams& p) {
  static const bool disabled = env_is("SINKHORN_CUDA_FORWARD", "block");
  static const bool forced = env_is("SINKHORN_CUDA_FORWARD", "large");
  // The column pass puts problems on the grid's z dimension and row strips on y (each at most
  // 65535).
  const bool fits = p.n >= 1 && p.m >= 1 && p.B <= 65535 && large::strips_of(p.B, p.n) <= 65535;
  // Few problems too large for shared memory (at most a quarter as many as SMs): a block per
  // problem would leave most SMs idle and stream S from global memory at one SM's pace (the
  // H200 profile, 8 x 512^2 fp32, 3 steps: 1.06 ms of kernel on the block path, 0.107 ms here,
  // in 20 launches). The size test is the staging limit's, whatever SINKHORN_CUDA_SMEM says.
  const int64_t elem = p.dtype == DType::Float64 ? 8 : (p.dtype == DType::Float32 ? 4 : 2);
  const bool off_chip = p.n * p.m * elem > static_cast<int64_t>(dev::kMaxStagedBytes);
  const bool few = p.B * 4 <= dev::multiprocessors();
  return fits &&
         (forced || (!disabled && (p.n * p.m >= kMinEntries || (off_chip && few))));
}

size_t large_forward_workspace_bytes(const FwdParams& p) {
  const size_t acc_bytes = p.dtype == DType::Float64 ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(p.dtype == DType::Float64 ? Work<double>::values(p)
                                                       : Work<float>::values(p)) *
         acc_bytes;
}

void launch_large_forward(const FwdParams& p, cudaStream_t stream) {
  if (p.B == 0) return;
  dtype_switch(p.dtype,
               [&](auto tag) { launch_typed<typename decltype(tag)::type>(p, stream); });
}

}  // namespace sinkhorn
