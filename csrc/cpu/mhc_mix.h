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

  // Token t's rows and mode, copied out of p once a token: the stores below (memcpy, which may
  // alias anything) would otherwise make the compiler reload p's fields for every vector.
  struct Rows {
    const scalar_t* x;  // (N, C)
    const scalar_t* y;  // (C) post
    const scalar_t* g;  // dL/d(output): (C) pre, (N, C) post
    scalar_t* out;      // the output, or dL/dx
    scalar_t* gy;       // dL/dy (post backward)
    int64_t C;
    bool post, backward;
  };

  // Channels [c, c + width) of token t, width = L (W = V) or 1 (W = acc_t). hw: H_res (post) or
  // H_pre in its first N, and qw: H_post, splat into W. dh, when given, accumulates the
  // parameter gradients' terms (N x N then N for post, N for pre) in W lanes.
  template <typename W>
  static void channels(const Rows& r, int64_t c, const W* hw, const W* qw, W* dh) {
    const int64_t C = r.C;
    W xs[N];
    for (int j = 0; j < N; ++j) xs[j] = load<W>(r.x + j * C + c);
    if (!r.post) {
      if (!r.backward) {
        store(r.out + c, sinkhorn::mix::pre<N>(hw, xs));
        return;
      }
      const W g = load<W>(r.g + c);
      for (int j = 0; j < N; ++j) {
        store(r.out + j * C + c, hw[j] * g);
        dh[j] += g * xs[j];
      }
      return;
    }
    const W y = load<W>(r.y + c);
    if (!r.backward) {
      W o[N];
      sinkhorn::mix::post<N>(hw, qw, xs, y, o);
      for (int i = 0; i < N; ++i) store(r.out + i * C + c, o[i]);
      return;
    }
    W g[N], dx[N];
    for (int i = 0; i < N; ++i) g[i] = load<W>(r.g + i * C + c);
    store(r.gy + c, sinkhorn::mix::post_backward<N>(hw, qw, g, dx));
    for (int j = 0; j < N; ++j) store(r.out + j * C + c, dx[j]);
    sinkhorn::mix::post_accumulate<N>(g, xs, y, dh, dh + N * N);
  }

  void token(int64_t t) const {
    const int64_t C = p.C;
    const bool post = p.post, backward = p.backward;
    const Rows r{static_cast<const scalar_t*>(p.x) + t * N * C,
                 post ? static_cast<const scalar_t*>(p.y) + t * C : nullptr,
                 backward ? static_cast<const scalar_t*>(p.grad) + t * (post ? N : 1) * C
                          : nullptr,
                 static_cast<scalar_t*>(p.out) + t * (post || backward ? N : 1) * C,
                 post && backward ? static_cast<scalar_t*>(p.grad_y) + t * C : nullptr,
                 C, post, backward};
    constexpr int K = N * N + N;  // gradient terms (post; pre uses the first N)
    constexpr int H = N * N;      // mapping entries (post; pre uses the first N)
    acc_t hs[H], qs[N];
    const acc_t* h = static_cast<const acc_t*>(post ? p.h_res : p.h_pre) + t * (post ? H : N);
    for (int k = 0; k < (post ? H : N); ++k) hs[k] = h[k];
    for (int i = 0; i < N; ++i)
      qs[i] = post ? static_cast<const acc_t*>(p.h_post)[t * N + i] : acc_t(0);
    V hv[H], qv[N], dv[K];
    acc_t ds[K];
    for (int k = 0; k < H; ++k) hv[k] = splat<V>(hs[k]);
    for (int i = 0; i < N; ++i) qv[i] = splat<V>(qs[i]);
    for (int k = 0; k < K; ++k) {
      dv[k] = splat<V>(0);
      ds[k] = 0;
    }
    int64_t c = 0;
    for (; c + L <= C; c += L) channels<V>(r, c, hv, qv, dv);
    for (; c < C; ++c) channels<acc_t>(r, c, hs, qs, ds);
    if (!backward) return;
    for (int k = 0; k < K; ++k)
      for (int64_t l = 0; l < L; ++l) ds[k] += dv[k][l];
    if (!post) {
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
