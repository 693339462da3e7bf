// Front door of mHC's fused coefficients (mhc_coefficients.h).
#include "mhc_coefficients.h"

#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cmath>

#include "../mhc_mappings_math.h"

namespace sinkhorn_ops {
namespace detail {
namespace {

constexpr const char* kPhiNames[3] = {"phi_pre", "phi_post", "phi_res"};

}  // namespace

CoefficientsInputs prepare_coefficients(const std::string& op, const at::Tensor& x,
                                        const Projections& phi, const MappingsWeights& weights,
                                        double norm_eps) {
  const int64_t n = checked_streams(op, weights[5]);
  const auto dtype = phi[0].scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                   ": expected phi_pre of dtype float32 or float64 (mHC computes its mappings in "
                   "fp32), got ", dtype);
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()) &&
                       c10::promoteTypes(x.scalar_type(), dtype) == dtype,
                   op, ": expected x floating, in phi's dtype (", dtype,
                   ") or a lower precision, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, op,
                    ": expected x of shape (..., D) with D >= 1, got ", x.sizes());
  const int64_t dim = x.size(-1);
  const int64_t widths[3] = {n, n, n * n};
  for (int g = 0; g < 3; ++g) {
    const at::Tensor& t = phi[g];
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": expected ", kPhiNames[g],
                     " of phi_pre's dtype ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == dim && t.size(1) == widths[g], op,
                      ": expected ", kPhiNames[g], " of shape (D, ", g < 2 ? "n" : "n^2",
                      ") = (", dim, ", ", widths[g], ") for x of shape ", x.sizes(),
                      " and n = ", n, ", got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == x.device(), op, ": expected ", kPhiNames[g],
                      " on x's device ", x.device(), ", got ", t.device());
  }
  for (int w = 0; w < 6; ++w) {
    TORCH_CHECK_TYPE(weights[w].scalar_type() == dtype, op, ": expected ", kWeightNames[w],
                     " of phi's dtype ", dtype, ", got ", weights[w].scalar_type());
    TORCH_CHECK_VALUE(weights[w].device() == x.device(), op, ": expected ", kWeightNames[w],
                      " on x's device ", x.device(), ", got ", weights[w].device());
  }
  TORCH_CHECK_VALUE(std::isfinite(norm_eps) && norm_eps > 0, op,
                    ": expected a finite norm_eps > 0, got ", norm_eps);
  CoefficientsInputs in;
  in.batch = x.sizes().slice(0, x.dim() - 1).vec();
  in.dim = dim;
  in.x = x.to(dtype).reshape({-1, dim});
  in.phi = at::cat({phi[0], phi[1], phi[2]}, 1);
  return in;
}

std::tuple<at::Tensor, at::Tensor> raw_projection(const CoefficientsInputs& in) {
  // Below autocast: a bf16 matmul would round the projections that the Sinkhorn then amplifies.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return {in.x.mm(in.phi), at::linalg_vector_norm(in.x, 2, at::IntArrayRef{-1})};
}

std::tuple<at::Tensor, at::Tensor> coefficient_grads(const CoefficientsInputs& in,
                                                     const at::Tensor& x,
                                                     const MappingsCall& call, bool grad_x,
                                                     bool grad_phi) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t K = sinkhorn::mappings::projections(call.params.n);
  const at::Tensor grad_raw = call.grad_proj.view({-1, K});
  at::Tensor dx = x.new_empty({0}), dphi = in.phi.new_empty({0});
  if (grad_x) {
    dx = grad_raw.mm(in.phi.t())
             .addcmul_(in.x, call.rms_coef.view({-1, 1}), -1)
             .to(x.scalar_type())
             .view(x.sizes());
  }
  // One matmul for the three phi (the C++ API splits it into views): three matmuls of 4 to 64
  // columns took 2.3x the time of the one on the CPU (2 cores, D = 1024, 4096 tokens), and on a
  // GPU they would be three launches against one and the small copies that AccumulateGrad makes
  // of the views.
  if (grad_phi) dphi = in.x.t().mm(grad_raw);
  return {dx, dphi};
}

}  // namespace detail
}  // namespace sinkhorn_ops
