// CPU kernel of mHC's per-token mappings (mhc_mappings_math.h), forward and backward, from the
// normalised projections or from the raw ones and the norms (p.norm set): the shared
// per-token math on one SIMD vector of tokens at a time (a lane per token), the Sinkhorn as the
// fused mHC Sinkhorn runs it (mhc_v4.h run_lanes). Included once per ISA build (isa_entry.h).
#pragma once

#include "../mhc_mappings_math.h"
#include "mhc_v4.h"

namespace sinkhorn_ops {
namespace cpu {
namespace {  // internal linkage: one copy per ISA translation unit (see solver.h)

template <int N, typename acc_t>
void mhc_mappings_lanes(const sinkhorn::MappingsParams& p) {
  using V = VecOf<acc_t>;
  using Token = sinkhorn::mappings::Token<N, V, LaneOps<V>>;
  constexpr int64_t L = kVecLanes<acc_t>;
  constexpr int NN = N * N, K = Token::K, P = Token::P;
  auto in = [](const void* ptr) { return static_cast<const acc_t*>(ptr); };
  auto out = [](void* ptr) { return static_cast<acc_t*>(ptr); };
  const bool paper = !p.v4;
  const acc_t eps = static_cast<acc_t>(p.eps);  // 0 for the paper's variant (the front door)
  V alpha[3], bias[K];
  for (int g = 0; g < 3; ++g) alpha[g] = V{} + *in(p.alpha[g]);
  using sinkhorn::mappings::bias_index, sinkhorn::mappings::gate;
  for (int k = 0; k < K; ++k) bias[k] = V{} + in(p.bias[gate(k, N)])[bias_index(k, N)];
  const Transpose<N> t;  // H_res is the iterated matrix transposed, in both variants
  const bool live[3] = {p.grad_pre != nullptr, p.grad_post != nullptr, p.grad_res != nullptr};
  const bool rms = p.norm != nullptr;
  const acc_t inv_dim = static_cast<acc_t>(p.inv_dim);
  const acc_t norm_eps = static_cast<acc_t>(p.norm_eps);
  const int64_t groups = (p.T + L - 1) / L;
  at::parallel_for(0, groups, std::max<int64_t>(1, 64 / K), [&](int64_t g0, int64_t g1) {
    V y[K], z[K], x[NN], g[NN], lg[NN], a[N], c[N], part[P], grad_y[K];
    V* const dots = part;  // part: [dots | dz | zeros] (mhc_mappings_math.h)
    V* const dz = part + 3;
    V hist[(2 * sinkhorn::v4::kMaxIters - 1) * N];
    V r{};  // the lanes' inverse RMS (rms)
    // Lanes of a (count tokens, width) tensor from b0, zeros for a null one.
    auto load = [&](const void* src, int64_t width, int64_t b0, int64_t count, V* dst,
                    const int* perm = nullptr) {
      if (src == nullptr) {
        for (int64_t k = 0; k < width; ++k) dst[k] = V{};
      } else {
        load_lanes(in(src), width, b0, count, dst, perm);
      }
    };
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t b0 = grp * L, count = std::min(L, p.T - b0);
      load(p.proj, K, b0, count, y);
      if (rms) {
        V nu;
        load(p.norm, 1, b0, count, &nu);
        for (int64_t l = 0; l < L; ++l)
          r[l] = sinkhorn::mappings::inverse_rms<acc_t>(nu[l], inv_dim, norm_eps);
        Token::normalise(y, r);
      }
      Token::logits(y, alpha, bias, z);
      Token::res_logits(z, paper, x);
      if (!p.backward) {
        Token::gates(z, eps, a, c);
        store_lanes(out(p.pre), N, b0, count, a);
        store_lanes(out(p.post), N, b0, count, c);
        run_lanes<N>(x, g, lg, hist, false, paper, p.iters, eps);
        store_lanes(out(p.res), NN, b0, count, g, t.perm);
        continue;
      }
      load(p.grad_pre, N, b0, count, a);
      load(p.grad_post, N, b0, count, c);
      Token::gates_backward(z, a, c, dz);
      load(p.grad_res, NN, b0, count, g, t.perm);  // dL/d(iterated matrix)
      if (p.grad_res != nullptr) run_lanes<N>(x, g, lg, hist, true, paper, p.iters, eps);
      Token::res_gradient(g, paper, dz);
      Token::finish(y, alpha, live, dz, grad_y, dots);
      if (rms) {
        const V coef = Token::rms_backward(y, live, r, inv_dim, grad_y);
        store_lanes(out(p.rms_coef), 1, b0, count, &coef);
      }
      store_lanes(out(p.grad_proj), K, b0, count, grad_y);
      Token::pad_partials(part);
      store_lanes(out(p.partials), P, b0, count, part);
    }
  });
}

void mhc_mappings_any(const sinkhorn::MappingsParams& p) {
  if (p.T == 0) return;
  TORCH_CHECK(p.n >= 1 && p.n <= sinkhorn::v4::kMaxN, "mhc_mappings: n = ", p.n,
              " has no kernel");
  sinkhorn::n_switch<sinkhorn::v4::kMaxN>(p.n, [&](auto n) {
    if (p.dtype == sinkhorn::DType::Float64) {
      mhc_mappings_lanes<decltype(n)::value, double>(p);
    } else {
      mhc_mappings_lanes<decltype(n)::value, float>(p);
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace sinkhorn_ops
