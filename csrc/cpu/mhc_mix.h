// CPU kernels of the mHC stream mixings (mhc_mix_math.h), forward and backward: tokens in
// parallel, and within a token a SIMD vector of channels at a time runs the shared per-channel
// math (its lanes are channels), the channels left over one at a time with the same functions.
// Included once per ISA build (isa_entry.h).
#pragma once

#include "../mhc_mix_math.h"
#include "../n_switch.h"
#include "isa_prelude.h"
#include "vec_math.h"

namespace sinkhorn_ops {
namespace cpu {
namespace {  // internal linkage: one copy per ISA translation unit (see solver.h)

// Mixes one token: x (N, C), y (C), the mappings in acc_t. W is the vector type of acc_t (the
// channel lanes) or acc_t itself (one channel).
template <int N, typename scalar_t, typename acc_t>
struct MixToken {
  using V = VecOf<acc_t>;
  static constexpr int64_t L = kVecLanes<acc_t>;
  const sinkhorn::MixParams& p;

  template <typename W>
  static W load(const scalar_t* src) {
    if constexpr (std::is_same_v<W, acc_t>) {
      return static_cast<acc_t>(*src);
    } else {
      return load_widened<acc_t>(src);
    }
  }

  template <typename W>
  static void store(scalar_t* dst, W w) {
    if constexpr (std::is_same_v<W, acc_t>) {
      *dst = static_cast<scalar_t>(w);
    } else {
      store_narrowed(dst, w);
    }
  }

  // Channels [c, c + width) of token t, width = L (W = V) or 1 (W = acc_t). dh, when given,
  // accumulates the parameter gradients' terms (N x N then N for post, N for pre) in W lanes.
  template <typename W>
  void channels(int64_t t, int64_t c, const acc_t* hp, const acc_t* hq, const acc_t* hr,
                W* dh) const {
    const int64_t C = p.C;
    const scalar_t* x = static_cast<const scalar_t*>(p.x) + t * N * C + c;
    W xs[N], hw[N * N], qw[N];
    for (int j = 0; j < N; ++j) xs[j] = load<W>(x + j * C);
    if (!p.post) {
      for (int j = 0; j < N; ++j) hw[j] = W{} + hp[j];
      if (!p.backward) {
        store(static_cast<scalar_t*>(p.out) + t * C + c, sinkhorn::mix::pre<N>(hw, xs));
        return;
      }
      const W g = load<W>(static_cast<const scalar_t*>(p.grad) + t * C + c);
      scalar_t* dx = static_cast<scalar_t*>(p.out) + t * N * C + c;
      for (int j = 0; j < N; ++j) {
        store(dx + j * C, hw[j] * g);
        dh[j] += g * xs[j];
      }
      return;
    }
    for (int k = 0; k < N * N; ++k) hw[k] = W{} + hr[k];
    for (int i = 0; i < N; ++i) qw[i] = W{} + hq[i];
    const W y = load<W>(static_cast<const scalar_t*>(p.y) + t * C + c);
    if (!p.backward) {
      W o[N];
      sinkhorn::mix::post<N>(hw, qw, xs, y, o);
      scalar_t* out = static_cast<scalar_t*>(p.out) + t * N * C + c;
      for (int i = 0; i < N; ++i) store(out + i * C, o[i]);
      return;
    }
    W g[N], dx[N];
    const scalar_t* G = static_cast<const scalar_t*>(p.grad) + t * N * C + c;
    for (int i = 0; i < N; ++i) g[i] = load<W>(G + i * C);
    const W dy = sinkhorn::mix::post_backward<N>(hw, qw, g, dx);
    store(static_cast<scalar_t*>(p.grad_y) + t * C + c, dy);
    scalar_t* DX = static_cast<scalar_t*>(p.out) + t * N * C + c;
    for (int j = 0; j < N; ++j) store(DX + j * C, dx[j]);
    sinkhorn::mix::post_accumulate<N>(g, xs, y, dh, dh + N * N);
  }

  void token(int64_t t) const {
    const acc_t* hp = p.post ? nullptr : static_cast<const acc_t*>(p.h_pre) + t * N;
    const acc_t* hq = p.post ? static_cast<const acc_t*>(p.h_post) + t * N : nullptr;
    const acc_t* hr = p.post ? static_cast<const acc_t*>(p.h_res) + t * N * N : nullptr;
    constexpr int K = N * N + N;  // gradient terms (post; pre uses the first N)
    V dv[K];
    acc_t ds[K];
    for (int k = 0; k < K; ++k) {
      dv[k] = splat<V>(0);
      ds[k] = 0;
    }
    int64_t c = 0;
    for (; c + L <= p.C; c += L) channels<V>(t, c, hp, hq, hr, dv);
    for (; c < p.C; ++c) channels<acc_t>(t, c, hp, hq, hr, ds);
    if (!p.backward) return;
    for (int k = 0; k < K; ++k)
      for (int64_t l = 0; l < L; ++l) ds[k] += dv[k][l];
    if (!p.post) {
      acc_t* d = static_cast<acc_t*>(p.grad_h_pre) + t * N;
      for (int j = 0; j < N; ++j) d[j] = ds[j];
      return;
    }
    acc_t* dr = static_cast<acc_t*>(p.grad_h_res) + t * N * N;
    acc_t* dq = static_cast<acc_t*>(p.grad_h_post) + t * N;
    for (int k = 0; k < N * N; ++k) dr[k] = ds[k];
    for (int i = 0; i < N; ++i) dq[i] = ds[N * N + i];
  }
};

template <int N, typename scalar_t>
void mhc_mix_typed(const sinkhorn::MixParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const MixToken<N, scalar_t, acc_t> mix{p};
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, N * p.C));
  at::parallel_for(0, p.T, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) mix.token(t);
  });
}

void mhc_mix_any(const sinkhorn::MixParams& p, at::ScalarType dtype) {
  if (p.T == 0) return;  // C == 0 still writes the (zero) mapping gradients
  TORCH_CHECK(p.n >= 1 && p.n <= sinkhorn::mix::kMaxStreams, "mhc_mix: n = ", p.n,
              " has no kernel");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mhc_mix_cpu", [&] {
    sinkhorn::n_switch<sinkhorn::mix::kMaxStreams>(
        p.n, [&](auto n) { mhc_mix_typed<decltype(n)::value, scalar_t>(p); });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace sinkhorn_ops
