// The DeepSeek-V4 production mHC Sinkhorn (MATH.md section 1, published-variants table) for one
// n x n problem, forward and unrolled backward, shared by the CPU kernel (where T is a SIMD
// vector and each lane is a problem) and the CUDA kernel (a thread per problem, T = float or
// double). Plain C++, no ATen.
//
//   comb = softmax_row(x) + eps
//   comb = comb / (colsum + eps)
//   (iters - 1) times: comb = comb / (rowsum + eps); comb = comb / (colsum + eps)
//
// A normalisation y = x / d along an axis, d = sum(x) + eps, has the backward
// dx = (dy - sum(dy * y)) / d along the same axis. The backward keeps only each normalisation's
// divisors d (2 iters - 1 vectors of n) and walks back from the final comb, undoing each step
// by x = y * d, then ends with the softmax's backward. No exponential after the softmax.
#pragma once

#include "sinkhorn_math.h"

namespace sinkhorn {
namespace v4 {

// Iterations the fused kernels take at most: the CUDA kernel keeps a thread's divisors in a
// local array of (2 kMaxIters - 1) x n. DeepSeek-V4 runs 20.
constexpr int kMaxIters = 32;
// Largest n of the fused kernels: a thread holds its n x n problem in registers. mHC runs 4.
constexpr int kMaxN = 8;

// The number of normalisations after the softmax.
SK_HD int normalisations(int iters) { return 2 * iters - 1; }

// Normalisation s (0-based) runs over columns when s is even (the first one is over columns)
// and over rows when s is odd.
SK_HD bool over_columns(int s) { return s % 2 == 0; }

// Ops supplies the lane type's element type E, exp and max: scalar functions on the GPU, SIMD
// vector ones on the CPU. c holds n x n lanes row-major.
template <int N, typename T, typename Ops>
struct Problem {
  using E = typename Ops::E;

  // Divides every column (or row) of c by its sum + eps and writes the divisors to d.
  SK_HD static void normalise(T* c, bool columns, E eps, T* d) {
    for (int a = 0; a < N; ++a) {
      T sum = c[columns ? a : a * N];
      for (int b = 1; b < N; ++b) sum = sum + c[columns ? b * N + a : a * N + b];
      d[a] = sum + eps;
      const T inv = static_cast<E>(1) / d[a];
      for (int b = 0; b < N; ++b) {
        T& v = c[columns ? b * N + a : a * N + b];
        v = v * inv;
      }
    }
  }

  // p = softmax over each row of x (max-shifted).
  SK_HD static void softmax(const T* x, T* p) {
    for (int i = 0; i < N; ++i) {
      T mx = x[i * N];
      for (int j = 1; j < N; ++j) mx = Ops::max(mx, x[i * N + j]);
      for (int j = 0; j < N; ++j) p[i * N + j] = Ops::exp(x[i * N + j] - mx);
      T sum = p[i * N];
      for (int j = 1; j < N; ++j) sum = sum + p[i * N + j];
      const T inv = static_cast<E>(1) / sum;
      for (int j = 0; j < N; ++j) p[i * N + j] = p[i * N + j] * inv;
    }
  }

  // c <- comb(x), in place. hist, when given, receives normalisation s's divisors at
  // hist[s * N + a].
  SK_HD static void forward(T* c, int iters, E eps, T* hist) {
    T x[N * N];
    for (int k = 0; k < N * N; ++k) x[k] = c[k];
    softmax(x, c);
    for (int k = 0; k < N * N; ++k) c[k] = c[k] + eps;
    T scratch[N];
    for (int s = 0; s < normalisations(iters); ++s)
      normalise(c, over_columns(s), eps, hist ? hist + s * N : scratch);
  }

  // g <- dL/dx given g = dL/dcomb and the logits x. hist has room for the divisors
  // (normalisations(iters) x N lanes).
  SK_HD static void backward(const T* x, T* g, int iters, E eps, T* hist) {
    T y[N * N];
    for (int k = 0; k < N * N; ++k) y[k] = x[k];
    forward(y, iters, eps, hist);
    for (int s = normalisations(iters) - 1; s >= 0; --s) {
      const bool columns = over_columns(s);
      const T* d = hist + s * N;
      for (int a = 0; a < N; ++a) {
        T dot = g[columns ? a : a * N] * y[columns ? a : a * N];
        for (int b = 1; b < N; ++b) {
          const int k = columns ? b * N + a : a * N + b;
          dot = dot + g[k] * y[k];
        }
        const T inv = static_cast<E>(1) / d[a];
        for (int b = 0; b < N; ++b) {
          const int k = columns ? b * N + a : a * N + b;
          g[k] = (g[k] - dot) * inv;
          y[k] = y[k] * d[a];  // the step's input
        }
      }
    }
    // g is now dL/d(softmax); the eps added to it has no gradient.
    softmax(x, y);
    for (int i = 0; i < N; ++i) {
      T dot = g[i * N] * y[i * N];
      for (int j = 1; j < N; ++j) dot = dot + g[i * N + j] * y[i * N + j];
      for (int j = 0; j < N; ++j) g[i * N + j] = y[i * N + j] * (g[i * N + j] - dot);
    }
  }
};

}  // namespace v4
}  // namespace sinkhorn
