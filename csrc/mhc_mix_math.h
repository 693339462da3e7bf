// The two stream mixings of mHC (MATH.md section 4) at one token and one channel c, forward and
// backward, shared by the CPU kernel (a loop over channels) and the CUDA kernel (a warp per
// token, lanes over channels). N streams, compile time; acc_t accumulates (float for every
// activation dtype but double).
//
//   pre mix:  h(c)     = sum_j h_pre_j x_j(c)                      (the sub-layer's input)
//   post mix: x'_i(c)  = sum_j h_res_ij x_j(c) + h_post_i y(c)     (y = the sub-layer's output)
//
// Their backward, for upstream g (g(c) for pre, g_i(c) for post):
//   pre:  dx_j(c) = h_pre_j g(c);            dh_pre_j   += g(c) x_j(c)
//   post: dx_j(c) = sum_i h_res_ij g_i(c);   dy(c) = sum_i h_post_i g_i(c);
//         dh_res_ij += g_i(c) x_j(c);        dh_post_i  += g_i(c) y(c)
// The sums over c (the dh) are the callers' reductions.
#pragma once

#include "sinkhorn_math.h"

namespace sinkhorn {
namespace mix {

// Largest stream count of the fused kernels (mHC uses 4).
constexpr int kMaxStreams = 8;

template <int N, typename T>
SK_HD T pre(const T* h_pre, const T* x) {
  T s = h_pre[0] * x[0];
  for (int j = 1; j < N; ++j) s += h_pre[j] * x[j];
  return s;
}

// out[i] = x'_i(c).
template <int N, typename T>
SK_HD void post(const T* h_res, const T* h_post, const T* x, T y, T* out) {
  for (int i = 0; i < N; ++i) {
    T s = h_post[i] * y;
    for (int j = 0; j < N; ++j) s += h_res[i * N + j] * x[j];
    out[i] = s;
  }
}

// dx[j] = sum_i h_res_ij g_i(c), and returns dy(c) = sum_i h_post_i g_i(c).
template <int N, typename T>
SK_HD T post_backward(const T* h_res, const T* h_post, const T* g, T* dx) {
  T dy = h_post[0] * g[0];
  for (int i = 1; i < N; ++i) dy += h_post[i] * g[i];
  for (int j = 0; j < N; ++j) {
    T s = h_res[j] * g[0];
    for (int i = 1; i < N; ++i) s += h_res[i * N + j] * g[i];
    dx[j] = s;
  }
  return dy;
}

// The per-channel terms of the post mix's parameter gradients: dh_res += g x^T, dh_post += g y.
template <int N, typename T>
SK_HD void post_accumulate(const T* g, const T* x, T y, T* dh_res, T* dh_post) {
  for (int i = 0; i < N; ++i) {
    for (int j = 0; j < N; ++j) dh_res[i * N + j] += g[i] * x[j];
    dh_post[i] += g[i] * y;
  }
}

}  // namespace mix
}  // namespace sinkhorn
