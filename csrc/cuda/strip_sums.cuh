// Column sums split into strips of rows, shared by the composite backward's row step
// (large_backward.cu) and the implicit backward's CG column pass (implicit_cg.cu): a thread per
// column and strip sums the strip's kStripRows rows (a warp reads consecutive columns of a row),
// its partial goes to partial[(b * strips + strip) * m + j], and a thread per column then adds
// the strips' partials. (The forward's LSE strips, large_work.cuh, size theirs to fill the GPU.)
#pragma once

#include <cstdint>

#include "kernel_common.cuh"

namespace sinkhorn {
namespace strip_sums {

constexpr int64_t kStripRows = 64;

__host__ __device__ inline int64_t strips_of(int64_t n) {
  return (n + kStripRows - 1) / kStripRows;
}

// Rows [first, last) of strip `strip` of n rows.
struct Rows {
  int64_t first, last;
};
__host__ __device__ inline Rows rows_of(int64_t strip, int64_t n) {
  const int64_t first = strip * kStripRows;
  return Rows{first, first + kStripRows < n ? first + kStripRows : n};
}

// The sum of column j's strip partials of problem b (strips of m columns), in four independent
// running sums whose loads are issued together (dev::sum_strided).
template <typename acc_t>
__device__ __forceinline__ acc_t column_total(const acc_t* partial, int64_t b, int64_t strips,
                                              int64_t m, int64_t j) {
  const acc_t* at = partial + b * strips * m + j;
  return dev::sum_strided<acc_t>(0, strips, 1, [&](int64_t k) { return at[k * m]; });
}

}  // namespace strip_sums
}  // namespace sinkhorn
