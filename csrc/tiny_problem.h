// One small Sinkhorn problem (n, m <= NMAX) solved start to finish by one thread: the
// log-domain iteration of MATH.md section 1 with the formulas of sinkhorn_math.h. The scores are
// padded to NMAX x NMAX with -inf (padded rows and columns are empty: zero marginal, potential
// 0), so every loop has compile-time bounds and a GPU thread keeps the problem in registers.
// The CUDA tiny paths (cuda/tiny_forward.cu, cuda/tiny_backward.cu) run it a thread per
// problem; the GoogleTest suite runs it on the host against the CPU operator, which checks this
// math without a GPU.
#pragma once

#include <cstdint>

#include "sinkhorn_math.h"

// Full unrolling in device code, where it keeps the arrays in registers; the host compiler
// (including nvcc's host pass, which would warn about the pragma) decides for itself.
#if defined(__CUDA_ARCH__)
#define SK_UNROLL _Pragma("unroll")
#else
#define SK_UNROLL
#endif

namespace sinkhorn {

template <int NMAX, typename T>
struct TinyProblem {
  T s[NMAX * NMAX];  // scores, -inf on masked and padded entries
  T la[NMAX], lb[NMAX];  // log marginals, -inf on padding
  T f[NMAX], g[NMAX];    // potentials
  int n = 0, m = 0;

  // Sets n, m and pads: s must then be filled for i < n, j < m.
  SK_HD void reset(int rows, int cols) {
    n = rows;
    m = cols;
    SK_UNROLL
    for (int k = 0; k < NMAX * NMAX; ++k) s[k] = math::neg_inf<T>();
    SK_UNROLL
    for (int a = 0; a < NMAX; ++a) {
      la[a] = lb[a] = math::neg_inf<T>();
      f[a] = g[a] = T(0);
    }
  }

  // The default marginals of MATH.md section 1 from the finite pattern of s.
  SK_HD void default_marginals() {
    bool col_alive[NMAX];
    long long rows = 0, cols = 0;
    SK_UNROLL
    for (int j = 0; j < NMAX; ++j) col_alive[j] = false;
    SK_UNROLL
    for (int i = 0; i < NMAX; ++i) {
      bool alive = false;
      SK_UNROLL
      for (int j = 0; j < NMAX; ++j) {
        const bool allowed = s[i * NMAX + j] != math::neg_inf<T>();
        alive = alive || allowed;
        col_alive[j] = col_alive[j] || allowed;
      }
      la[i] = math::default_log_a<T>(alive);
      rows += alive;
    }
    SK_UNROLL
    for (int j = 0; j < NMAX; ++j) cols += col_alive[j];
    SK_UNROLL
    for (int j = 0; j < NMAX; ++j) lb[j] = math::default_log_b<T>(col_alive[j], rows, cols);
  }

  // LSE over the other axis of s + the other potential, for row (ROW) or column a: max shift,
  // NaN sticky, NaN for a +inf score, -inf for an empty line. The axis is a template argument
  // so that every index is a compile-time constant once unrolled (a GPU thread then keeps s, f
  // and g in registers); lse(row, a) picks it at run time.
  template <bool ROW>
  SK_HD T lse_along(int a) const {
    T mx = math::neg_inf<T>();
    SK_UNROLL
    for (int b = 0; b < NMAX; ++b) {
      const T v = ROW ? s[a * NMAX + b] + g[b] : s[b * NMAX + a] + f[b];
      mx = (v > mx || v != v) ? v : mx;
    }
    if (!(mx > math::neg_inf<T>())) return mx;                      // empty line, or NaN
    if (mx == -math::neg_inf<T>()) return mx - mx;                   // +inf score: NaN
    T sum = T(0);
    SK_UNROLL
    for (int b = 0; b < NMAX; ++b) {
      const T v = ROW ? s[a * NMAX + b] + g[b] : s[b * NMAX + a] + f[b];
      sum += v == math::neg_inf<T>() ? T(0) : math::exp_(v - mx);
    }
    return mx + math::log_(sum);
  }
  SK_HD T lse(bool row, int a) const { return row ? lse_along<true>(a) : lse_along<false>(a); }

  // A step's potential update from its LSEs l: f (row) or g (column) = log marginal - l.
  SK_HD void set_potentials(bool row, const T* l) {
    SK_UNROLL
    for (int a = 0; a < NMAX; ++a) {
      if (row) {
        f[a] = math::potential(la[a], l[a]);
      } else {
        g[a] = math::potential(lb[a], l[a]);
      }
    }
  }

  // P_ij = exp(s_ij + f_i + g_j).
  SK_HD T plan(int i, int j) const { return math::exp_(s[i * NMAX + j] + f[i] + g[j]); }

  // Runs at most `steps` steps from f = g = 0 (MATH.md section 1: alternating, per-problem
  // stopping before step k >= 1 once the marginal that step fixes is within tol * sum(a)).
  // Returns the steps run and sets *error to the error of the marginal the last step did not
  // fix (the stopping error when it stopped early).
  SK_HD int64_t solve(int64_t steps, bool start_row, double tol, T* error) {
    T mass = T(0);
    SK_UNROLL
    for (int i = 0; i < NMAX; ++i) mass += la[i] > math::neg_inf<T>() ? math::exp_(la[i]) : T(0);
    const T threshold = static_cast<T>(tol) * mass;
    for (int64_t k = 0; k < steps; ++k) {
      const bool row = ((k % 2) == 0) == start_row;
      T l[NMAX];
      T err = T(0);
      SK_UNROLL
      for (int a = 0; a < NMAX; ++a) {
        l[a] = lse(row, a);
        err += math::marginal_error(row ? la[a] : lb[a], l[a], row ? f[a] : g[a]);
      }
      if (tol > 0 && k >= 1 && err <= threshold) {
        *error = err;
        return k;
      }
      set_potentials(row, l);
    }
    *error = unfixed_error(steps, start_row);
    return steps;
  }

  // The error of the marginal that the last of `steps` steps did not fix: the columns after a
  // row step, and the rows when no step ran and the first would be a row step.
  SK_HD T unfixed_error(int64_t steps, bool start_row) const {
    const bool last_row = steps == 0 ? !start_row : (((steps - 1) % 2) == 0) == start_row;
    T err = T(0);
    SK_UNROLL
    for (int a = 0; a < NMAX; ++a) {
      T sum = T(0);
      SK_UNROLL
      for (int b = 0; b < NMAX; ++b) sum += last_row ? plan(b, a) : plan(a, b);
      const T lm = last_row ? lb[a] : la[a];
      const T d = sum - (lm > math::neg_inf<T>() ? math::exp_(lm) : T(0));
      err += d < T(0) ? -d : d;
    }
    return err;
  }

  // Exact log-domain steps bound the scaling form's drift (solve_scaled).
  static constexpr int64_t kRefreshEvery = math::kScaledRefreshEvery;

  // solve() in the stabilised scaling form (the CPU tiny solver's, csrc/cpu/tiny_solver.h, for
  // one problem): K = exp(S + f (+) g) is kept, a step sums it along one axis and rescales each
  // line by target / sum, a multiplication an entry instead of an exponential. The potentials'
  // increments are kept apart as products (prod) and, once a product would leave
  // [1/range, range], as sums of logs (acc), and join the potentials at the exact steps: step 0,
  // every kRefreshEvery-th step, any step where an allowed line's sum falls below the floor
  // (where the linear form would lose mass to underflow) or an allowed entry of K between two
  // lines with nonzero targets falls below the smallest normal number, and every step of a
  // problem with a NaN or +inf score (whose NaN must spread as in the log domain). An exact step is the log-domain
  // step, which also rebuilds K. The same iterates as solve() up to rounding; same stopping.
  SK_HD int64_t solve_scaled(int64_t steps, bool start_row, double tol, T* error) {
    const T ninf = math::neg_inf<T>();
    Scaled st;
    T mass = T(0);
    st.nonfinite = false;
    SK_UNROLL
    for (int a = 0; a < NMAX; ++a) {
      st.target[0][a] = la[a] > ninf ? math::exp_(la[a]) : T(0);
      st.target[1][a] = lb[a] > ninf ? math::exp_(lb[a]) : T(0);
      mass += st.target[0][a];
      st.prod[0][a] = st.prod[1][a] = T(1);
      st.acc[0][a] = st.acc[1][a] = T(0);
    }
    SK_UNROLL
    for (int k = 0; k < NMAX * NMAX; ++k) st.nonfinite = st.nonfinite || !(s[k] < -ninf);
    st.tol = tol;
    st.threshold = static_cast<T>(tol) * mass;
    for (int64_t k = 0; k < steps; ++k) {
      // The axis as a template argument: every array index is then a compile-time constant,
      // which keeps the arrays in a GPU thread's registers.
      const bool row = ((k % 2) == 0) == start_row;
      if (row ? scaled_step<true>(st, k, error) : scaled_step<false>(st, k, error)) return k;
    }
    fold(st);
    *error = unfixed_error(steps, start_row);
    return steps;
  }

 private:
  // solve_scaled's state: the targets a and b, K, the pending increments of f and g.
  struct Scaled {
    T target[2][NMAX], prod[2][NMAX], acc[2][NMAX], K[NMAX * NMAX];
    T threshold;
    double tol;
    bool nonfinite;
  };

  // Adds the pending increments to the potentials.
  SK_HD void fold(Scaled& st) {
    SK_UNROLL
    for (int a = 0; a < NMAX; ++a) {
      f[a] += st.acc[0][a] + log0(st.prod[0][a]);
      g[a] += st.acc[1][a] + log0(st.prod[1][a]);
      st.prod[0][a] = st.prod[1][a] = T(1);
      st.acc[0][a] = st.acc[1][a] = T(0);
    }
  }

  // Step k of solve_scaled, a row step (ROW) or a column step. Returns whether the problem
  // stopped before it (then *error is the stopping error and the potentials are final).
  template <bool ROW>
  SK_HD bool scaled_step(Scaled& st, int64_t k, T* error) {
    constexpr int ax = ROW ? 0 : 1;
    const T ninf = math::neg_inf<T>();
    const T floor = math::scaled_floor<T>(), range = math::scaled_range<T>();
    const T tiny = math::smallest_normal<T>();
    T got[NMAX], l[NMAX];  // the marginal under the current potentials; the exact step's LSEs
    bool exact = k == 0 || st.nonfinite || k % kRefreshEvery == 0;
    if (!exact) {  // K is set from step 0 on
      SK_UNROLL
      for (int a = 0; a < NMAX; ++a) {
        T sum = T(0);
        SK_UNROLL
        for (int b = 0; b < NMAX; ++b) {
          const int e = ROW ? a * NMAX + b : b * NMAX + a;
          sum += st.K[e];
          // An allowed entry of two live lines below the smallest normal number has lost
          // digits (or all of them), which later steps could scale up to matter: it must come
          // from the potentials.
          exact = exact || (st.K[e] < tiny && s[e] != ninf && st.target[ax][a] > T(0) &&
                            st.target[1 - ax][b] > T(0));
        }
        got[a] = sum;
        exact = exact || (sum < floor && st.target[ax][a] > T(0));
      }
    }
    if (exact) {
      fold(st);
      SK_UNROLL
      for (int a = 0; a < NMAX; ++a) {
        l[a] = lse_along<ROW>(a);
        got[a] = l[a] == ninf ? T(0) : math::exp_(l[a] + (ROW ? f[a] : g[a]));
      }
    }
    if (st.tol > 0 && k >= 1) {
      T err = T(0);
      SK_UNROLL
      for (int a = 0; a < NMAX; ++a) {
        const T d = got[a] - st.target[ax][a];
        err += d < T(0) ? -d : d;
      }
      if (err <= st.threshold) {
        fold(st);
        *error = err;
        return true;
      }
    }
    if (exact) {
      set_potentials(ROW, l);
      // K = exp(S + f (+) g) from the new potentials: for an empty line (LSE -inf) every entry
      // is 0 (masked), and a NaN LSE makes its line NaN.
      SK_UNROLL
      for (int e = 0; e < NMAX * NMAX; ++e) {
        const T x = s[e];
        st.K[e] = x == ninf ? T(0) : math::exp_(x + f[e / NMAX] + g[e % NMAX]);
      }
      return false;
    }
    SK_UNROLL
    for (int a = 0; a < NMAX; ++a) {
      // An empty line keeps its potential (math::potential); a zero target empties the line.
      const T ratio = got[a] > T(0) ? st.target[ax][a] / got[a] : T(1);
      SK_UNROLL
      for (int b = 0; b < NMAX; ++b) st.K[ROW ? a * NMAX + b : b * NMAX + a] *= ratio;
      const T next = st.prod[ax][a] * ratio;
      if (next > range || next < T(1) / range) {
        st.acc[ax][a] += log0(st.prod[ax][a]) + log0(ratio);
        st.prod[ax][a] = T(1);
      } else {
        st.prod[ax][a] = next;
      }
    }
    return false;
  }

 public:
  // log x, and -inf for x = 0 (a zero target's ratio).
  static SK_HD T log0(T x) { return x > T(0) ? math::log_(x) : math::neg_inf<T>(); }

  // Most steps the backward takes: it keeps every step's LSEs (steps x NMAX values; a GPU
  // thread's shared-memory or local history).
  static constexpr int64_t kMaxBackwardSteps = 64;

  // The unrolled backward (MATH.md section 2.1) of `steps` steps from f = g = 0 with the
  // marginals la, lb: replays, keeping each step's LSEs in lse_hist (steps x NMAX; T* or
  // math::History), then reverses. In: ds = dL/dP, uf = dL/df and ug = dL/dg (zeros when
  // absent; padding zero). Out: ds = dL/dS, dla = dL/d(log a), dlb = dL/d(log b).
  template <typename H>
  SK_HD void backward(int64_t steps, bool start_row, H lse_hist, T* ds, T* uf, T* ug, T* dla,
                      T* dlb) {
    SK_UNROLL
    for (int a = 0; a < NMAX; ++a) f[a] = g[a] = dla[a] = dlb[a] = T(0);
    for (int64_t t = 0; t < steps; ++t) {
      const bool row = ((t % 2) == 0) == start_row;
      T l[NMAX];
      SK_UNROLL
      for (int a = 0; a < NMAX; ++a) {
        l[a] = lse(row, a);
        lse_hist[t * NMAX + a] = l[a];
      }
      set_potentials(row, l);
    }
    // The output P = exp(S + f (+) g): dS += Gamma = dL/dP * P; Gamma's sums join dL/df, dL/dg.
    SK_UNROLL
    for (int i = 0; i < NMAX; ++i)
      SK_UNROLL
      for (int j = 0; j < NMAX; ++j) {
        const T gamma = ds[i * NMAX + j] * plan(i, j);
        ds[i * NMAX + j] = gamma;
        uf[i] += gamma;
        ug[j] += gamma;
      }
    for (int64_t t = steps - 1; t >= 0; --t) {
      const bool row = ((t % 2) == 0) == start_row;
      T l[NMAX], before[NMAX];  // before: the other potential as step t read it (step t-1's)
      SK_UNROLL
      for (int a = 0; a < NMAX; ++a) {
        l[a] = lse_hist[t * NMAX + a];
        before[a] = t > 0 ? math::potential(row ? lb[a] : la[a], lse_hist[(t - 1) * NMAX + a])
                          : T(0);
      }
      if (row) {
        reverse_step<true>(l, before, ds, uf, ug, dla, dlb);
      } else {
        reverse_step<false>(l, before, ds, uf, ug, dla, dlb);
      }
    }
  }

 private:
  // The backward of one step over rows (ROW) or columns, given its LSEs l and the other
  // potential as it read it: dS -= u_a * w_ab, the other side's adjoint -= the same, the
  // marginal's adjoint += u_a on a live line, and u (consumed: the step overwrote it) = 0.
  template <bool ROW>
  SK_HD void reverse_step(const T* l, const T* before, T* ds, T* uf, T* ug, T* dla,
                          T* dlb) const {
    SK_UNROLL
    for (int a = 0; a < NMAX; ++a) {
      const T u = ROW ? uf[a] : ug[a];
      SK_UNROLL
      for (int b = 0; b < NMAX; ++b) {
        const int k = ROW ? a * NMAX + b : b * NMAX + a;
        const T w = u * math::step_weight(s[k] + before[b], l[a]);
        ds[k] -= w;
        if (ROW) {
          ug[b] -= w;
        } else {
          uf[b] -= w;
        }
      }
      if (l[a] > math::neg_inf<T>()) {
        if (ROW) {
          dla[a] += u;
        } else {
          dlb[a] += u;
        }
      }
      if (ROW) {
        uf[a] = T(0);
      } else {
        ug[a] = T(0);
      }
    }
  }
};

}  // namespace sinkhorn
