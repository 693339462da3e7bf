// Front door of mHC's fused coefficients (mhc_coefficients and its backward): RMSNorm(x) phi and
// the mappings of MATH.md section 4 from the streams x, with the norm's statistic folded into the
// mappings kernel (mhc_mappings_math.h) instead of applied by separate ops. A call is two ATen
// ops (the norm of every token, one read of x; the raw projections x phi, one matmul) and the
// mappings kernel; its backward is the kernel (dL/dR and the norm's coefficient c per token),
// one reduction for the six weights, and two matmuls:
//
//   dL/dx = dL/dR phi^T - c x,   dL/d[phi_pre | phi_post | phi_res] = x^T dL/dR.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "mhc_mappings.h"

namespace sinkhorn_ops {
namespace detail {

// phi_pre (D, n), phi_post (D, n), phi_res (D, n^2).
using Projections = std::array<at::Tensor, 3>;

// A validated call's inputs: x as (T, D) in phi's dtype (a transient copy for a lower precision
// x), the three phi side by side (D, 2n + n^2), and x's leading shape.
struct CoefficientsInputs {
  at::Tensor x, phi;
  std::vector<int64_t> batch;
  int64_t dim = 0;
};

// Checks x (..., D) in phi's dtype or a lower precision, the three phi (fp32 or fp64, the dtype
// everything computes in) and the six weights' dtype and device against them; n comes from
// b_res. Raises ValueError/TypeError naming op, the argument, what was expected and what came.
CoefficientsInputs prepare_coefficients(const std::string& op, const at::Tensor& x,
                                        const Projections& phi, const MappingsWeights& weights,
                                        double norm_eps);

// The raw projections x phi (T, 2n + n^2) and the norms ||x|| (T) of the inputs, computed in
// their dtype whatever autocast says.
std::tuple<at::Tensor, at::Tensor> raw_projection(const CoefficientsInputs& in);

// (dL/dx in x's shape and dtype, dL/d[phi_pre | phi_post | phi_res] (D, 2n + n^2)) from a
// backward call that ran with the norm folded in; each an empty tensor unless asked for.
std::tuple<at::Tensor, at::Tensor> coefficient_grads(const CoefficientsInputs& in,
                                                     const at::Tensor& x,
                                                     const MappingsCall& call, bool grad_x,
                                                     bool grad_phi);

}  // namespace detail
}  // namespace sinkhorn_ops
