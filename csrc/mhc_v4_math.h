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

// Largest spread (max - min) of a problem's logits that the linear-domain iterations take with
// eps = 0 (the mHC paper's Sinkhorn, run as this one on the transpose). Every iterate is
// D1 exp(x) D2 with lines summing to 1, and the ratio of two divisors of one step is within
// exp(+-R), so every entry stays >= exp(-2 R) / n: for R = 32 and n <= 8 that is 2e-29, above
// FLT_MIN, and no sum underflows. A wider or non-finite problem runs the log-domain twin.
constexpr double kLinearSpread = 32;

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

// Index in a problem stored row-major of entry k of its transpose (the mHC paper's Sinkhorn is
// this one on the transpose, with eps = 0).
SK_HD int transposed(int k, int n) { return (k % n) * n + k / n; }

// Ops supplies the lane type's element type E, exp, log, max, reciprocals<K>(d, inv) (inv[a] =
// 1 / d[a] for a < K, exactly) and forward_reciprocals<K> (the same to within about an ulp, for
// the forward without a history, whose error does not build up through a walk back): scalar
// functions on the GPU, SIMD vector ones on the CPU. c holds n x n lanes row-major.
template <int N, typename T, typename Ops>
struct Problem {
  using E = typename Ops::E;

  // Index of entry b of line a: of row a, or of column a when COLUMNS. The axis is a template
  // argument everywhere below, so that after unrolling every index into a problem is a
  // compile-time constant and a GPU thread keeps its problem in registers (a runtime axis put it
  // in local memory: 1216 bytes of stack a thread at n = 4, the first H100 run's slow mHC
  // kernels). Loops over the normalisations pick the axis with a branch, the same in every thread.
  template <bool COLUMNS>
  SK_HD static int entry(int a, int b) { return COLUMNS ? b * N + a : a * N + b; }

  // Divides every column (or row) of c by its sum + eps and writes the divisors to d. The N
  // reciprocals are taken together (Ops::reciprocals: one branch for all of them in the CUDA
  // kernel, bit for bit 1 / d).
  template <bool COLUMNS>
  SK_HD static void normalise(T* c, E eps, T* d) {
    for (int a = 0; a < N; ++a) {
      T sum = c[entry<COLUMNS>(a, 0)];
      for (int b = 1; b < N; ++b) sum = sum + c[entry<COLUMNS>(a, b)];
      d[a] = sum + eps;
    }
    T inv[N];
    Ops::template reciprocals<N>(d, inv);
    for (int a = 0; a < N; ++a)
      for (int b = 0; b < N; ++b) {
        T& v = c[entry<COLUMNS>(a, b)];
        v = v * inv[a];
      }
  }

  // The backward of normalise over one axis: g <- (g - sum(g * y)) / d along each line, and y
  // (the step's output) <- y * d, the step's input.
  template <bool COLUMNS>
  SK_HD static void unnormalise(T* g, T* y, const T* d) {
    T inv[N];
    Ops::template reciprocals<N>(d, inv);
    for (int a = 0; a < N; ++a) {
      T dot = g[entry<COLUMNS>(a, 0)] * y[entry<COLUMNS>(a, 0)];
      for (int b = 1; b < N; ++b) {
        const int k = entry<COLUMNS>(a, b);
        dot = dot + g[k] * y[k];
      }
      for (int b = 0; b < N; ++b) {
        const int k = entry<COLUMNS>(a, b);
        g[k] = (g[k] - dot) * inv[a];
        y[k] = y[k] * d[a];
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
  // hist[s * N + a]. H is T* (nullptr for none) or math::History (sinkhorn_math.h: the CUDA
  // backward's divisors in shared memory). The loop takes a row and a column normalisation a
  // round, so that no axis is chosen at run time (a runtime choice made the CUDA compiler share
  // one multiply block between the axes and shuffle the reciprocals into it, 16 moves a step).
  template <typename H>
  SK_HD static void forward(T* c, int iters, E eps, H hist) {
    T x[N * N];
    for (int k = 0; k < N * N; ++k) x[k] = c[k];
    softmax(x, c);
    for (int k = 0; k < N * N; ++k) c[k] = c[k] + eps;
    forward_step<true>(c, eps, hist, 0);
    for (int s = 1; s < normalisations(iters); s += 2) {
      forward_step<false>(c, eps, hist, s);
      forward_step<true>(c, eps, hist, s + 1);
    }
  }

  // The forward without a history: the same normalisations kept as scalings, comb =
  // diag(a) K diag(b) with K = softmax(x) + eps, and comb written once at the end. A column step
  // is b_j <- b_j / (b_j t_j + eps) with t = K^T a (what comb's column sums divided by b are),
  // a row step a_i <- a_i / (a_i t_i + eps) with t = K b: N^2 fused multiply-adds and N
  // reciprocals a normalisation, where rescaling comb takes N^2 adds for the sums and N^2
  // multiplies. With eps = 0 (the paper's Sinkhorn) a step is just s <- 1 / t. The scalings stay
  // in range: within the linear domain's spread every one is within exp(+-2 kLinearSpread) n.
  SK_HD static void forward(T* c, int iters, E eps, decltype(nullptr)) {
    if (eps == static_cast<E>(0)) {
      forward_scaled<true>(c, iters, eps);
    } else {
      forward_scaled<false>(c, iters, eps);
    }
  }

  template <bool ZERO_EPS>
  SK_HD static void forward_scaled(T* c, int iters, E eps) {
    T k[N * N], a[N], b[N];
    softmax(c, k);
    for (int q = 0; q < N * N; ++q) k[q] = k[q] + eps;
    for (int i = 0; i < N; ++i) a[i] = T{} + static_cast<E>(1), b[i] = a[i];
    scale_step<true, ZERO_EPS>(k, a, b, eps);
    for (int s = 1; s < normalisations(iters); s += 2) {
      scale_step<false, ZERO_EPS>(k, a, b, eps);
      scale_step<true, ZERO_EPS>(k, a, b, eps);
    }
    for (int i = 0; i < N; ++i)
      for (int j = 0; j < N; ++j) c[i * N + j] = (a[i] * k[i * N + j]) * b[j];
  }

  // One normalisation of diag(a) K diag(b) over columns (COLUMNS: b changes) or rows (a).
  template <bool COLUMNS, bool ZERO_EPS>
  SK_HD static void scale_step(const T* k, T* a, T* b, E eps) {
    T* s = COLUMNS ? b : a;        // the scalings of the lines this step divides
    const T* o = COLUMNS ? a : b;  // the other side's
    T d[N], inv[N];
    for (int p = 0; p < N; ++p) {
      T t = k[entry<COLUMNS>(p, 0)] * o[0];
      for (int q = 1; q < N; ++q) t = t + k[entry<COLUMNS>(p, q)] * o[q];
      d[p] = ZERO_EPS ? t : s[p] * t + eps;
    }
    Ops::template forward_reciprocals<N>(d, inv);
    for (int p = 0; p < N; ++p) s[p] = ZERO_EPS ? inv[p] : s[p] * inv[p];
  }

  // Normalisation s (over columns when COLUMNS, which must be over_columns(s)), its divisors to
  // hist when given.
  template <bool COLUMNS, typename H>
  SK_HD static void forward_step(T* c, E eps, H hist, int s) {
    T d[N];
    normalise<COLUMNS>(c, eps, d);
    if (hist)
      for (int a = 0; a < N; ++a) hist[s * N + a] = d[a];
  }

  // The backward of normalisation s (COLUMNS as in forward_step) from its divisors in hist.
  template <bool COLUMNS, typename H>
  SK_HD static void backward_step(T* g, T* y, H hist, int s) {
    T d[N];
    for (int a = 0; a < N; ++a) d[a] = hist[s * N + a];
    unnormalise<COLUMNS>(g, y, d);
  }

  // g <- dL/dx given g = dL/dcomb and the logits x. hist has room for the divisors
  // (normalisations(iters) x N lanes). The walk back pairs the steps as forward does.
  template <typename H>
  SK_HD static void backward(const T* x, T* g, int iters, E eps, H hist) {
    T y[N * N];
    for (int k = 0; k < N * N; ++k) y[k] = x[k];
    forward(y, iters, eps, hist);
    for (int s = normalisations(iters) - 1; s >= 1; s -= 2) {  // s over columns, s - 1 rows
      backward_step<true>(g, y, hist, s);
      backward_step<false>(g, y, hist, s - 1);
    }
    backward_step<true>(g, y, hist, 0);
    // g is now dL/d(softmax); the eps added to it has no gradient.
    softmax(x, y);
    for (int i = 0; i < N; ++i) {
      T dot = g[i * N] * y[i * N];
      for (int j = 1; j < N; ++j) dot = dot + g[i * N + j] * y[i * N + j];
      for (int j = 0; j < N; ++j) g[i * N + j] = y[i * N + j] * (g[i * N + j] - dot);
    }
  }

  // ---- eps = 0 (the paper's Sinkhorn on the transpose) for logits of any spread ----

  // Per lane: whether the logits are outside what the linear domain takes with eps = 0 (a
  // non-finite entry, or a spread over kLinearSpread). A bool for a scalar T, a lane mask for
  // a vector.
  SK_HD static auto needs_log_domain(const T* x) {
    T lo = x[0], hi = x[0];
    auto bad = x[0] - x[0] != static_cast<E>(0);  // inf - inf and NaN - NaN are NaN
    for (int k = 1; k < N * N; ++k) {
      lo = x[k] < lo ? x[k] : lo;
      hi = Ops::max(hi, x[k]);
      bad = bad | (x[k] - x[k] != static_cast<E>(0));
    }
    return bad | (hi - lo > static_cast<E>(kLinearSpread));
  }

  // A NaN-sticky max: a NaN among masked entries must keep its line live.
  SK_HD static T nan_max(T m, T v) { return (v > m || v != v) ? v : m; }

  // The same iterations as forward with eps = 0, in the log domain: z <- z - LSE + log(target)
  // over each line, z holding log comb. Masked (-inf) entries follow the log-domain operator's
  // default marginals (MATH.md section 1; here on the transpose): a line with no finite entry
  // keeps its -inf, columns target 1 and rows (live columns) / (live rows). Returns the row
  // target; hist, when given, receives normalisation s's shift at hist[s * N + a].
  template <typename H>
  SK_HD static T log_iterate(T* z, int iters, H hist) {
    const T zero{};
    const T ninf = zero + math::neg_inf<E>();
    T live_rows = zero, live_cols = zero;
    for (int a = 0; a < N; ++a) {
      T row = z[a * N], col = z[a];
      for (int b = 1; b < N; ++b) {
        row = nan_max(row, z[a * N + b]);
        col = nan_max(col, z[b * N + a]);
      }
      live_rows = live_rows + (row != ninf ? zero + static_cast<E>(1) : zero);
      live_cols = live_cols + (col != ninf ? zero + static_cast<E>(1) : zero);
    }
    const T row_target = live_rows > zero ? live_cols / live_rows : zero + static_cast<E>(1);
    const T log_row_target = Ops::log(row_target);
    for (int s = -1; s < normalisations(iters); ++s) {  // s = -1: the softmax over rows
      T shift[N];
      if (s >= 0 && over_columns(s)) {
        log_normalise<true>(z, zero, shift);
      } else {
        log_normalise<false>(z, log_row_target, shift);
      }
      if (s >= 0 && hist)
        for (int a = 0; a < N; ++a) hist[s * N + a] = shift[a];
    }
    return row_target;
  }

  // One step of log_iterate over each line along the axis: z <- z - (LSE - log_target), the
  // shifts to shift (0 on a line with no finite entry, which stays -inf).
  template <bool COLUMNS>
  SK_HD static void log_normalise(T* z, T log_target, T* shift) {
    const T zero{};
    const T ninf = zero + math::neg_inf<E>();
    for (int a = 0; a < N; ++a) {
      T mx = z[entry<COLUMNS>(a, 0)];
      for (int b = 1; b < N; ++b) mx = nan_max(mx, z[entry<COLUMNS>(a, b)]);
      // A NaN line is live: its NaN spreads to the whole problem.
      const T live = mx != ninf ? zero + static_cast<E>(1) : zero;
      const T base = mx > ninf ? mx : zero;
      T sum = zero;
      for (int b = 0; b < N; ++b) sum = sum + Ops::exp(z[entry<COLUMNS>(a, b)] - base);
      // sum >= 1 on a live line; a dead line shifts by 0 and stays -inf.
      const T lse = base + Ops::log(live > zero ? sum : zero + static_cast<E>(1));
      shift[a] = live * (lse - log_target);
      for (int b = 0; b < N; ++b) {
        T& v = z[entry<COLUMNS>(a, b)];
        v = v - shift[a];
      }
    }
  }

  // c <- forward(c) with eps = 0, computed in the log domain.
  SK_HD static void log_forward(T* c, int iters) {
    log_iterate(c, iters, static_cast<T*>(nullptr));
    for (int k = 0; k < N * N; ++k) c[k] = Ops::exp(c[k]);
  }

  // backward with eps = 0, computed in the log domain. A step z' = z - LSE(z) + log t over a
  // line has dL/dz = dL/dz' - exp(z') / t * sum(dL/dz'), and dL/dz = dL/dcomb * comb at the
  // end; hist as in backward.
  template <typename H>
  SK_HD static void log_backward(const T* x, T* g, int iters, H hist) {
    T z[N * N];
    for (int k = 0; k < N * N; ++k) z[k] = x[k];
    const T inv_row_target = static_cast<E>(1) / log_iterate(z, iters, hist);
    for (int k = 0; k < N * N; ++k) g[k] = g[k] * Ops::exp(z[k]);
    for (int s = normalisations(iters) - 1; s >= -1; --s) {
      T shift[N];  // step s's shifts, added back to recover its input (none before the softmax)
      for (int a = 0; a < N; ++a) shift[a] = s >= 0 ? hist[s * N + a] : T{};
      if (s >= 0 && over_columns(s)) {
        log_unnormalise<true>(g, z, T{} + static_cast<E>(1), shift);
      } else {
        log_unnormalise<false>(g, z, inv_row_target, shift);
      }
    }
  }

  // The backward of one log_normalise step along the axis: g <- g - exp(z) / t * sum(g) over
  // each line, then z (the step's output) <- z + shift, the step's input.
  template <bool COLUMNS>
  SK_HD static void log_unnormalise(T* g, T* z, T inv_target, const T* shift) {
    for (int a = 0; a < N; ++a) {
      T dot = g[entry<COLUMNS>(a, 0)];
      for (int b = 1; b < N; ++b) dot = dot + g[entry<COLUMNS>(a, b)];
      dot = dot * inv_target;
      for (int b = 0; b < N; ++b) {
        const int k = entry<COLUMNS>(a, b);
        g[k] = g[k] - Ops::exp(z[k]) * dot;
        z[k] = z[k] + shift[a];
      }
    }
  }
};

}  // namespace v4
}  // namespace sinkhorn
