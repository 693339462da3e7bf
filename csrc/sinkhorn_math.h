// The math of one log-domain Sinkhorn step (MATH.md section 1), shared by the CPU and CUDA
// kernels: online log-sum-exp, the potential update with its empty-row guard, and the marginal
// error. Plain C++ on float/double; no ATen, so nvcc compiles it without torch.
#pragma once

#include <cfloat>
#include <cmath>

#if defined(__CUDACC__)
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline
#endif

namespace sinkhorn {
namespace math {

template <typename T>
SK_HD T neg_inf() {
  return -static_cast<T>(INFINITY);
}

template <typename T>
SK_HD T exp_(T x) {
  return ::exp(x);
}
template <>
SK_HD float exp_<float>(float x) {
  return ::expf(x);
}
template <typename T>
SK_HD T sqrt_(T x) {
  return ::sqrt(x);
}
template <>
SK_HD float sqrt_<float>(float x) {
  return ::sqrtf(x);
}
template <typename T>
SK_HD T log_(T x) {
  return ::log(x);
}
template <>
SK_HD float log_<float>(float x) {
  return ::logf(x);
}

// Running log-sum-exp: max and the sum of exp(x - max). The empty state (max = -inf) is the
// LSE of no terms, -inf; pushing -inf (a masked entry) leaves it unchanged, because
// exp(-inf - -inf) would be NaN.
template <typename T>
struct Lse {
  T max;
  T sum;
};

template <typename T>
SK_HD Lse<T> lse_empty() {
  return Lse<T>{neg_inf<T>(), T(0)};
}

template <typename T>
SK_HD void lse_push(Lse<T>& s, T x) {
  if (!(x > neg_inf<T>())) {
    if (x != x) s.max = x;  // NaN propagates (a NaN score makes its problem NaN, never a hang)
    return;
  }
  if (x > s.max) {
    s.sum = s.sum * exp_(s.max - x) + T(1);
    s.max = x;
  } else {
    s.sum += exp_(x - s.max);
  }
}

// Combines two partial states (tree reductions across threads or chunks).
template <typename T>
SK_HD Lse<T> lse_merge(Lse<T> a, Lse<T> b) {
  if (!(b.max > neg_inf<T>())) return (b.max != b.max) ? b : a;
  if (!(a.max > neg_inf<T>())) return (a.max != a.max) ? a : b;
  if (a.max >= b.max) return Lse<T>{a.max, a.sum + b.sum * exp_(b.max - a.max)};
  return Lse<T>{b.max, b.sum + a.sum * exp_(a.max - b.max)};
}

// LSE of a chunk whose max is already known: terms are exp(x - max).
template <typename T>
SK_HD T lse_value(Lse<T> s) {
  return (s.max > neg_inf<T>()) ? s.max + log_(s.sum) : s.max;
}

// New potential after a step: log(marginal) - LSE. An all -inf LSE (a row or column with no
// allowed entry) gives potential 0: the row stays zero, and no -inf + inf = NaN appears later.
// A NaN LSE (a NaN or +inf score) gives NaN, which then spreads over its problem only.
template <typename T>
SK_HD T potential(T log_marginal, T lse) {
  return (lse == neg_inf<T>()) ? T(0) : log_marginal - lse;
}

// The stabilised scaling form of the tiny solvers (CPU: cpu/tiny_solver.h and tiny_backward.h;
// CUDA: tiny_problem.h): K = exp(S + f (+) g) rescaled by multiplications, with an exact
// log-domain step every kScaledRefreshEvery steps and wherever an allowed line's sum falls below
// scaled_floor or an allowed entry of K below smallest_normal (where the linear form would lose
// digits to underflow); a pending product of a line's ratios joins a sum of logs once it would
// leave [1 / scaled_range, scaled_range].
constexpr int kScaledRefreshEvery = 16;
template <typename T>
SK_HD constexpr T scaled_floor() {
  return sizeof(T) == sizeof(double) ? T(1e-290) : T(1e-30);
}
template <typename T>
SK_HD constexpr T scaled_range() {
  return sizeof(T) == sizeof(double) ? T(1e100) : T(1e12);
}
template <typename T>
SK_HD constexpr T smallest_normal() {
  return sizeof(T) == sizeof(double) ? T(DBL_MIN) : T(FLT_MIN);
}

// The mass the current potentials give a row or column, exp(LSE + old potential), and its
// L1 distance to the target marginal, the stopping criterion of MATH.md section 1.
template <typename T>
SK_HD T marginal_error(T log_marginal, T lse, T old_potential) {
  const T mass = (lse == neg_inf<T>()) ? T(0) : exp_(lse + old_potential);  // NaN stays NaN
  const T target = (log_marginal > neg_inf<T>()) ? exp_(log_marginal) : T(0);
  const T d = mass - target;
  return d < T(0) ? -d : d;
}

// Weight of entry j in the softmax of a step whose LSE was `lse`, exp(x_j - lse), where x_j is
// the score plus the other axis' potential: the Jacobian of the step (MATH.md section 2.1). An
// empty row or column (lse = -inf) left its potential constant: weight 0, not exp(NaN).
template <typename T>
SK_HD T step_weight(T x, T lse) {
  return (lse == neg_inf<T>()) ? T(0) : exp_(x - lse);
}

// Default marginals (MATH.md section 1): a_i = 1 on rows with an allowed entry, and the same
// total mass spread over the allowed columns, b_j = rows / cols; empty rows and columns get 0.
template <typename T>
SK_HD T default_log_a(bool alive) {
  return alive ? T(0) : neg_inf<T>();
}
template <typename T>
SK_HD T default_log_b(bool alive, long long alive_rows, long long alive_cols) {
  return (alive && alive_rows > 0) ? log_(T(alive_rows) / T(alive_cols)) : neg_inf<T>();
}

// A per-thread history (a backward's record of its forward steps) spread over memory with a
// stride: entry k of one thread's history at base[k * stride]. The CUDA backwards of the tiny
// and mHC paths keep their threads' histories in shared memory this way, entry k of consecutive
// threads in consecutive words (no bank conflicts), where a local array would cost local-memory
// traffic; the CPU kernels pass plain arrays (T*) to the same functions.
template <typename T>
struct History {
  T* base;
  int stride;
  SK_HD T& operator[](int64_t k) const { return base[k * stride]; }
  SK_HD explicit operator bool() const { return base != nullptr; }
};

}  // namespace math
}  // namespace sinkhorn
