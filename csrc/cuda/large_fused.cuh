// The large-problem forward's fused pass (large_forward.cu): a row step and the column step after
// it in one read of S. A block owns a strip of w.strip_rows rows of one problem and walks them a
// row at a time. Each thread holds VALS entries of the row in registers (columns t, t + 256, ...,
// coalesced), so the row is read once: the block reduces its LSE_j(S_ij + g_j) (into w.lse, as
// row_lse_kernel would), computes the row's new potential f_i = log a_i - LSE, and pushes
// S_ij + f_i into its columns' running partial LSEs, kept in shared memory (each column owned by
// one thread, so no barrier guards them). The strip's partials then go to the workspace, where
// col_merge_kernel combines them as it does col_partial_kernel's.
//
// The update kernel of the row step recomputes the same f_i from the same LSE (math::potential),
// so when a problem does not stop at the row step the partials are exactly the column step's
// input. When it stops, the partials are never merged (stopped problems are skipped). Takes
// problems with kFusedMinCols <= m <= kFusedMaxCols columns whose partials fit in shared memory.
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

constexpr int64_t kFusedMinCols = 4 * kThreads;   // fewer: most threads would idle
constexpr int64_t kFusedMaxCols = 64 * kThreads;  // VALS <= 64 registers of the row a thread
constexpr size_t kFusedMaxShared = 128 * 1024;    // the partials (2 values a column)

// Row values per thread for m columns (a power of two >= m / kThreads, at least 4).
inline int fused_vals(int64_t m) {
  int v = 4;
  while (v * kThreads < m) v *= 2;
  return v;
}

inline size_t fused_shared_bytes(int64_t m, size_t acc_bytes) { return 2 * m * acc_bytes; }

// Whether p's iterations take the fused pass: m in range, and its partials (with room for the
// static shared memory) within kFusedMaxShared and the device's opt-in limit.
inline bool fused_applies(const FwdParams& p, size_t acc_bytes) {
  const size_t bytes = fused_shared_bytes(p.m, acc_bytes);
  return p.m >= kFusedMinCols && p.m <= kFusedMaxCols && bytes <= kFusedMaxShared &&
         bytes + 1024 <= static_cast<size_t>(dev::shared_memory_optin());
}

// Grid (strips, problems); kThreads threads; fused_shared_bytes(m) of dynamic shared memory.
template <int VALS, typename scalar_t, typename acc_t = typename dev::AccOf<scalar_t>::type>
__global__ void __launch_bounds__(kThreads) row_col_kernel(const FwdParams p, Work<acc_t> w) {
  extern __shared__ __align__(16) unsigned char fused_partials[];
  __shared__ acc_t warp_max[kRowWarps], warp_sum[kRowWarps];
  const int64_t strip = blockIdx.x, b = blockIdx.y, n = p.n, m = p.m;
  if (w.done[b] != acc_t(0)) return;  // block-uniform
  acc_t* pmax = reinterpret_cast<acc_t*>(fused_partials);
  acc_t* psum = pmax + m;
  const acc_t* g = static_cast<const acc_t*>(p.g) + b * m;
  const acc_t* log_a = (p.log_a ? static_cast<const acc_t*>(p.log_a) : w.log_a) + b * n;
  const scalar_t* S = static_cast<const scalar_t*>(p.scores) + b * n * m;
  acc_t gj[VALS];
#pragma unroll
  for (int k = 0; k < VALS; ++k) {
    const int64_t j = threadIdx.x + int64_t(k) * kThreads;
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
    Lse<acc_t> r = math::lse_empty<acc_t>();
#pragma unroll
    for (int k = 0; k < VALS; ++k) {
      const int64_t j = threadIdx.x + int64_t(k) * kThreads;
      s[k] = j < m ? to_acc(row[j]) : math::neg_inf<acc_t>();
      if (j < m) math::lse_push(r, s[k] + gj[k]);
    }
    r = dev::warp_lse(r);
    if (lane_id() == 0) {
      warp_max[warp_id()] = r.max;
      warp_sum[warp_id()] = r.sum;
    }
    __syncthreads();
    Lse<acc_t> total = math::lse_empty<acc_t>();
    for (int q = 0; q < kRowWarps; ++q)
      total = math::lse_merge(total, Lse<acc_t>{warp_max[q], warp_sum[q]});
    __syncthreads();  // every thread has read the warp partials before the next row's writes
    const acc_t lse = math::lse_value(total);
    if (threadIdx.x == 0) w.lse[b * w.L + i] = lse;
    const acc_t f = math::potential(log_a[i], lse);
#pragma unroll
    for (int k = 0; k < VALS; ++k) {
      const int64_t j = threadIdx.x + int64_t(k) * kThreads;
      if (j < m) {
        Lse<acc_t> c{pmax[j], psum[j]};
        math::lse_push(c, s[k] + f);
        pmax[j] = c.max;
        psum[j] = c.sum;
      }
    }
  }
  acc_t* out_max = w.part_max + (b * w.strips + strip) * m;
  acc_t* out_sum = w.part_sum + (b * w.strips + strip) * m;
  for (int64_t j = threadIdx.x; j < m; j += kThreads) {  // the owner's own columns
    out_max[j] = pmax[j];
    out_sum[j] = psum[j];
  }
}

// Enqueues the fused pass (fused_applies(p) must hold).
template <typename scalar_t, typename acc_t>
void launch_row_col(const FwdParams& p, const Work<acc_t>& w, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(w.strips), static_cast<unsigned>(p.B));
  const size_t shared = fused_shared_bytes(p.m, sizeof(acc_t));
  auto go = [&](auto kernel) {
    dev::allow_dynamic_shared(kernel, shared);
    kernel<<<grid, kThreads, shared, stream>>>(p, w);
  };
  switch (fused_vals(p.m)) {
    case 4: return go(row_col_kernel<4, scalar_t>);
    case 8: return go(row_col_kernel<8, scalar_t>);
    case 16: return go(row_col_kernel<16, scalar_t>);
    case 32: return go(row_col_kernel<32, scalar_t>);
    default:  // 64 (fp64 never gets here: its partials fit only up to m = 8192)
      if constexpr (sizeof(acc_t) == sizeof(float)) return go(row_col_kernel<64, scalar_t>);
  }
}

}  // namespace large
}  // namespace sinkhorn
