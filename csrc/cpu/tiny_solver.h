// CPU path for tiny problems (both sides <= kTinyMax, e.g. mHC's 4 x 4): one SIMD vector of problems at a
// time in structure-of-arrays form, so that every inner loop runs across problems and
// vectorises, with no per-problem or per-row call overhead. Same math as solver.h (the shared
// header), same per-problem early stopping (frozen lanes), one read of S and one write of P.
#pragma once

#include "isa_prelude.h"
#include "vec_math.h"

namespace sinkhorn_ops {
namespace cpu {
namespace {  // internal linkage: one copy per ISA translation unit (see solver.h)

constexpr int64_t kTinyMax = 16;
constexpr int64_t kRefreshEvery = 16;  // exact log-domain steps bound the scaling form's drift

template <typename scalar_t, typename acc_t>
struct TinySolver {
  using V = std::conditional_t<std::is_same_v<acc_t, double>, VecD, VecF>;
  static constexpr int64_t L = sizeof(V) / sizeof(acc_t);  // problems per group
  const sinkhorn::FwdParams& p;

  // Loads problems [b0, b0 + count) of a (B, n, m) array into lanes; unused lanes repeat the
  // last problem.
  template <typename T>
  void load(const T* X, int64_t b0, int64_t count, V* out) const {
    const int64_t nm = p.n * p.m;
    for (int64_t l = 0; l < L; ++l) {
      const T* src = X + (b0 + std::min(l, count - 1)) * nm;
      for (int64_t k = 0; k < nm; ++k) out[k][l] = static_cast<acc_t>(src[k]);
    }
  }

  // lse[i] = LSE over the other axis of S + the other potential (max shift, NaN sticky), for
  // every row (ax = 0) or column (ax = 1).
  void lse_pass(int ax, const V* s, const V (*pot)[kTinyMax], V* lse) const {
    const int64_t m = p.m, len = ax ? p.m : p.n, other = ax ? p.n : p.m;
    const V ninf = splat<V>(sinkhorn::math::neg_inf<acc_t>());
    const V pinf = -ninf, zero = splat<V>(0), one = splat<V>(1);
    for (int64_t i = 0; i < len; ++i) {
      V mx = ninf, sum = zero;
      for (int64_t j = 0; j < other; ++j) {
        const V v = s[ax ? j * m + i : i * m + j] + pot[1 - ax][j];
        mx = (v > mx || v != v) ? v : mx;
      }
      for (int64_t j = 0; j < other; ++j) {
        const V v = s[ax ? j * m + i : i * m + j] + pot[1 - ax][j];
        sum += v == ninf ? zero : exp_vec(v - mx);
      }
      const auto finite = mx > ninf && mx < pinf;
      const V lg = log_vec(finite ? sum : one);
      lse[i] = finite ? mx + lg : (mx == pinf ? mx - mx : mx);  // +inf score: NaN
    }
  }

  // math::potential, lane by lane.
  static V potential(V log_marginal, V lse) {
    const V ninf = splat<V>(sinkhorn::math::neg_inf<acc_t>());
    return lse > ninf ? log_marginal - lse : splat<V>(0);
  }

  // Solves problems [b0, b0 + count), count <= L.
  void solve_group(int64_t b0, int64_t count) const {
    const int64_t n = p.n, m = p.m, nm = n * m;
    const V ninf = splat<V>(sinkhorn::math::neg_inf<acc_t>());
    const V zero = splat<V>(0), one = splat<V>(1);
    V s[kTinyMax * kTinyMax];
    V pot[2][kTinyMax];     // f, g
    V lm[2][kTinyMax];      // log a, log b
    V target[2][kTinyMax];  // a, b
    V lse[kTinyMax], mass = zero, done = zero;
    int64_t used[L];

    load(static_cast<const scalar_t*>(p.scores), b0, count, s);
    for (int64_t l = 0; l < L; ++l) used[l] = p.steps;
    load_marginals(b0, count, s, lm);
    for (int ax = 0; ax < 2; ++ax)
      for (int64_t i = 0; i < (ax ? m : n); ++i) {
        target[ax][i] = lm[ax][i] > ninf ? exp_vec(lm[ax][i]) : zero;
        pot[ax][i] = zero;
      }
    for (int64_t i = 0; i < n; ++i) mass += target[0][i];
    const V threshold = mass * static_cast<acc_t>(p.tol);

    // Steps run in the scaling form: K = exp(S + f (+) g) is kept, a step sums it along one
    // axis and rescales by target / sum, and the potential gains log(target / sum): one log per
    // row instead of one exp per entry, the same iterate as the log-domain step. Step 0, every
    // kRefreshEvery-th step, any step where an allowed sum falls below floor_mass (where the
    // linear form would lose mass to underflow), and groups with a +inf score take the exact
    // log-domain step instead and rebuild K from the potentials.
    V K[kTinyMax * kTinyMax];
    V dpot[2][kTinyMax] = {};  // the potentials' increments since the last exact step
    bool has_pinf = false;
    for (int64_t k = 0; k < nm; ++k)
      for (int64_t l = 0; l < L; ++l) has_pinf = has_pinf || s[k][l] == -ninf[0];
    const V floor_mass = splat<V>(std::is_same_v<acc_t, double> ? acc_t(1e-290) : acc_t(1e-30));
    for (int64_t k = 0; k < p.steps; ++k) {
      const int ax = ((k % 2 == 0) == p.start_row) ? 0 : 1;  // 0: row step, 1: column step
      const int64_t len = ax ? m : n, other = ax ? n : m;
      auto at = [&](int64_t i, int64_t j) -> V& { return K[ax ? j * m + i : i * m + j]; };
      V got[kTinyMax];  // the marginal under the current potentials, along this step's axis
      bool exact = k == 0 || has_pinf || k % kRefreshEvery == 0;
      if (!exact) {
        for (int64_t i = 0; i < len; ++i) {
          V sum = zero;
          for (int64_t j = 0; j < other; ++j) sum += at(i, j);
          got[i] = sum;
          const auto low = sum < floor_mass && target[ax][i] > zero;
          for (int64_t l = 0; l < L; ++l) exact = exact || low[l];
        }
      }
      if (exact) {
        fold(pot, dpot);
        lse_pass(ax, s, pot, lse);
        for (int64_t i = 0; i < len; ++i)
          got[i] = lse[i] > ninf ? exp_vec(lse[i] + pot[ax][i]) : zero;
      }
      if (p.tol > 0 && k >= 1) {
        V err = zero;
        for (int64_t i = 0; i < len; ++i) {
          const V d = got[i] - target[ax][i];
          err += d < zero ? -d : d;
        }
        const auto stop = done == zero && err <= threshold;
        bool all_done = true;
        for (int64_t l = 0; l < L; ++l) {
          if (stop[l]) {
            used[l] = k;
            if (l < count) static_cast<acc_t*>(p.error)[b0 + l] = err[l];
          }
        }
        done = stop ? one : done;
        for (int64_t l = 0; l < L; ++l) all_done = all_done && done[l] != 0;
        if (all_done) break;
      }
      if (exact) {
        for (int64_t i = 0; i < len; ++i)
          pot[ax][i] = done != zero ? pot[ax][i] : potential(lm[ax][i], lse[i]);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < m; ++j)
            K[i * m + j] = exp_vec(s[i * m + j] + pot[0][i] + pot[1][j]);
        continue;
      }
      for (int64_t i = 0; i < len; ++i) {
        // An empty row keeps its potential (math::potential); a zero target empties the row.
        V ratio = got[i] > zero ? target[ax][i] / got[i] : one;
        ratio = done != zero ? one : ratio;
        dpot[ax][i] += ratio > zero ? log_vec(ratio) : ninf;
        for (int64_t j = 0; j < other; ++j) at(i, j) *= ratio;
      }
    }
    fold(pot, dpot);
    write(b0, count, s, pot, target, used, done);
  }

  // Adds the scaling steps' increments to the potentials. They are kept apart in between:
  // added one by one to a large potential (|f| ~ 1e4 for extreme logits) each would round at
  // that potential's ulp.
  void fold(V (*pot)[kTinyMax], V (*dpot)[kTinyMax]) const {
    for (int ax = 0; ax < 2; ++ax)
      for (int64_t i = 0; i < (ax ? p.m : p.n); ++i) {
        pot[ax][i] += dpot[ax][i];
        dpot[ax][i] = splat<V>(0);
      }
  }

  void load_marginals(int64_t b0, int64_t count, const V* s, V (*lm)[kTinyMax]) const {
    const int64_t n = p.n, m = p.m;
    if (p.log_a) {
      const acc_t* la = static_cast<const acc_t*>(p.log_a);
      const acc_t* lb = static_cast<const acc_t*>(p.log_b);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t b = b0 + std::min(l, count - 1);
        for (int64_t i = 0; i < n; ++i) lm[0][i][l] = la[b * n + i];
        for (int64_t j = 0; j < m; ++j) lm[1][j][l] = lb[b * m + j];
      }
      return;
    }
    for (int64_t l = 0; l < L; ++l) {
      bool col_alive[kTinyMax] = {};
      int64_t rows = 0, cols = 0;
      for (int64_t i = 0; i < n; ++i) {
        bool alive = false;
        for (int64_t j = 0; j < m; ++j) {
          const bool a = s[i * m + j][l] != sinkhorn::math::neg_inf<acc_t>();
          alive = alive || a;
          col_alive[j] = col_alive[j] || a;
        }
        lm[0][i][l] = sinkhorn::math::default_log_a<acc_t>(alive);
        rows += alive;
      }
      for (int64_t j = 0; j < m; ++j) cols += col_alive[j];
      for (int64_t j = 0; j < m; ++j)
        lm[1][j][l] = sinkhorn::math::default_log_b<acc_t>(col_alive[j], rows, cols);
    }
  }

  // P = exp(S + f + g), the potentials, the steps used, and the error of the marginal the last step did not fix
  // for the lanes that did not stop early.
  void write(int64_t b0, int64_t count, const V* s, const V (*pot)[kTinyMax],
             const V (*target)[kTinyMax], const int64_t* used, V done) const {
    const int64_t n = p.n, m = p.m, nm = n * m;
    V rs[kTinyMax] = {}, cs[kTinyMax] = {};
    scalar_t* P = static_cast<scalar_t*>(p.plan);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) {
        const V e = exp_vec(s[i * m + j] + pot[0][i] + pot[1][j]);
        rs[i] += e;
        cs[j] += e;
        for (int64_t l = 0; l < count; ++l) P[(b0 + l) * nm + i * m + j] = static_cast<scalar_t>(e[l]);
      }
    acc_t* F = static_cast<acc_t*>(p.f);
    acc_t* G = static_cast<acc_t*>(p.g);
    for (int64_t l = 0; l < count; ++l) {
      for (int64_t i = 0; i < n; ++i) F[(b0 + l) * n + i] = pot[0][i][l];
      for (int64_t j = 0; j < m; ++j) G[(b0 + l) * m + j] = pot[1][j][l];
      p.steps_used[b0 + l] = used[l];
      if (done[l] != 0) continue;
      const int64_t k = used[l];
      const bool last_row = k == 0 ? !p.start_row : ((k - 1) % 2 == 0) == p.start_row;
      acc_t e = 0;
      if (last_row) {
        for (int64_t j = 0; j < m; ++j) e += std::abs(cs[j][l] - target[1][j][l]);
      } else {
        for (int64_t i = 0; i < n; ++i) e += std::abs(rs[i][l] - target[0][i][l]);
      }
      static_cast<acc_t*>(p.error)[b0 + l] = e;
    }
  }
};

// The unrolled backward (backward_solver.h) of one SIMD vector of tiny problems at a time:
// replay with every step's LSE kept, then the reversed steps, all across lanes. A lane whose
// problem ran fewer steps than the group's longest is frozen in the replay and inactive in the
// reverse. (The replay takes log-domain steps only: the exact LSEs are what the reverse needs.)
template <typename scalar_t, typename acc_t>
struct TinyBackward {
  using Fwd = TinySolver<scalar_t, acc_t>;
  using V = typename Fwd::V;
  static constexpr int64_t L = Fwd::L;
  const sinkhorn::BwdParams& q;
  const Fwd& fwd;  // its params view the same scores and marginals

  void solve_group(int64_t b0, int64_t count, V* hist) const {
    const int64_t n = q.n, m = q.m, nm = n * m;
    const V ninf = splat<V>(sinkhorn::math::neg_inf<acc_t>()), zero = splat<V>(0);
    V s[kTinyMax * kTinyMax], ds[kTinyMax * kTinyMax];
    V lm[2][kTinyMax], pot[2][kTinyMax] = {}, u[2][kTinyMax] = {}, dl[2][kTinyMax] = {};
    int64_t K[L], kmax = 0;
    fwd.load(static_cast<const scalar_t*>(q.scores), b0, count, s);
    fwd.load_marginals(b0, count, s, lm);
    for (int64_t l = 0; l < L; ++l) {
      K[l] = std::min(std::max<int64_t>(q.steps_used[b0 + std::min(l, count - 1)], 0), q.max_steps);
      kmax = std::max(kmax, K[l]);
    }
    auto active = [&](int64_t t) {
      V act = zero;
      for (int64_t l = 0; l < L; ++l) act[l] = t < K[l] ? acc_t(1) : acc_t(0);
      return act;
    };
    auto axis = [&](int64_t t) { return ((t % 2 == 0) == q.start_row) ? 0 : 1; };

    for (int64_t t = 0; t < kmax; ++t) {  // replay
      const int ax = axis(t);
      V* lse = hist + t * kTinyMax;
      fwd.lse_pass(ax, s, pot, lse);
      const V act = active(t);
      for (int64_t i = 0; i < (ax ? m : n); ++i)
        pot[ax][i] = act != zero ? Fwd::potential(lm[ax][i], lse[i]) : pot[ax][i];
    }
    fwd.load(static_cast<const scalar_t*>(q.grad_plan), b0, count, ds);  // Gbar
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) {
        const V gamma = ds[i * m + j] * exp_vec(s[i * m + j] + pot[0][i] + pot[1][j]);
        ds[i * m + j] = gamma;
        u[0][i] += gamma;
        u[1][j] += gamma;
      }
    const acc_t* upstream[2] = {static_cast<const acc_t*>(q.grad_f),
                                static_cast<const acc_t*>(q.grad_g)};
    for (int ax = 0; ax < 2; ++ax) {
      const int64_t len = ax ? m : n;
      if (upstream[ax])
        for (int64_t l = 0; l < L; ++l)
          for (int64_t i = 0; i < len; ++i)
            u[ax][i][l] += upstream[ax][(b0 + std::min(l, count - 1)) * len + i];
    }

    for (int64_t t = kmax - 1; t >= 0; --t) {  // reverse
      const int ax = axis(t);
      const int64_t len = ax ? m : n, other = ax ? n : m;
      const V* lse = hist + t * kTinyMax;
      const V act = active(t);
      V before[kTinyMax];  // the other axis' potential that step t read: step t-1's
      for (int64_t j = 0; j < other; ++j)
        before[j] = t > 0 ? Fwd::potential(lm[1 - ax][j], hist[(t - 1) * kTinyMax + j]) : zero;
      for (int64_t i = 0; i < len; ++i) {
        const V ui = act != zero ? u[ax][i] : zero;
        const auto live = lse[i] > ninf;
        for (int64_t j = 0; j < other; ++j) {
          const int64_t k = ax ? j * m + i : i * m + j;
          const V w = live ? ui * exp_vec(s[k] + before[j] - lse[i]) : zero;  // step_weight
          ds[k] -= w;
          u[1 - ax][j] -= w;
        }
        dl[ax][i] += live ? ui : zero;
        u[ax][i] = act != zero ? zero : u[ax][i];  // consumed: the step overwrote it
      }
    }
    scalar_t* dS = static_cast<scalar_t*>(q.grad_scores);
    acc_t* dlog[2] = {static_cast<acc_t*>(q.grad_log_a), static_cast<acc_t*>(q.grad_log_b)};
    for (int64_t l = 0; l < count; ++l) {
      for (int64_t k = 0; k < nm; ++k) dS[(b0 + l) * nm + k] = static_cast<scalar_t>(ds[k][l]);
      for (int64_t i = 0; i < n; ++i) dlog[0][(b0 + l) * n + i] = dl[0][i][l];
      for (int64_t j = 0; j < m; ++j) dlog[1][(b0 + l) * m + j] = dl[1][j][l];
    }
  }
};

template <typename scalar_t>
bool backward_tiny(const sinkhorn::BwdParams& q) {
  using acc_t = at::opmath_type<scalar_t>;
  if (q.n > kTinyMax || q.m > kTinyMax || q.n == 0 || q.m == 0) return false;
  using Back = TinyBackward<scalar_t, acc_t>;
  sinkhorn::FwdParams view;  // what the forward's loaders read
  view.scores = q.scores;
  view.log_a = q.log_a;
  view.log_b = q.log_b;
  view.B = q.B;
  view.n = q.n;
  view.m = q.m;
  const TinySolver<scalar_t, acc_t> fwd{view};
  const int64_t groups = (q.B + Back::L - 1) / Back::L;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    // The LSE history of a group. std::vector would not honour the vectors' 64-byte alignment.
    using V = typename Back::V;
    const size_t bytes = sizeof(V) * std::max<int64_t>(q.max_steps, 1) * kTinyMax;
    std::unique_ptr<V, void (*)(void*)> hist(static_cast<V*>(std::aligned_alloc(64, bytes)),
                                             &std::free);
    TORCH_CHECK(hist != nullptr, "sinkhorn_backward: out of memory for ", bytes, " bytes");
    const Back back{q, fwd};
    for (int64_t g = g0; g < g1; ++g)
      back.solve_group(g * Back::L, std::min(Back::L, q.B - g * Back::L), hist.get());
  });
  return true;
}

template <typename scalar_t>
bool forward_tiny(const sinkhorn::FwdParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.n > kTinyMax || p.m > kTinyMax || p.n == 0 || p.m == 0) return false;
  const int64_t L = TinySolver<scalar_t, acc_t>::L;
  const int64_t groups = (p.B + L - 1) / L;
  const int64_t grain = std::max<int64_t>(1, 256 / (p.n * p.m));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    TinySolver<scalar_t, acc_t> solver{p};
    for (int64_t g = g0; g < g1; ++g) solver.solve_group(g * L, std::min(L, p.B - g * L));
  });
  return true;
}

}  // namespace
}  // namespace cpu
}  // namespace sinkhorn_ops
