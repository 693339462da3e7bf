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
  // The forward's (no history): within about an ulp, by rcp14 and Newton in the AVX-512 build.
  template <int K>
  static void forward_reciprocals(const V* d, V* inv) {
    if constexpr (std::is_same_v<V, VecF>) {
      reciprocals_vec<K>(d, inv);
    } else {
      reciprocals<K>(d, inv);
    }
  }
};

// One vector of problems, a problem a lane: g <- comb(x) (the forward; g's input is unused) or,
// when backward, g <- dL/dx given g = dL/dcomb. With paper set, lanes the linear domain cannot
// take (the paper's variant only) run the log-domain twin too and take its result: rare, so a
// vector pays for it only when one of its lanes does. lg and hist are scratch (n x n lanes and
// the divisors' (2 kMaxIters - 1) x n).
template <int N, typename V>
void run_lanes(const V* x, V* g, V* lg, V* hist, bool backward, bool paper, int iters,
               typename ElemOf<V>::type eps) {
  using Problem = sinkhorn::v4::Problem<N, V, LaneOps<V>>;
  constexpr int NN = N * N;
  const auto in_log = paper ? Problem::needs_log_domain(x) : decltype(x[0] != x[0]){};
  const bool any_log = paper && any_lane(in_log);
  if (backward) {
    if (any_log) {
      for (int k = 0; k < NN; ++k) lg[k] = g[k];
      Problem::log_backward(x, lg, iters, hist);
    }
    Problem::backward(x, g, iters, eps, hist);
  } else {
    for (int k = 0; k < NN; ++k) g[k] = x[k];
    if (any_log) {
      for (int k = 0; k < NN; ++k) lg[k] = x[k];
      Problem::log_forward(lg, iters);
    }
    Problem::forward(g, iters, eps, nullptr);
  }
  if (any_log)
    for (int k = 0; k < NN; ++k) g[k] = in_log ? lg[k] : g[k];
}

// Row b0 + l of `width` values of src into lane l of out[0, width), for l < count; unused
// lanes repeat the last row. perm (nullptr: none) permutes the values: out[k] takes perm[k].
template <typename V, typename acc_t>
void load_lanes(const acc_t* src, int64_t width, int64_t b0, int64_t count, V* out,
                const int* perm = nullptr) {
  constexpr int64_t L = kVecLanes<acc_t>;
  for (int64_t l = 0; l < L; ++l) {
    const acc_t* s = src + (b0 + std::min(l, count - 1)) * width;
    for (int64_t k = 0; k < width; ++k) out[k][l] = s[perm ? perm[k] : k];
  }
}

// Lanes [0, count) of in[0, width) to rows b0 + l of dst, the inverse of load_lanes.
template <typename V, typename acc_t>
void store_lanes(acc_t* dst, int64_t width, int64_t b0, int64_t count, const V* in,
                 const int* perm = nullptr) {
  for (int64_t l = 0; l < count; ++l)
    for (int64_t k = 0; k < width; ++k) dst[(b0 + l) * width + (perm ? perm[k] : k)] = in[k][l];
}

// The permutation of an n x n problem to its transpose, as load_lanes/store_lanes take it.
template <int N>
struct Transpose {
  int perm[N * N];
  Transpose() {
    for (int k = 0; k < N * N; ++k) perm[k] = sinkhorn::v4::transposed(k, N);
  }
};

template <int N, typename acc_t>
void mhc_v4_lanes(const sinkhorn::V4Params& p) {
  using V = VecOf<acc_t>;
  constexpr int64_t L = kVecLanes<acc_t>;
  constexpr int64_t NN = N * N;
  const acc_t* X = static_cast<const acc_t*>(p.logits);
  const acc_t* G = static_cast<const acc_t*>(p.grad);
  acc_t* Out = static_cast<acc_t*>(p.out);
  const acc_t eps = static_cast<acc_t>(p.eps);
  const Transpose<N> t;
  const int* perm = p.paper ? t.perm : nullptr;  // the paper's problems run transposed
  const int64_t groups = (p.B + L - 1) / L;
  at::parallel_for(0, groups, std::max<int64_t>(1, 64 / NN), [&](int64_t g0, int64_t g1) {
    V x[NN], g[NN], lg[NN];
    V hist[(2 * sinkhorn::v4::kMaxIters - 1) * N];
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t b0 = grp * L, count = std::min(L, p.B - b0);
      load_lanes(X, NN, b0, count, x, perm);
      if (G) load_lanes(G, NN, b0, count, g, perm);
      run_lanes<N>(x, g, lg, hist, G != nullptr, p.paper, p.iters, eps);
      store_lanes(Out, NN, b0, count, g, perm);
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
