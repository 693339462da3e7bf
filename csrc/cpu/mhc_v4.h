// CPU kernel of the DeepSeek-V4 mHC Sinkhorn and of the paper's (V4 on the transpose with
// eps = 0), forward and backward: the shared per-problem math of mhc_v4_math.h run on one SIMD
// vector of problems at a time (structure of arrays, a lane per problem), as the tiny Sinkhorn
// path does. Included once per ISA build (isa_entry.h).
#pragma once

#include "../mhc_v4_math.h"
#include "../n_switch.h"
#include "isa_prelude.h"
#include "vec_math.h"

namespace sinkhorn_ops {
namespace cpu {
namespace {  // internal linkage: one copy per ISA translation unit (see solver.h)

// exp, log, max and reciprocals across the lanes of a vector, for mhc_v4_math.h.
template <typename V>
struct LaneOps {
  using E = typename ElemOf<V>::type;
  static V exp(V x) { return exp_vec(x); }
  static V log(V x) { return log_vec(x); }
  static V max(V a, V b) { return a > b ? a : b; }
  template <int K>
  static void reciprocals(const V* d, V* inv) {
    for (int a = 0; a < K; ++a) inv[a] = static_cast<E>(1) / d[a];
  }
};

template <int N, typename acc_t>
void mhc_v4_lanes(const sinkhorn::V4Params& p) {
  using V = VecOf<acc_t>;
  using Problem = sinkhorn::v4::Problem<N, V, LaneOps<V>>;
  constexpr int64_t L = kVecLanes<acc_t>;
  constexpr int64_t NN = N * N;
  const acc_t* X = static_cast<const acc_t*>(p.logits);
  const acc_t* G = static_cast<const acc_t*>(p.grad);
  acc_t* Out = static_cast<acc_t*>(p.out);
  const acc_t eps = static_cast<acc_t>(p.eps);
  const int64_t groups = (p.B + L - 1) / L;
  at::parallel_for(0, groups, std::max<int64_t>(1, 64 / NN), [&](int64_t g0, int64_t g1) {
    V x[NN], g[NN], lg[NN];
    V hist[(2 * sinkhorn::v4::kMaxIters - 1) * N];
    // Loads problems [b0, b0 + count) into lanes (each transposed for the paper's variant);
    // unused lanes repeat the last problem.
    auto load = [&](const acc_t* src, int64_t b0, int64_t count, V* out) {
      for (int64_t l = 0; l < L; ++l) {
        const acc_t* s = src + (b0 + std::min(l, count - 1)) * NN;
        for (int k = 0; k < NN; ++k) out[k][l] = s[p.paper ? sinkhorn::v4::transposed(k, N) : k];
      }
    };
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t b0 = grp * L, count = std::min(L, p.B - b0);
      load(X, b0, count, x);
      // Lanes that need the log domain (the paper's variant only) run it too, and take its
      // result: rare, so a group pays for it only when one of its lanes does.
      const auto in_log = p.paper ? Problem::needs_log_domain(x) : decltype(x[0] != x[0]){};
      const bool any_log = p.paper && any_lane(in_log);
      if (G) {
        load(G, b0, count, g);
        if (any_log) {
          for (int k = 0; k < NN; ++k) lg[k] = g[k];
          Problem::log_backward(x, lg, p.iters, hist);
        }
        Problem::backward(x, g, p.iters, eps, hist);
      } else {
        for (int k = 0; k < NN; ++k) g[k] = x[k];
        if (any_log) {
          for (int k = 0; k < NN; ++k) lg[k] = x[k];
          Problem::log_forward(lg, p.iters);
        }
        Problem::forward(g, p.iters, eps, nullptr);
      }
      if (any_log)
        for (int k = 0; k < NN; ++k) g[k] = in_log ? lg[k] : g[k];
      for (int64_t l = 0; l < count; ++l)
        for (int k = 0; k < NN; ++k)
          Out[(b0 + l) * NN + k] = g[p.paper ? sinkhorn::v4::transposed(k, N) : k][l];
    }
  });
}

void mhc_v4_any(const sinkhorn::V4Params& p) {
  if (p.B == 0) return;
  TORCH_CHECK(p.n >= 1 && p.n <= sinkhorn::v4::kMaxN, "mhc_v4_sinkhorn: n = ", p.n,
              " has no kernel");
  sinkhorn::n_switch<sinkhorn::v4::kMaxN>(p.n, [&](auto n) {
    if (p.dtype == sinkhorn::DType::Float64) {
      mhc_v4_lanes<decltype(n)::value, double>(p);
    } else {
      mhc_v4_lanes<decltype(n)::value, float>(p);
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace sinkhorn_ops
