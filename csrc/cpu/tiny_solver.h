// CPU forward for tiny problems (both sides <= kTinyMax, e.g. mHC's 4 x 4): one SIMD vector of
// problems at a time in structure-of-arrays form, so that every inner loop runs across problems
// and vectorises, with no per-problem or per-row call overhead. Same math as solver.h (the
// shared header), same per-problem early stopping (frozen lanes), one read of S and one write of
// P. The backward is tiny_backward.h.
#pragma once

#include "isa_prelude.h"
#include "vec_math.h"

namespace sinkhorn_ops {
namespace cpu {
namespace {  // internal linkage: one copy per ISA translation unit (see solver.h)

constexpr int64_t kTinyMax = 16;
// Exact log-domain steps bound the scaling form's drift (sinkhorn_math.h).
constexpr int64_t kRefreshEvery = sinkhorn::math::kScaledRefreshEvery;

// NF x MF > 0 fixes the problem size at compile time (mHC's 4 x 4), so that the loops over rows
// and columns unroll; 0 x 0 takes it from the params.
template <typename scalar_t, typename acc_t, int NF = 0, int MF = 0>
struct TinySolver {
  using V = std::conditional_t<std::is_same_v<acc_t, double>, VecD, VecF>;
  static constexpr int64_t L = sizeof(V) / sizeof(acc_t);  // problems per group
  const sinkhorn::FwdParams& p;

  int64_t rows() const { return NF > 0 ? NF : p.n; }
  int64_t cols() const { return MF > 0 ? MF : p.m; }

  // Loads problems [b0, b0 + count) of a (B, n, m) array into lanes; unused lanes repeat the
  // last problem.
  template <typename T>
  void load(const T* X, int64_t b0, int64_t count, V* out) const {
    const int64_t nm = rows() * cols();
    for (int64_t l = 0; l < L; ++l) {
      const T* src = X + (b0 + std::min(l, count - 1)) * nm;
      for (int64_t k = 0; k < nm; ++k) out[k][l] = static_cast<acc_t>(src[k]);
    }
  }

  // lse[i] = LSE over the other axis of S + the other potential (max shift, NaN sticky), for
  // every row (ax = 0) or column (ax = 1). With R, also the softmax along the axis,
  // R = exp(S + other potential - lse) (n x m layout; 0 on a row whose max is not finite),
  // from the same exponentials.
  void lse_pass(int ax, const V* s, const V (*pot)[kTinyMax], V* lse, V* R = nullptr) const {
    const int64_t m = cols(), len = ax ? cols() : rows(), other = ax ? rows() : cols();
    const V ninf = splat<V>(sinkhorn::math::neg_inf<acc_t>());
    const V pinf = -ninf, zero = splat<V>(0), one = splat<V>(1);
    for (int64_t i = 0; i < len; ++i) {
      V mx = ninf, sum = zero, e[kTinyMax];
      for (int64_t j = 0; j < other; ++j) {
        const V v = s[ax ? j * m + i : i * m + j] + pot[1 - ax][j];
        mx = (v > mx || v != v) ? v : mx;
      }
      for (int64_t j = 0; j < other; ++j) {
        const V v = s[ax ? j * m + i : i * m + j] + pot[1 - ax][j];
        e[j] = v == ninf ? zero : exp_vec(v - mx);
        sum += e[j];
      }
      const auto finite = mx > ninf && mx < pinf;
      const V lg = log_vec(finite ? sum : one);
      lse[i] = finite ? mx + lg : (mx == pinf ? mx - mx : mx);  // +inf score: NaN
      if (R) {
        const V inv = finite ? one / sum : zero;  // sum >= 1: the max's own term
        for (int64_t j = 0; j < other; ++j) R[ax ? j * m + i : i * m + j] = e[j] * inv;
      }
    }
  }

  // Whether any lane of a group's scores holds +inf or NaN (-inf is a mask).
  static bool has_nonfinite_score(const V* s, int64_t nm) {
    const V pinf = -splat<V>(sinkhorn::math::neg_inf<acc_t>());
    auto bad = pinf < pinf;  // no lane
    for (int64_t k = 0; k < nm; ++k) bad = bad | !(s[k] < pinf);
    return any_lane(bad);
  }

  // math::potential, lane by lane.
  static V potential(V log_marginal, V lse) {
    const V ninf = splat<V>(sinkhorn::math::neg_inf<acc_t>());
    return lse == ninf ? splat<V>(0) : log_marginal - lse;
  }

  // Solves problems [b0, b0 + count), count <= L.
  void solve_group(int64_t b0, int64_t count) const {
    const int64_t n = rows(), m = cols(), nm = n * m;
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
    // axis and rescales by target / sum, and the potential gains log(target / sum), kept as a
    // product (Pending): a multiplication per row instead of an exp per entry, the same iterate
    // as the log-domain step. Step 0, every
    // kRefreshEvery-th step, any step where an allowed sum falls below floor_mass (where the
    // linear form would lose mass to underflow) or an allowed entry of K between two lines
    // with nonzero targets below the smallest normal number (where it lost digits, or all of
    // them, which later steps could scale up to matter), and groups with a +inf or NaN score (whose NaN potentials must spread over their
    // problem) take the exact log-domain step instead and rebuild K from the potentials.
    V K[kTinyMax * kTinyMax];
    Pending dpot;  // the potentials' increments since the last exact step
    const bool nonfinite = has_nonfinite_score(s, nm);
    const V floor_mass = splat<V>(sinkhorn::math::scaled_floor<acc_t>());
    const V tiny = splat<V>(sinkhorn::math::smallest_normal<acc_t>());
    for (int64_t k = 0; k < p.steps; ++k) {
      const int ax = ((k % 2 == 0) == p.start_row) ? 0 : 1;  // 0: row step, 1: column step
      const int64_t len = ax ? m : n, other = ax ? n : m;
      auto at = [&](int64_t i, int64_t j) -> V& { return K[ax ? j * m + i : i * m + j]; };
      auto allowed = [&](int64_t i, int64_t j) { return s[ax ? j * m + i : i * m + j] > ninf; };
      V got[kTinyMax];  // the marginal under the current potentials, along this step's axis
      bool exact = k == 0 || nonfinite || k % kRefreshEvery == 0;
      if (!exact) {
        auto low = zero < zero;  // no lane
        for (int64_t i = 0; i < len; ++i) {
          V sum = zero;
          for (int64_t j = 0; j < other; ++j) {
            sum += at(i, j);
            // An allowed entry of two lines with nonzero targets below the smallest normal has
            // lost its digits (or all of them): later steps may scale it up to matter, so it
            // must come from the potentials. (A zero target's line is 0 for good.)
            low = low | (at(i, j) < tiny && allowed(i, j) && done == zero &&
                         target[ax][i] > zero && target[1 - ax][j] > zero);
          }
          got[i] = sum;
          low = low | (sum < floor_mass && target[ax][i] > zero);
        }
        exact = any_lane(low);
      }
      if (exact) {
        fold(pot, dpot);
        lse_pass(ax, s, pot, lse, K);  // K holds the step's softmax R until rebuilt below
        if (p.tol > 0)
          for (int64_t i = 0; i < len; ++i)
            got[i] = lse[i] == ninf ? zero : exp_vec(lse[i] + pot[ax][i]);  // math::marginal_error
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
        // K = exp(S + f (+) g) with the new potential is target * R (a stopped lane's K is
        // no longer read).
        for (int64_t i = 0; i < len; ++i) {
          pot[ax][i] = done != zero ? pot[ax][i] : potential(lm[ax][i], lse[i]);
          for (int64_t j = 0; j < other; ++j) at(i, j) *= target[ax][i];
        }
        continue;
      }
      V ratio[kTinyMax];
      for (int64_t i = 0; i < len; ++i) {
        // An empty row keeps its potential (math::potential); a zero target empties the row.
        ratio[i] = got[i] > zero ? target[ax][i] / got[i] : one;
        ratio[i] = done != zero ? one : ratio[i];
        for (int64_t j = 0; j < other; ++j) at(i, j) *= ratio[i];
      }
      dpot.scale(ax, len, ratio);
    }
    fold(pot, dpot);
    write(b0, count, s, pot, target, used, done);
  }

  // The scaling steps' increments of the potentials, kept apart from them until fold(): added
  // one by one to a large potential (|f| ~ 1e4 for extreme logits) each would round at that
  // potential's ulp. Each row keeps the product of its ratios (a multiplication a step, not a
  // log); the product's log joins a running sum once some lane leaves [1/kRange, kRange], so
  // it never overflows, and at fold().
  struct Pending {
    static constexpr acc_t kRange = sinkhorn::math::scaled_range<acc_t>();
    V sum[2][kTinyMax], prod[2][kTinyMax];
    Pending() {
      for (int ax = 0; ax < 2; ++ax)
        for (int64_t i = 0; i < kTinyMax; ++i) {
          sum[ax][i] = splat<V>(0);
          prod[ax][i] = splat<V>(1);
        }
    }
    // log x, and -inf for x = 0 (a zero target's ratio).
    static V log0(V x) {
      return x > splat<V>(0) ? log_vec(x) : splat<V>(sinkhorn::math::neg_inf<acc_t>());
    }
    // Multiplies the len rows of axis ax by their ratios. When a product would leave the range
    // (or overflow: one ratio can reach target / floor_mass), the logs of the old products and
    // of the ratios join the sums instead.
    void scale(int ax, int64_t len, const V* ratio) {
      const V zero = splat<V>(0);
      auto out = zero < zero;  // no lane
      for (int64_t i = 0; i < len; ++i) {
        const V next = prod[ax][i] * ratio[i];
        out = out | (next > kRange || next < 1 / kRange);
      }
      if (any_lane(out)) {
        for (int64_t i = 0; i < len; ++i) {
          sum[ax][i] += log0(prod[ax][i]) + log0(ratio[i]);
          prod[ax][i] = splat<V>(1);
        }
      } else {
        for (int64_t i = 0; i < len; ++i) prod[ax][i] *= ratio[i];
      }
    }
  };

  // Adds the pending increments to the potentials and clears them.
  void fold(V (*pot)[kTinyMax], Pending& d) const {
    for (int ax = 0; ax < 2; ++ax)
      for (int64_t i = 0; i < (ax ? cols() : rows()); ++i) {
        pot[ax][i] += d.sum[ax][i] + Pending::log0(d.prod[ax][i]);
        d.sum[ax][i] = splat<V>(0);
        d.prod[ax][i] = splat<V>(1);
      }
  }

  void load_marginals(int64_t b0, int64_t count, const V* s, V (*lm)[kTinyMax]) const {
    const int64_t n = rows(), m = cols();
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
    const int64_t n = rows(), m = cols(), nm = n * m;
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

// Solver is a TinySolver, its size fixed (4 x 4) or not.
template <typename Solver>
void forward_tiny_sized(const sinkhorn::FwdParams& p) {
  const int64_t L = Solver::L;
  const int64_t groups = (p.B + L - 1) / L;
  const int64_t grain = std::max<int64_t>(1, 256 / (p.n * p.m));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    const Solver solver{p};
    for (int64_t g = g0; g < g1; ++g) solver.solve_group(g * L, std::min(L, p.B - g * L));
  });
}

template <typename scalar_t>
bool forward_tiny(const sinkhorn::FwdParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.n > kTinyMax || p.m > kTinyMax || p.n == 0 || p.m == 0) return false;
  if (p.n == 4 && p.m == 4) {
    forward_tiny_sized<TinySolver<scalar_t, acc_t, 4, 4>>(p);
  } else {
    forward_tiny_sized<TinySolver<scalar_t, acc_t>>(p);
  }
  return true;
}

}  // namespace
}  // namespace cpu
}  // namespace sinkhorn_ops
