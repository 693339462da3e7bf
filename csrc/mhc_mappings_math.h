// mHC's per-token mappings (MATH.md section 4) from the token's normalised projections, for one
// token: the part of the coefficient computation after RMSNorm(x) phi. Shared by the CPU kernel
// (T a SIMD vector, a token per lane) and the CUDA kernel (a thread per token, T = float or
// double). Plain C++, no ATen.
//
// A token's K = 2n + n^2 projections y are laid out [pre (n) | post (n) | res (n x n, row-major)]
// and each group g has a scalar gate alpha_g and per-entry biases b:
//
//   z = alpha_g y + b
//   H_pre  = sigmoid(z_pre) + pre_eps          (pre_eps: 0 for the paper, eps for DeepSeek-V4)
//   H_post = 2 sigmoid(z_post)
//   H_res  = Sinkhorn(mat(z_res))              (mhc_v4_math.h; the kernels run it)
//
// and the backward, given dz (the sigmoids' here, the Sinkhorn's from v4::Problem):
//
//   dL/dy_k = alpha_g dz_k,  dL/db_k = sum over tokens of dz_k,
//   dL/dalpha_g = sum over tokens of sum_{k in g} dz_k y_k (the per-token sums are `dots`).
//
// With the RMSNorm's statistic folded in (mhc_coefficients: the kernels read the raw projections
// R = x phi and the norm nu = ||x|| of the token's D inputs instead of y), y = R r with
// r = (nu^2 / D + norm_eps)^(-1/2), and the backward turns dL/dy into
//
//   dL/dR = r dL/dy  and  c = (sum_k dL/dy_k y_k) r^2 / D,  so that  dL/dx = dL/dR phi^T - c x
//
// (dr/dx = -r^3 x / D). Only the live gates' terms enter c, as in `dots` below.
//
// A token's backward writes its partials row [dots (3) | dz (K) | zeros]: the weights' gradients
// in their arguments' order (alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res) once summed
// over the tokens, which takes one reduction for all six.
#pragma once

#include "mhc_v4_math.h"

namespace sinkhorn {
namespace mappings {

// The gate (0 pre, 1 post, 2 res) of a token's projection k.
SK_HD constexpr int gate(int k, int n) { return k < n ? 0 : (k < 2 * n ? 1 : 2); }

// The index of a token's projection k within its gate's biases (b_pre, b_post or b_res, each
// starting at gate * n).
SK_HD constexpr int bias_index(int k, int n) { return k - gate(k, n) * n; }

// Projections per token.
SK_HD constexpr int projections(int n) { return 2 * n + n * n; }

// The weights' values (three gates and the K biases), and the length of a token's partials row:
// those, then zeros up to a multiple of 4 (whole 16-byte words in fp32 and fp64).
SK_HD constexpr int weight_values(int n) { return 3 + projections(n); }
SK_HD constexpr int partials(int n) { return (weight_values(n) + 3) / 4 * 4; }

// r = (nu^2 / D + eps)^(-1/2) of a token whose D inputs have the norm nu (inv_dim = 1 / D).
template <typename E>
SK_HD E inverse_rms(E nu, E inv_dim, E eps) {
  return static_cast<E>(1) / math::sqrt_(nu * nu * inv_dim + eps);
}

// Ops as in v4::Problem (E, exp; the kernels' Sinkhorn needs the rest).
template <int N, typename T, typename Ops>
struct Token {
  using E = typename Ops::E;
  static constexpr int NN = N * N, K = 2 * N + NN, RES = 2 * N, P = partials(N);

  // z = alpha_g y + b, alpha the three gates, b the K biases.
  SK_HD static void logits(const T* y, const T* alpha, const T* bias, T* z) {
    for (int k = 0; k < K; ++k) z[k] = alpha[gate(k, N)] * y[k] + bias[k];
  }

  SK_HD static T sigmoid(T z) {
    const T one = T{} + static_cast<E>(1);
    return one / (one + Ops::exp(-z));
  }

  // H_pre and H_post from z.
  SK_HD static void gates(const T* z, E pre_eps, T* pre, T* post) {
    for (int a = 0; a < N; ++a) {
      pre[a] = sigmoid(z[a]) + pre_eps;
      post[a] = static_cast<E>(2) * sigmoid(z[N + a]);
    }
  }

  // dz of the pre and post groups (dz[0, 2N)) given dL/dH_pre and dL/dH_post: sigmoid's
  // derivative s (1 - s), twice that for H_post.
  SK_HD static void gates_backward(const T* z, const T* g_pre, const T* g_post, T* dz) {
    const T one = T{} + static_cast<E>(1);
    for (int a = 0; a < N; ++a) {
      const T s = sigmoid(z[a]), t = sigmoid(z[N + a]);
      dz[a] = g_pre[a] * ((one - s) * s);
      dz[N + a] = (static_cast<E>(2) * g_post[a]) * ((one - t) * t);
    }
  }

  // The Sinkhorn's logits x from z_res, in the orientation the kernels iterate (transposed for
  // the paper's Sinkhorn, DeepSeek-V4's on the transpose), and dz_res back from the iterated
  // problem's gradient g. A select between two compile-time indices, not a runtime index: a GPU
  // thread keeps the arrays in registers.
  SK_HD static void res_logits(const T* z, bool transpose, T* x) {
    for (int k = 0; k < NN; ++k) x[k] = transpose ? z[RES + v4::transposed(k, N)] : z[RES + k];
  }
  SK_HD static void res_gradient(const T* g, bool transpose, T* dz) {
    for (int k = 0; k < NN; ++k) dz[RES + k] = transpose ? g[v4::transposed(k, N)] : g[k];
  }

  // dL/dy and the per-gate sums of dz y given dz. A gate whose outputs had no upstream gradient
  // (live[g] false) gets exact zeros in dz, dL/dy and its sum, whatever y and its alpha hold (a
  // NaN or inf projection or gate of an unused output must not leak into the others' gradients,
  // nor through dL/dR phi^T into every entry of dL/dx).
  SK_HD static void finish(const T* y, const T* alpha, const bool* live, T* dz, T* grad_y,
                           T* dots) {
    // An unused gate's alpha as zero (0 dz, not inf * 0). Per gate, not per value: a select per
    // value cost the n = 8 fp32 CUDA backward 900 bytes of stack.
    T gate_alpha[3];
    for (int g = 0; g < 3; ++g) {
      dots[g] = T{};
      gate_alpha[g] = live[g] ? alpha[g] : T{};
    }
    for (int k = 0; k < K; ++k) {
      const int g = gate(k, N);
      if (!live[g]) dz[k] = T{};
      grad_y[k] = gate_alpha[g] * dz[k];
      if (live[g]) dots[g] = dots[g] + dz[k] * y[k];
    }
  }

  // y = R r: the normalised projections from the raw ones (in place).
  SK_HD static void normalise(T* y, T r) {
    for (int k = 0; k < K; ++k) y[k] = y[k] * r;
  }

  // dL/dR (in place of dL/dy) and the coefficient c of x in dL/dx, given the normalised y and r
  // (the live gates' terms only; inv_dim = 1 / D).
  SK_HD static T rms_backward(const T* y, const bool* live, T r, E inv_dim, T* grad) {
    T dot{};
    for (int k = 0; k < K; ++k) {
      if (live[gate(k, N)]) dot = dot + grad[k] * y[k];
      grad[k] = grad[k] * r;
    }
    return dot * (r * r) * inv_dim;
  }

  // The padding of a partials row part ([dots | dz | zeros]).
  SK_HD static void pad_partials(T* part) {
    for (int k = weight_values(N); k < P; ++k) part[k] = T{};
  }
};

}  // namespace mappings
}  // namespace sinkhorn
