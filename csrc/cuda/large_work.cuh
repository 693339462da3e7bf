// The large-problem forward's constants, work split and workspace layout (large_forward.cu and
// its fused pass, large_fused.cuh).
#pragma once

#include <cstdint>

#include "kernel_common.cuh"

namespace sinkhorn {
namespace large {

constexpr int kThreads = 256;
constexpr int kRowWarps = kThreads / 32;  // rows per block of the row pass
constexpr int64_t kMinEntries = int64_t(1) << 20;
// The row pass splits rows into chunks of at least kMinChunk columns until there are about
// kTargetWarps (row, chunk) warps: enough to fill a GPU (H100: 132 SMs x 64 warps).
constexpr int64_t kTargetWarps = 8192;
constexpr int64_t kMinChunk = 1024;

// Rows per strip of the column passes: 256, or fewer (down to 32) while B problems of n rows give
// fewer than kTargetStrips strips, so that the fused row-and-column pass (large_fused.cuh: a
// block per strip) still fills the GPU. More strips mean more partials to merge (2 values per
// column per strip: 1/16 of S's fp32 reads at 32 rows).
constexpr int64_t kMaxStripRows = 256;
constexpr int64_t kMinStripRows = 32;
constexpr int64_t kTargetStrips = 512;

__host__ __device__ inline int64_t strip_rows_of(int64_t B, int64_t n) {
  int64_t rows = kMaxStripRows;
  while (rows > kMinStripRows && B * ((n + rows - 1) / rows) < kTargetStrips) rows /= 2;
  return rows;
}
__host__ __device__ inline int64_t strips_of(int64_t B, int64_t n) {
  const int64_t rows = strip_rows_of(B, n);
  return (n + rows - 1) / rows;
}

// Columns per block of the column pass: the power of two >= m, at most kThreads; the block's
// kThreads / that threads per column split the strip's rows.
__host__ __device__ inline int64_t cols_per_block(int64_t m) {
  int64_t c = 1;
  while (c < m && c < kThreads) c *= 2;
  return c;
}

// Chunks per row of the row pass for B * n rows of m columns (1: a warp per whole row).
__host__ __device__ inline int64_t row_chunks_of(int64_t rows, int64_t m) {
  if (rows <= 0) return 1;  // no problem (B = 0) or no row: nothing to split
  const int64_t want = (kTargetWarps + rows - 1) / rows;
  const int64_t most = (m + kMinChunk - 1) / kMinChunk;
  const int64_t chunks = want < most ? want : most;
  return chunks > 1 ? chunks : 1;
}

// The workspace, in accumulation-type values: per problem log a (n), log b (m), one LSE per row
// or column (L = max(n, m)), the column pass's strip partials (strips x m maxima and sums), the
// row pass's chunk partials (n x chunks maxima and sums, when chunks > 1), and three scalars:
// the stopped flag, the stopping threshold, the count of allowed rows.
template <typename acc_t>
struct Work {
  acc_t *log_a, *log_b, *lse, *part_max, *part_sum, *row_max, *row_sum, *done, *threshold, *rows;
  int64_t L, strip_rows, strips, chunks, chunk_cols;

  __host__ __device__ Work(void* base, const FwdParams& p) {
    acc_t* w = static_cast<acc_t*>(base);
    L = p.n > p.m ? p.n : p.m;
    strip_rows = strip_rows_of(p.B, p.n);
    strips = strips_of(p.B, p.n);
    chunks = row_chunks_of(p.B * p.n, p.m);
    chunk_cols = (p.m + chunks - 1) / chunks;
    log_a = w;
    log_b = log_a + p.B * p.n;
    lse = log_b + p.B * p.m;
    part_max = lse + p.B * L;
    part_sum = part_max + p.B * strips * p.m;
    row_max = part_sum + p.B * strips * p.m;
    row_sum = row_max + (chunks > 1 ? p.B * p.n * chunks : 0);
    done = row_sum + (chunks > 1 ? p.B * p.n * chunks : 0);
    threshold = done + p.B;
    rows = threshold + p.B;
  }
  // The log marginal of problem b's rows (row) or columns: given, or the defaults.
  __host__ __device__ const acc_t* log_marginal(const FwdParams& p, bool row, int64_t b) const {
    if (row) return (p.log_a ? static_cast<const acc_t*>(p.log_a) : log_a) + b * p.n;
    return (p.log_b ? static_cast<const acc_t*>(p.log_b) : log_b) + b * p.m;
  }
  static int64_t values(const FwdParams& p) {
    const int64_t L = p.n > p.m ? p.n : p.m;
    const int64_t chunks = row_chunks_of(p.B * p.n, p.m);
    return p.B * (p.n + p.m + L + 2 * strips_of(p.B, p.n) * p.m + (chunks > 1 ? 2 * p.n * chunks : 0) +
                  3);
  }
};

}  // namespace large
}  // namespace sinkhorn
