// What the CUDA tiny forward and backward (tiny_forward.cu, tiny_backward.cu) share: the thread
// mapping and the predicated loads and stores between a problem's global arrays and its padded
// TinyProblem (compile-time loop bounds keep the arrays in registers).
#pragma once

#include <cstdint>

#include "../tiny_problem.h"
#include "kernel_common.cuh"

namespace sinkhorn {
namespace dev {

constexpr int kTinyThreads = 128;  // problems per block, one a thread

// Problem b's scores and marginals (the given ones, or the defaults) into q, reset to n x m.
// Params: FwdParams or BwdParams (scores, log_a, log_b, n, m).
template <typename scalar_t, int NMAX, typename acc_t, typename Params>
__device__ __forceinline__ void load_tiny(const Params& p, int64_t b, TinyProblem<NMAX, acc_t>& q) {
  const int n = static_cast<int>(p.n), m = static_cast<int>(p.m);
  q.reset(n, m);
  const scalar_t* S = static_cast<const scalar_t*>(p.scores) + b * n * m;
  SK_UNROLL
  for (int i = 0; i < NMAX; ++i)
    SK_UNROLL
    for (int j = 0; j < NMAX; ++j)
      if (i < n && j < m) q.s[i * NMAX + j] = to_acc(S[i * m + j]);
  if (p.log_a == nullptr) {
    q.default_marginals();
    return;
  }
  const acc_t* la = static_cast<const acc_t*>(p.log_a) + b * n;
  const acc_t* lb = static_cast<const acc_t*>(p.log_b) + b * m;
  SK_UNROLL
  for (int a = 0; a < NMAX; ++a) {
    if (a < n) q.la[a] = la[a];
    if (a < m) q.lb[a] = lb[a];
  }
}

// dst (n x m) = value(i, j), and the two vectors dst_n (n) = u, dst_m (m) = v, from padded
// NMAX arrays.
template <int NMAX, typename scalar_t, typename acc_t, typename Value>
__device__ __forceinline__ void store_tiny(scalar_t* dst, int n, int m, Value&& value,
                                           acc_t* dst_n, const acc_t* u, acc_t* dst_m,
                                           const acc_t* v) {
  SK_UNROLL
  for (int i = 0; i < NMAX; ++i)
    SK_UNROLL
    for (int j = 0; j < NMAX; ++j)
      if (i < n && j < m) store(dst + i * m + j, value(i, j));
  SK_UNROLL
  for (int a = 0; a < NMAX; ++a) {
    if (a < n) dst_n[a] = u[a];
    if (a < m) dst_m[a] = v[a];
  }
}

}  // namespace dev
}  // namespace sinkhorn
