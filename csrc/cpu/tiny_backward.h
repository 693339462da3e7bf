// CPU unrolled backward for tiny problems (both sides <= kTinyMax): tiny_solver.h's lanes of
// problems run the replay and the reversed steps of MATH.md section 2.1 (backward_solver.h is
// the general path).
#pragma once

#include <c10/util/safe_numerics.h>

#include <cstdint>
#include <limits>

#include "tiny_solver.h"

namespace sinkhorn_ops {
namespace cpu {
namespace {  // internal linkage: one copy per ISA translation unit (see solver.h)

// The unrolled backward (backward_solver.h) of one SIMD vector of tiny problems at a time:
// replay the forward, then the reversed steps, all across lanes. A lane whose problem ran fewer
// steps than the group's longest is frozen in the replay and inactive in the reverse.
//
// Two replays. The scaling replay runs the forward's own iteration (multiplications, exact
// log-domain steps at the same points) and keeps each step's softmax R, the K it read normalised
// along its axis, so that the reverse is multiply-adds with no exponential. It needs
// steps x n x m vectors of history, so above kScaledHistory entries, and for groups with a +inf
// score, the log-domain replay keeps only each step's LSEs and the reverse recomputes R.
constexpr int64_t kScaledHistory = 1 << 15;

template <typename scalar_t, typename acc_t, int NF = 0, int MF = 0>
struct TinyBackward {
  using Fwd = TinySolver<scalar_t, acc_t, NF, MF>;
  using V = typename Fwd::V;
  static constexpr int64_t L = Fwd::L;
  const sinkhorn::BwdParams& q;
  const Fwd& fwd;  // its params view the same scores and marginals
  bool scaled;     // q.max_steps * n * m <= kScaledHistory: hist holds that many vectors

  // History vectors one group needs.
  static int64_t history(const sinkhorn::BwdParams& q, bool scaled) {
    int64_t count = 0;  // saturated at the maximum on overflow, which the allocation refuses
    const int64_t per = scaled ? std::max(q.n * q.m, kTinyMax) : kTinyMax;
    return c10::mul_overflows(std::max<int64_t>(q.max_steps, 1), per, &count)
               ? std::numeric_limits<int64_t>::max()
               : count;
  }

  int axis(int64_t t) const { return ((t % 2 == 0) == q.start_row) ? 0 : 1; }

  void solve_group(int64_t b0, int64_t count, V* hist) const {
    const int64_t n = fwd.rows(), m = fwd.cols(), nm = n * m;
    V s[kTinyMax * kTinyMax], ds[kTinyMax * kTinyMax];
    V lm[2][kTinyMax], pot[2][kTinyMax] = {}, u[2][kTinyMax] = {}, dl[2][kTinyMax] = {};
    int64_t K[L], kmax = 0, kmin = q.max_steps;
    fwd.load(static_cast<const scalar_t*>(q.scores), b0, count, s);
    fwd.load_marginals(b0, count, s, lm);
    for (int64_t l = 0; l < L; ++l) {
      K[l] = std::min(std::max<int64_t>(q.steps_used[b0 + std::min(l, count - 1)], 0), q.max_steps);
      kmax = std::max(kmax, K[l]);
      kmin = std::min(kmin, K[l]);
    }
    auto active = [&](int64_t t) {  // every lane for the steps all of them ran
      if (t < kmin) return splat<V>(1);
      V act = splat<V>(0);
      for (int64_t l = 0; l < L; ++l) act[l] = t < K[l] ? acc_t(1) : acc_t(0);
      return act;
    };
    const bool use_scaled = scaled && !Fwd::has_nonfinite_score(s, nm);

    if (use_scaled) {
      replay_scaled(s, lm, kmax, active, pot, hist);
    } else {
      replay_log(s, lm, kmax, active, pot, hist);
    }
    seed(b0, count, s, pot, ds, u);
    for (int64_t t = kmax - 1; t >= 0; --t) {
      const int ax = axis(t);
      const int64_t len = ax ? m : n, other = ax ? n : m;
      const V act = active(t);
      if (use_scaled) {
        reverse_step(ax, len, other, act, hist + t * nm, nullptr, u, ds, dl);
      } else {
        V R[kTinyMax * kTinyMax];
        softmax_log(ax, s, lm, hist, t, R);
        reverse_step(ax, len, other, act, R, hist + t * kTinyMax, u, ds, dl);
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

  // Log-domain replay: every step's LSE into hist (kTinyMax vectors a step), the final
  // potentials into pot.
  template <typename Active>
  void replay_log(const V* s, const V (*lm)[kTinyMax], int64_t kmax, const Active& active,
                  V (*pot)[kTinyMax], V* hist) const {
    for (int64_t t = 0; t < kmax; ++t) {
      const int ax = axis(t);
      V* lse = hist + t * kTinyMax;
      fwd.lse_pass(ax, s, pot, lse);
      const V act = active(t);
      for (int64_t i = 0; i < (ax ? fwd.cols() : fwd.rows()); ++i)
        pot[ax][i] = act != splat<V>(0) ? Fwd::potential(lm[ax][i], lse[i]) : pot[ax][i];
    }
  }

  // Step t's softmax from the log-domain history: R = exp(S + before - lse) along the step's
  // axis (math::step_weight), where before is the other potential, step t-1's.
  void softmax_log(int ax, const V* s, const V (*lm)[kTinyMax], const V* hist, int64_t t,
                   V* R) const {
    const int64_t m = fwd.cols(), len = ax ? m : fwd.rows(), other = ax ? fwd.rows() : m;
    const V ninf = splat<V>(sinkhorn::math::neg_inf<acc_t>()), zero = splat<V>(0);
    const V* lse = hist + t * kTinyMax;
    V before[kTinyMax];
    for (int64_t j = 0; j < other; ++j)
      before[j] = t > 0 ? Fwd::potential(lm[1 - ax][j], hist[(t - 1) * kTinyMax + j]) : zero;
    for (int64_t i = 0; i < len; ++i)
      for (int64_t j = 0; j < other; ++j) {
        const int64_t k = ax ? j * m + i : i * m + j;
        R[k] = lse[i] == ninf ? zero : exp_vec(s[k] + before[j] - lse[i]);  // math::step_weight
      }
  }

  // Scaling replay: TinySolver::solve_group's iteration (the same scaling steps and refresh
  // points, up to rounding; its extra exact steps are below) with the lanes frozen at their own
  // step counts instead of a tolerance, keeping each step's softmax R (n x m vectors a step) in
  // hist.
  // R = K / (K's sums along the axis) in a scaling step; exp(S + before - lse) in an exact one,
  // after which K = target * R (= exp(S + f (+) g) with the new potential). Exact steps come at
  // the forward's points (step 0, every kRefreshEvery-th) and wherever an allowed row's sum falls
  // below floor_mass: there K / sum would lose R to underflow (a zero target makes every step
  // of that group exact: its rows of K are zero, but R is a softmax all the same), or an allowed
  // entry of K below the smallest normal number (the forward's rule).
  template <typename Active>
  void replay_scaled(const V* s, const V (*lm)[kTinyMax], int64_t kmax, const Active& active,
                     V (*pot)[kTinyMax], V* hist) const {
    const int64_t n = fwd.rows(), m = fwd.cols(), nm = n * m;
    const V ninf = splat<V>(sinkhorn::math::neg_inf<acc_t>());
    const V zero = splat<V>(0), one = splat<V>(1);
    const V floor_mass = splat<V>(sinkhorn::math::scaled_floor<acc_t>());
    const V tiny = splat<V>(sinkhorn::math::smallest_normal<acc_t>());
    V target[2][kTinyMax], alive[2][kTinyMax] = {};
    typename Fwd::Pending dpot;
    for (int ax = 0; ax < 2; ++ax)
      for (int64_t i = 0; i < (ax ? m : n); ++i)
        target[ax][i] = lm[ax][i] > ninf ? exp_vec(lm[ax][i]) : zero;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < m; ++j) {
        const auto allowed = s[i * m + j] > ninf;
        alive[0][i] = allowed ? one : alive[0][i];
        alive[1][j] = allowed ? one : alive[1][j];
      }
    V Kmat[kTinyMax * kTinyMax], lse[kTinyMax];
    for (int64_t t = 0; t < kmax; ++t) {
      const int ax = axis(t);
      const int64_t len = ax ? m : n, other = ax ? n : m;
      auto idx = [&](int64_t i, int64_t j) { return ax ? j * m + i : i * m + j; };
      const V act = active(t);
      V* R = hist + t * nm;
      V got[kTinyMax];
      bool exact = t % kRefreshEvery == 0;
      if (!exact) {
        auto low = zero < zero;  // no lane
        for (int64_t i = 0; i < len; ++i) {
          V sum = zero;
          for (int64_t j = 0; j < other; ++j) {
            sum += Kmat[idx(i, j)];
            // An allowed entry that lost digits to underflow (the forward's rule).
            low = low | (Kmat[idx(i, j)] < tiny && s[idx(i, j)] > ninf && act > zero);
          }
          got[i] = sum;
          low = low | (sum < floor_mass && alive[ax][i] > zero && act > zero);
        }
        exact = any_lane(low);
      }
      if (exact) {
        fwd.fold(pot, dpot);
        fwd.lse_pass(ax, s, pot, lse, R);
        for (int64_t i = 0; i < len; ++i) {
          for (int64_t j = 0; j < other; ++j) Kmat[idx(i, j)] = target[ax][i] * R[idx(i, j)];
          pot[ax][i] = act != zero ? Fwd::potential(lm[ax][i], lse[i]) : pot[ax][i];
        }
        continue;
      }
      V ratio[kTinyMax];
      for (int64_t i = 0; i < len; ++i) {
        const V inv = got[i] > zero ? one / got[i] : zero;
        ratio[i] = got[i] > zero ? target[ax][i] * inv : one;  // an empty row keeps its potential
        ratio[i] = act != zero ? ratio[i] : one;
        for (int64_t j = 0; j < other; ++j) {
          const int64_t k = idx(i, j);
          // A frozen lane's sum may be denormal (inv = inf): its R, unused, stays 0, not NaN.
          R[k] = act != zero ? Kmat[k] * inv : zero;
          Kmat[k] *= ratio[i];
        }
      }
      dpot.scale(ax, len, ratio);
    }
    fwd.fold(pot, dpot);
  }

  // Gamma = Gbar * P with P = exp(S + f (+) g) from the final potentials, into ds; the
  // upstream of f and g, Gamma's sums plus dL/df and dL/dg, into u.
  void seed(int64_t b0, int64_t count, const V* s, const V (*pot)[kTinyMax], V* ds,
            V (*u)[kTinyMax]) const {
    const int64_t n = fwd.rows(), m = fwd.cols();
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
  }

  // Reverses one step given its softmax R (MATH.md section 2.1): dS -= u R, the other
  // potential's upstream -= the sums of u R, d log(marginal) += u on rows that were not empty
  // (lse > -inf; without lse, R's rows sum to 1 or 0), and the step consumes u.
  void reverse_step(int ax, int64_t len, int64_t other, V act, const V* R, const V* lse,
                    V (*u)[kTinyMax], V* ds, V (*dl)[kTinyMax]) const {
    const int64_t m = fwd.cols();
    const V zero = splat<V>(0), ninf = splat<V>(sinkhorn::math::neg_inf<acc_t>());
    for (int64_t i = 0; i < len; ++i) {
      const V ui = act != zero ? u[ax][i] : zero;
      V mass = zero;
      for (int64_t j = 0; j < other; ++j) {
        const int64_t k = ax ? j * m + i : i * m + j;
        const V w = ui * R[k];
        ds[k] -= w;
        u[1 - ax][j] -= w;
        mass += R[k];
      }
      const auto live = lse ? lse[i] > ninf : mass > zero;
      dl[ax][i] += live ? ui : zero;
      u[ax][i] = act != zero ? zero : u[ax][i];  // consumed: the step overwrote it
    }
  }
};

template <typename Back>
void backward_tiny_sized(const sinkhorn::BwdParams& q, const sinkhorn::FwdParams& view,
                         bool scaled) {
  const typename Back::Fwd fwd{view};
  const int64_t groups = (q.B + Back::L - 1) / Back::L;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    // A group's history. std::vector would not honour the vectors' 64-byte alignment.
    using V = typename Back::V;
    // Checked: steps_used (given to the public backward operator) can be near 2^63.
    uint64_t bytes = 0;
    TORCH_CHECK_VALUE(!c10::mul_overflows(static_cast<uint64_t>(Back::history(q, scaled)),
                                          static_cast<uint64_t>(sizeof(V)), &bytes),
                      "sinkhorn_backward: the history of ", q.max_steps,
                      " steps overflows a byte count; expected a smaller steps");
    std::unique_ptr<V, void (*)(void*)> hist(static_cast<V*>(std::aligned_alloc(64, bytes)),
                                             &std::free);
    TORCH_CHECK(hist != nullptr, "sinkhorn_backward: out of memory for ", bytes, " bytes");
    const Back back{q, fwd, scaled};
    for (int64_t g = g0; g < g1; ++g)
      back.solve_group(g * Back::L, std::min(Back::L, q.B - g * Back::L), hist.get());
  });
}

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
  const bool scaled = std::max<int64_t>(q.max_steps, 1) <= kScaledHistory / (q.n * q.m);
  if (q.n == 4 && q.m == 4) {
    backward_tiny_sized<TinyBackward<scalar_t, acc_t, 4, 4>>(q, view, scaled);
  } else {
    backward_tiny_sized<Back>(q, view, scaled);
  }
  return true;
}

}  // namespace
}  // namespace cpu
}  // namespace sinkhorn_ops
