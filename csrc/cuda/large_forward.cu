// CUDA path of the forward for large problems (n * m >= 2^20, e.g. OT at 2000 x 2000 or 8192 x
// 8192, and few problems too large for shared memory, e.g. attention's 8 heads of 512 x 512):
// the whole GPU works on each step instead of one block per problem. Each step is a few phases
// (large_phases.cuh), launched as kernels by the host loop, or, for a solve with tol, run by the
// device loop (large_loop.cuh: one cooperative kernel that ends once every problem has stopped).
// No host synchronisation either way; CUDA graphs capture both:
//   row step:    a warp per row computes LSE_j(S_ij + g_j)                          (row_lse);
//                with few rows (short, wide problems) a warp per chunk of a row, the chunks
//                merged by a thread per row                                          (merge)
//   column step: blocks of a row strip (32 to 256 rows) x up to 256 columns compute partial
//                LSEs over their strip (with fewer columns, several threads per column, merged
//                in shared memory), then a block per 32 columns merges the strips: a lane
//                per column, the warps over the strips                    (col_partial, col_merge)
//   then a block per problem checks the stopping rule on the marginal the step fixes and, unless
//   the problem stops, updates the potentials                                       (update)
//   (without tol, tol <= 0, no step checks the rule: the row pass, the row merge or the column
//   merge writes the potentials itself and the steps launch no update kernel; the final error's
//   update still runs, and a replay's steps keep theirs)
// With SINKHORN_CUDA_FUSED=1, a row step followed by a column step (every iteration but a lone
// first or last step) is fused when 1024 <= m <= 16384 (8192 in float64): one kernel reads S
// once for both (large_fused.cuh), then the row update, the column merge and the column update
// run (without tol: the fused pass writes f, the merge g, and no update runs), so an iteration
// reads S once instead of twice. It is off by default: on the H100 and the
// H200 its first version was the slower of the two (n = m = 8192 on the H200: 0.78 ms an
// iteration fused, 0.434 unfused; benchmarks/results/h200/large_ot_cuda*.md), with one load of
// the row in flight a thread; the rewrite that loads the row at once has not run on a GPU yet
// (benchmarks/GPU_NOTES.md). A stopped problem's flag makes every later
// kernel skip it; on the host loop the launches continue after every problem has stopped (they
// return at once), which is why a solve with tol takes the device loop. The LSEs
// are merged from strips and chunks, so they can differ from the block kernel's (and the
// backward's replay) by rounding. Every formula comes from sinkhorn_math.h. tests/emu runs every
// kernel here in emulation.
#include <cstdint>

#include "../env_flag.h"
#include "kernel_common.cuh"
#include "large_fused.cuh"
#include "large_loop.cuh"
#include "large_phases.cuh"
#include "large_work.cuh"
#include "sinkhorn_kernel.h"

namespace sinkhorn {
namespace {

using namespace dev;
using namespace large;

// The host loop's kernels: each runs one phase (large_phases.cuh), a work block per CUDA block.
template <typename scalar_t, typename acc_t = typename AccOf<scalar_t>::type>
__global__ void __launch_bounds__(kThreads) row_lse_kernel(const FwdParams p, Work<acc_t> w,
                                                          const acc_t* g, acc_t* direct) {
  row_lse_phase<scalar_t>(p, w, g, direct);
}

// Grid (column blocks, strips, problems).
template <typename scalar_t, typename acc_t = typename AccOf<scalar_t>::type>
__global__ void __launch_bounds__(kThreads) col_partial_kernel(const FwdParams p, Work<acc_t> w,
                                                              const acc_t* f) {
  col_partial_block<scalar_t>(p, w, f, blockIdx.x, blockIdx.y, blockIdx.z);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) row_merge_kernel(const FwdParams p, Work<acc_t> w,
                                                            acc_t* direct) {
  row_merge_phase(p, w, direct);
}

// Grid (column groups of 32, problems).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) col_merge_kernel(const FwdParams p, Work<acc_t> w,
                                                            acc_t* direct) {
  col_merge_block(p, w, blockIdx.x, blockIdx.y, direct);
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
  const acc_t* la = w.log_marginal(p, true, b);
  acc_t mass = 0;
  for (int64_t i = threadIdx.x; i < p.n; i += kThreads)
    mass += la[i] > math::neg_inf<acc_t>() ? math::exp_(la[i]) : acc_t(0);
  mass = block_sum<kThreads>(mass);
  if (threadIdx.x == 0) {
    w.threshold[b] = static_cast<acc_t>(p.tol) * mass;
    w.done[b] = acc_t(0);
  }
}

// A block per problem.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) update_kernel(const FwdParams p, Work<acc_t> w,
                                                         bool row, int64_t k, bool check,
                                                         bool final) {
  update_block(p, w, row, k, check, final, blockIdx.x);
}

// P = exp(S + f_i + g_j): a warp per row (grid-stride over every problem's rows, dev::plan_row,
// whose row sum goes unused here). The row's problem and potential are found once a row: an
// element a thread with its 64-bit divisions and modulos (three an entry) cost more instructions
// than the entry's bytes take to move.
template <typename scalar_t, typename acc_t = typename AccOf<scalar_t>::type>
__global__ void __launch_bounds__(kThreads) plan_kernel(const FwdParams p) {
  const int64_t rows = p.B * p.n, m = p.m;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  const acc_t* f = static_cast<const acc_t*>(p.f);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp_id(); r < rows;
       r += warps) {
    dev::plan_row(static_cast<const scalar_t*>(p.scores) + r * m, f[r],
                  static_cast<const acc_t*>(p.g) + (r / p.n) * m,
                  static_cast<scalar_t*>(p.plan) + r * m, m);
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
  // pot: the other axis' potential (nullptr: zero); direct: see put_lse (large_phases.cuh).
  auto lse_pass = [&](bool row, const acc_t* pot, acc_t* direct) {
    if (row) {
      row_lse_kernel<scalar_t><<<row_grid, kThreads, 0, stream>>>(p, w, pot,
                                                                 w.chunks > 1 ? nullptr : direct);
      if (w.chunks > 1)
        row_merge_kernel<acc_t><<<row_merge_grid, kThreads, 0, stream>>>(p, w, direct);
    } else {
      col_partial_kernel<scalar_t><<<col_grid, kThreads, 0, stream>>>(p, w, pot);
      col_merge_kernel<acc_t><<<merge_grid, kThreads, 0, stream>>>(p, w, direct);
    }
  };
  cudaMemsetAsync(f, 0, sizeof(acc_t) * p.B * p.n, stream);
  cudaMemsetAsync(g, 0, sizeof(acc_t) * p.B * p.m, stream);
  cudaMemsetAsync(w.done, 0, sizeof(acc_t) * p.B, stream);  // 0.0 is all zero bits
  if (p.log_a == nullptr) {  // the defaults from the LSEs of S (potentials still zero)
    lse_pass(true, nullptr, nullptr);
    marginals_kernel<acc_t><<<problems, kThreads, 0, stream>>>(p, w, 0);
    lse_pass(false, nullptr, nullptr);
    marginals_kernel<acc_t><<<problems, kThreads, 0, stream>>>(p, w, 1);
  }
  marginals_kernel<acc_t><<<problems, kThreads, 0, stream>>>(p, w, 2);
  static const bool fused_on = env_is("SINKHORN_CUDA_FUSED", "1");  // opt-in (see the top)
  acc_t* history = static_cast<acc_t*>(p.history);
  const bool fuse = fused_on && history == nullptr && fused_applies(p, sizeof(acc_t));
  const bool on_device = device_loop_applies(p, history != nullptr, fuse) &&
                         launch_device_loop<scalar_t>(p, w, stream);
  // Without tol no step checks the stopping rule, so the passes write the potentials themselves
  // and no update kernel runs (a replay still records each step's LSEs).
  const bool direct = !(p.tol > 0) && history == nullptr;
  for (int64_t k = 0; !on_device && k < p.steps; ++k) {
    const bool row = ((k % 2) == 0) == p.start_row;
    if (fuse && row && k + 1 < p.steps) {
      // Step k's row LSEs and step k + 1's column partials in one read of S (large_fused.cuh).
      launch_row_col<scalar_t>(p, w, direct ? f : nullptr, stream);
      if (!direct)
        update_kernel<acc_t><<<problems, kThreads, 0, stream>>>(p, w, true, k,
                                                                p.tol > 0 && k >= 1, false);
      col_merge_kernel<acc_t><<<merge_grid, kThreads, 0, stream>>>(p, w, direct ? g : nullptr);
      if (!direct)
        update_kernel<acc_t><<<problems, kThreads, 0, stream>>>(p, w, false, k + 1, p.tol > 0,
                                                                false);
      ++k;
      continue;
    }
    lse_pass(row, row ? g : f, direct ? (row ? f : g) : nullptr);
    if (history != nullptr) {  // the replay keeps step k's LSEs
      cudaMemcpyAsync(history + k * p.B * w.L, w.lse, sizeof(acc_t) * p.B * w.L,
                      cudaMemcpyDeviceToDevice, stream);
    }
    if (!direct)
      update_kernel<acc_t><<<problems, kThreads, 0, stream>>>(p, w, row, k, p.tol > 0 && k >= 1,
                                                              false);
  }
  if (history != nullptr) return;  // a replay: no plan, no final error
  // The marginal the last step did not fix is the one step `steps` would fix.
  const bool next_row = ((p.steps % 2) == 0) == p.start_row;
  lse_pass(next_row, next_row ? g : f, nullptr);
  update_kernel<acc_t><<<problems, kThreads, 0, stream>>>(p, w, next_row, p.steps, false, true);
  plan_kernel<scalar_t><<<blocks_for(p.B * p.n, kRowWarps), kThreads, 0, stream>>>(p);
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
  return static_cast<size_t>(p.dtype == DType::Float64 ? Work<double>::values(p)
                                                       : Work<float>::values(p)) *
         acc_bytes(p.dtype);
}

void launch_large_forward(const FwdParams& p, cudaStream_t stream) {
  if (p.B == 0) return;
  dtype_switch(p.dtype,
               [&](auto tag) { launch_typed<typename decltype(tag)::type>(p, stream); });
}

}  // namespace sinkhorn
