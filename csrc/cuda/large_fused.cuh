// The large-problem forward's fused pass (large_forward.cu): a row step and the column step after
// it in one read of S. A block of BLOCK threads owns a strip of w.strip_rows rows of one problem
// and walks them a row at a time. Each thread holds VALS entries of the row in registers (columns
// t, t + BLOCK, ..., coalesced), loaded together, so the row is read once: the block reduces its
// LSE_j(S_ij + g_j) (into w.lse, as row_lse_kernel would; without tol f_i itself, below),
// computes the row's new potential f_i = log a_i - LSE, and pushes S_ij + f_i into its columns'
// running partial LSEs, kept in shared memory (each column owned by one thread, so no barrier
// guards them). The strip's partials then go to the workspace, where col_merge_kernel combines
// them as it does col_partial_kernel's. In float32 the row's LSE is two passes over the registers
// (dev::lse_of: the maximum, then one exponential an entry, no branch).
//
// The update kernel of the row step recomputes the same f_i from the same LSE (math::potential),
// so when a problem does not stop at the row step the partials are exactly the column step's
// input. When it stops, the partials are never merged (stopped problems are skipped). Without
// tol no step checks the stopping rule, so the pass writes f_i itself (direct) and no row update
// runs. Takes
// problems with kFusedMinCols <= m <= kFusedMaxCols columns whose partials fit in shared memory.
//
// The shape (fused_shape): 16 entries a thread and the block as wide as that needs (128 to 512
// threads), 32 entries a thread beyond 8192 columns. So m = 8192 fp32 runs 512 threads of about
// 64 registers and 64 KB of partials, two blocks (32 warps) an SM, each with a 32 KB row in
// flight; the first version (256 threads, 32 entries each, 123 registers) held 16 warps an SM.
#pragma once

#include <cstdint>

#include "kernel_common.cuh"
#include "large_work.cuh"

namespace sinkhorn {
namespace large {

using dev::lane_id;
using dev::to_acc;
using dev::warp_id;
using math::Lse;

constexpr int64_t kFusedMinCols = 1024;   // fewer: most threads would idle
constexpr int64_t kFusedMaxCols = 16384;  // 32 registers of the row a thread at 512 threads
constexpr size_t kFusedMaxShared = 128 * 1024;  // the partials (2 values a column)

// The block (threads) and the row entries a thread (vals) for m columns: 16 entries a thread
// and the power-of-two block of 128 to 512 threads that covers m, else 32 entries at 512 threads.
struct FusedShape {
  int threads, vals;
};
inline FusedShape fused_shape(int64_t m) {
  int threads = 128;
  while (threads < 512 && int64_t(threads) * 16 < m) threads *= 2;
  return FusedShape{threads, int64_t(threads) * 16 < m ? 32 : 16};
}

inline size_t fused_shared_bytes(int64_t m, size_t acc_bytes) { return 2 * m * acc_bytes; }

// Whether p's iterations take the fused pass: m in range, and its partials (with room for the
// static shared memory) within kFusedMaxShared and the device's opt-in limit.
inline bool fused_applies(const FwdParams& p, size_t acc_bytes) {
  const size_t bytes = fused_shared_bytes(p.m, acc_bytes);
  return p.m >= kFusedMinCols && p.m <= kFusedMaxCols && bytes <= kFusedMaxShared &&
         bytes + 1024 <= static_cast<size_t>(dev::shared_memory_optin());
}

// Grid (strips, problems); BLOCK threads; fused_shared_bytes(m) of dynamic shared memory.
template <int BLOCK, int VALS, typename scalar_t,
          typename acc_t = typename dev::AccOf<scalar_t>::type>
__global__ void __launch_bounds__(BLOCK) row_col_kernel(const FwdParams p, Work<acc_t> w,
                                                        acc_t* direct) {
  constexpr int kWarps = BLOCK / 32;
  extern __shared__ __align__(16) unsigned char fused_partials[];
  // The warps' partial row LSEs, in two buffers (rows alternate): a warp that has passed row i's
  // barrier may write row i + 1's while another still reads row i's, and it cannot get to row
  // i + 2's before every warp has passed row i + 1's barrier, so one barrier a row suffices.
  __shared__ acc_t warp_max[2][kWarps], warp_sum[2][kWarps];
  const int64_t strip = blockIdx.x, b = blockIdx.y, n = p.n, m = p.m;
  if (w.done[b] != acc_t(0)) return;  // block-uniform
  acc_t* pmax = reinterpret_cast<acc_t*>(fused_partials);
  acc_t* psum = pmax + m;
  const acc_t* g = static_cast<const acc_t*>(p.g) + b * m;
  const acc_t* log_a = w.log_marginal(p, true, b);
  const scalar_t* S = static_cast<const scalar_t*>(p.scores) + b * n * m;
  acc_t gj[VALS];
#pragma unroll
  for (int k = 0; k < VALS; ++k) {
    const int64_t j = threadIdx.x + int64_t(k) * BLOCK;
    gj[k] = j < m ? g[j] : acc_t(0);
    if (j < m) {
      pmax[j] = math::neg_inf<acc_t>();
      psum[j] = acc_t(0);
    }
  }
  const int64_t i0 = strip * w.strip_rows;
  const int64_t i1 = i0 + w.strip_rows < n ? i0 + w.strip_rows : n;
  for (int64_t i = i0; i < i1; ++i) {  // block-uniform: the row's LSE needs every thread
    const scalar_t* row = S + i * m;
    acc_t s[VALS];
    // The row's loads first, all in flight together. Pushed as they arrived, each load waited on
    // the dependent chain before it (ptxas put one load before each push), and the H200 ran the
    // first version of this pass at about a tenth of the copy bandwidth.
#pragma unroll
    for (int k = 0; k < VALS; ++k) {
      const int64_t j = threadIdx.x + int64_t(k) * BLOCK;
      s[k] = j < m ? to_acc(row[j]) : math::neg_inf<acc_t>();
    }
    const acc_t la = log_a[i];  // with the row's loads, not after the barrier
    acc_t x[VALS];  // S_ij + g_j; the entries past m are -inf (s), gj 0
#pragma unroll
    for (int k = 0; k < VALS; ++k) x[k] = s[k] + gj[k];
    Lse<acc_t> r;
    if constexpr (sizeof(acc_t) == sizeof(float)) {
      r = dev::lse_of(x);  // max, then the sum of exponentials
    } else {  // float64: lse_of's second path would spill at 512 threads (ptxas: 128 registers)
      r = dev::lse_pushed(x);
    }
    r = dev::warp_lse(r);
    const int buf = static_cast<int>((i - i0) & 1);
    if (lane_id() == 0) {
      warp_max[buf][warp_id()] = r.max;
      warp_sum[buf][warp_id()] = r.sum;
    }
    __syncthreads();
    // Every warp merges the kWarps partials itself, a lane each, in a warp reduction.
    const Lse<acc_t> total = dev::warp_lse(
        lane_id() < kWarps ? Lse<acc_t>{warp_max[buf][lane_id()], warp_sum[buf][lane_id()]}
                           : math::lse_empty<acc_t>());
    const acc_t lse = math::lse_value(total);
    const acc_t f = math::potential(la, lse);
    if (threadIdx.x == 0) {  // the LSE for the update kernel, or f itself (put_lse)
      if (direct == nullptr) {
        w.lse[b * w.L + i] = lse;
      } else {
        direct[b * n + i] = f;
      }
    }
#pragma unroll
    for (int k = 0; k < VALS; ++k) {
      const int64_t j = threadIdx.x + int64_t(k) * BLOCK;
      if (j < m) {
        Lse<acc_t> col{pmax[j], psum[j]};
        math::lse_push(col, s[k] + f);
        pmax[j] = col.max;
        psum[j] = col.sum;
      }
    }
  }
  acc_t* out_max = w.part_max + (b * w.strips + strip) * m;
  acc_t* out_sum = w.part_sum + (b * w.strips + strip) * m;
  for (int64_t j = threadIdx.x; j < m; j += BLOCK) {  // the owner's own columns
    out_max[j] = pmax[j];
    out_sum[j] = psum[j];
  }
}

// Enqueues the fused pass (fused_applies(p) must hold); direct: f itself instead of the row LSEs
// (put_lse in large_phases.cuh).
template <typename scalar_t, typename acc_t>
void launch_row_col(const FwdParams& p, const Work<acc_t>& w, acc_t* direct,
                    cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(w.strips), static_cast<unsigned>(p.B));
  const size_t shared = fused_shared_bytes(p.m, sizeof(acc_t));
  const FusedShape shape = fused_shape(p.m);
  auto go = [&](auto kernel, int threads) {
    dev::allow_dynamic_shared(kernel, shared);
    kernel<<<grid, threads, shared, stream>>>(p, w, direct);
  };
  if (shape.threads == 128) return go(row_col_kernel<128, 16, scalar_t>, 128);
  if (shape.threads == 256) return go(row_col_kernel<256, 16, scalar_t>, 256);
  if (shape.vals == 16) return go(row_col_kernel<512, 16, scalar_t>, 512);
  // 32 entries a thread (fp64 never gets here: its partials fit only up to m = 8192)
  if constexpr (sizeof(acc_t) == sizeof(float)) go(row_col_kernel<512, 32, scalar_t>, 512);
}

}  // namespace large
}  // namespace sinkhorn
