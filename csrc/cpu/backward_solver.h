// CPU unrolled backward (MATH.md section 2.1), compiled per ISA like solver.h, whose step
// passes it reuses. Per problem: replay the forward for the steps it ran, keeping each step's
// LSE (O(K (n + m)) memory), then reverse the steps. Work mapping as in the forward: whole
// problems per thread when there are enough of them, else each pass split across threads (rows
// where a pass reduces along rows, column chunks where it reduces along columns).
#pragma once

#include "isa_prelude.h"
#include "solver.h"
#include "tiny_backward.h"

namespace sinkhorn_ops {
namespace cpu {
namespace {  // internal linkage: one copy per ISA translation unit (see solver.h)

template <typename scalar_t, typename acc_t>
struct BackwardSolver {
  const sinkhorn::BwdParams& q;
  const Solver<scalar_t, acc_t>& fwd;  // the forward's passes on the same (n, m)

  // Per-thread buffers, reused across the problems a thread solves.
  struct Buffers {
    std::vector<acc_t> hist, la, lb, f, g, uf, ug, ds, scratch;
  };

  void solve(int64_t b, Buffers& w) const {
    // The front door cannot check steps_used without reading it; clamped as the CUDA kernels do.
    const int64_t K = std::min(std::max<int64_t>(q.steps_used[b], 0), q.max_steps);
    const int64_t n = q.n, m = q.m, len = std::max(n, m);
    const acc_t ninf = sinkhorn::math::neg_inf<acc_t>();
    const scalar_t* S = static_cast<const scalar_t*>(q.scores) + b * n * m;
    const scalar_t* G = static_cast<const scalar_t*>(q.grad_plan) + b * n * m;
    scalar_t* dS_out = static_cast<scalar_t*>(q.grad_scores) + b * n * m;
    acc_t* dla = static_cast<acc_t*>(q.grad_log_a) + b * n;
    acc_t* dlb = static_cast<acc_t*>(q.grad_log_b) + b * m;
    w.hist.resize(std::max<int64_t>(K, 1) * len);
    for (auto* v : {&w.la, &w.f, &w.uf}) v->assign(n, acc_t(0));
    for (auto* v : {&w.lb, &w.g, &w.ug}) v->assign(m, acc_t(0));
    w.scratch.resize(len);
    constexpr bool direct = std::is_same_v<scalar_t, acc_t>;  // accumulate dS in the output
    if (!direct) w.ds.resize(n * m);
    acc_t* dS = direct ? reinterpret_cast<acc_t*>(dS_out) : w.ds.data();
    if (q.log_a) {
      std::copy_n(static_cast<const acc_t*>(q.log_a) + b * n, n, w.la.data());
      std::copy_n(static_cast<const acc_t*>(q.log_b) + b * m, m, w.lb.data());
    } else {
      fwd.default_marginals(S, w.la.data(), w.lb.data());
    }
    auto is_row = [&](int64_t t) { return (t % 2 == 0) == q.start_row; };

    // Replay (tol = 0, exactly K steps), recording every step's LSE.
    for (int64_t t = 0; t < K; ++t) {
      acc_t* lse = w.hist.data() + t * len;
      if (is_row(t)) {
        fwd.row_lse(S, w.g.data(), lse);
        for (int64_t i = 0; i < n; ++i) w.f[i] = sinkhorn::math::potential(w.la[i], lse[i]);
      } else {
        fwd.col_lse(S, w.f.data(), lse, w.scratch.data());
        for (int64_t j = 0; j < m; ++j) w.g[j] = sinkhorn::math::potential(w.lb[j], lse[j]);
      }
    }

    // Output P = exp(S + f + g): dS = Gamma = Gbar * P, u_f = Gamma 1 (+ dL/df), u_g likewise.
    fwd.for_range(n, m, [&](int64_t i0, int64_t i1) {
      fwd.with_scratch([&](Scratch<acc_t>& sc) {
        for (int64_t i = i0; i < i1; ++i) {
          const acc_t* s = fwd.row(S, m, i, 0, m, sc.in.get());
          const acc_t* gr = fwd.row(G, m, i, 0, m, sc.out.get());
          acc_t* d = dS + i * m;
          const acc_t fi = w.f[i];
          acc_t sum = 0;
          for (int64_t j = 0; j < m; ++j) {
            d[j] = gr[j] * exp_vec(s[j] + fi + w.g[j]);
            sum += d[j];
          }
          w.uf[i] = sum + (q.grad_f ? static_cast<const acc_t*>(q.grad_f)[b * n + i] : acc_t(0));
        }
      });
    });
    column_sums(dS, w.ug.data());
    for (int64_t j = 0; j < m; ++j)
      w.ug[j] += q.grad_g ? static_cast<const acc_t*>(q.grad_g)[b * m + j] : acc_t(0);
    std::fill(dla, dla + n, acc_t(0));
    std::fill(dlb, dlb + m, acc_t(0));

    // Reverse the steps; the other axis' potential that step t read is step t-1's.
    for (int64_t t = K - 1; t >= 0; --t) {
      const acc_t* lse = w.hist.data() + t * len;
      const acc_t* prev = t > 0 ? w.hist.data() + (t - 1) * len : nullptr;
      if (is_row(t)) {
        for (int64_t j = 0; j < m; ++j)  // g before step t
          w.g[j] = prev ? sinkhorn::math::potential(w.lb[j], prev[j]) : acc_t(0);
        reverse_row_step(S, lse, w.g.data(), w.uf.data(), dS, w.ug.data());
        for (int64_t i = 0; i < n; ++i) {
          dla[i] += lse[i] > ninf ? w.uf[i] : acc_t(0);
          w.uf[i] = 0;  // f was overwritten by step t: its upstream is consumed
        }
      } else {
        for (int64_t i = 0; i < n; ++i)  // f before step t
          w.f[i] = prev ? sinkhorn::math::potential(w.la[i], prev[i]) : acc_t(0);
        reverse_col_step(S, lse, w.f.data(), w.ug.data(), dS, w.uf.data());
        for (int64_t j = 0; j < m; ++j) {
          dlb[j] += lse[j] > ninf ? w.ug[j] : acc_t(0);
          w.ug[j] = 0;
        }
      }
    }
    if (!direct)
      narrow(dS, dS_out, n * m);
  }

  // out[j] = sum_i x_ij, by column chunks so that each chunk owns its outputs.
  void column_sums(const acc_t* x, acc_t* out) const {
    const int64_t n = q.n, m = q.m, chunks = (m + kColChunk - 1) / kColChunk;
    fwd.for_range(chunks, n * kColChunk, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j0 = c * kColChunk, j1 = std::min(m, j0 + kColChunk);
        std::fill(out + j0, out + j1, acc_t(0));
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = j0; j < j1; ++j) out[j] += x[i * m + j];
      }
    });
  }

  // Row step f_i = log a_i - LSE_j(S_ij + g_j) reversed with upstream u = dL/df:
  // R = step_weight(S + g, lse_i), dS -= u_i R, dL/dg -= (u R)^T 1. By column chunks.
  void reverse_row_step(const scalar_t* S, const acc_t* lse, const acc_t* g, const acc_t* u,
                        acc_t* dS, acc_t* ug) const {
    const int64_t n = q.n, m = q.m, chunks = (m + kColChunk - 1) / kColChunk;
    const acc_t ninf = sinkhorn::math::neg_inf<acc_t>();
    fwd.for_range(chunks, n * kColChunk, [&](int64_t c0, int64_t c1) {
      fwd.with_scratch([&](Scratch<acc_t>& sc) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t j0 = c * kColChunk, w = std::min(kColChunk, m - j0);
          for (int64_t i = 0; i < n; ++i) {
            if (u[i] == acc_t(0) || !(lse[i] > ninf)) continue;  // no weight on this row
            const acc_t* s = fwd.row(S, m, i, j0, w, sc.in.get());
            acc_t* d = dS + i * m + j0;
            const acc_t ui = u[i], shift = lse[i];
            for (int64_t j = 0; j < w; ++j) {
              const acc_t r = ui * exp_vec(s[j] + g[j0 + j] - shift);
              d[j] -= r;
              ug[j0 + j] -= r;
            }
          }
        }
      });
    });
  }

  // Column step reversed with upstream v = dL/dg: C = step_weight(S + f, lse_j),
  // dS -= v_j C, dL/df -= (C v). By rows.
  void reverse_col_step(const scalar_t* S, const acc_t* lse, const acc_t* f, const acc_t* v,
                        acc_t* dS, acc_t* uf) const {
    const int64_t n = q.n, m = q.m;
    const acc_t ninf = sinkhorn::math::neg_inf<acc_t>();
    fwd.for_range(n, m, [&](int64_t i0, int64_t i1) {
      fwd.with_scratch([&](Scratch<acc_t>& sc) {
        for (int64_t i = i0; i < i1; ++i) {
          const acc_t* s = fwd.row(S, m, i, 0, m, sc.in.get());
          acc_t* d = dS + i * m;
          const acc_t fi = f[i];
          acc_t sum = 0;
          for (int64_t j = 0; j < m; ++j) {
            const acc_t e = exp_vec(s[j] + fi - lse[j]);
            const acc_t c = (lse[j] > ninf) ? v[j] * e : acc_t(0);
            d[j] -= c;
            sum += c;
          }
          uf[i] -= sum;
        }
      });
    });
  }
};

template <typename scalar_t>
void backward(const sinkhorn::BwdParams& q) {
  using acc_t = at::opmath_type<scalar_t>;
  if (backward_tiny<scalar_t>(q)) return;
  sinkhorn::FwdParams shape;  // the forward passes only read n and m from it
  shape.n = q.n;
  shape.m = q.m;
  if (q.B >= at::get_num_threads()) {
    at::parallel_for(0, q.B, 1, [&](int64_t b0, int64_t b1) {
      Scratch<acc_t> scratch(q.m);
      Solver<scalar_t, acc_t> fwd{shape, false, &scratch};
      BackwardSolver<scalar_t, acc_t> solver{q, fwd};
      typename BackwardSolver<scalar_t, acc_t>::Buffers w;
      for (int64_t b = b0; b < b1; ++b) solver.solve(b, w);
    });
  } else {
    Solver<scalar_t, acc_t> fwd{shape, true, nullptr};
    BackwardSolver<scalar_t, acc_t> solver{q, fwd};
    typename BackwardSolver<scalar_t, acc_t>::Buffers w;
    for (int64_t b = 0; b < q.B; ++b) solver.solve(b, w);
  }
}

void backward_any(const sinkhorn::BwdParams& q, at::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sinkhorn_backward_cpu",
                                  [&] { backward<scalar_t>(q); });
}

}  // namespace
}  // namespace cpu
}  // namespace sinkhorn_ops
