// rms_projection: RMSNorm(x) phi without the norm's weight, y = (x phi) r with
// r = (mean(x^2) + eps)^(-1/2) over the last dimension (mHC's coefficient projection, MATH.md
// section 4), with its backward written out and its autograd node recorded in C++ (a Python
// autograd.Function cost about 0.1 ms of host time a layer's forward and backward).
//
// The forward reads x once for the norm (a reduction, no x^2 tensor) and once in the matmul;
// the backward is two matmuls and one pass:
//
//   dR = dy r,  dphi = x^T dR,  dx = dR phi^T - c x  with  c = (sum_k dy_k y_k) r^2 / D,
//
// since y = R r with R = x phi and dr/dx = -r^3 x / D. x in a lower precision than phi is
// converted in each pass (a transient copy) and saved as it came (the mHC layer's bf16 streams,
// which its mixings save anyway), not as a converted copy. The backward is made of ATen ops, so it differentiates
// again (double backward: under create_graph it recomputes y and r from x, one more matmul), and
// torch.compile traces those ops rather than an opaque call.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "autograd_node.h"

namespace sinkhorn_ops {
namespace {

using autograd::Variable;
using autograd::variable_list;

void check_args(const at::Tensor& x, const at::Tensor& phi, double eps) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()) && at::isFloatingType(phi.scalar_type()),
                   "rms_projection: expected floating x and phi, got ", x.scalar_type(), " and ",
                   phi.scalar_type());
  TORCH_CHECK_TYPE(c10::promoteTypes(x.scalar_type(), phi.scalar_type()) == phi.scalar_type(),
                   "rms_projection: expected x in phi's dtype (", phi.scalar_type(),
                   ", in which it computes) or a lower precision, got ", x.scalar_type());
  TORCH_CHECK_VALUE(phi.dim() == 2 && x.dim() >= 1 && x.size(-1) == phi.size(0),
                    "rms_projection: expected phi of shape (", x.dim() >= 1 ? x.size(-1) : 0,
                    ", K) for x of shape ", x.sizes(), ", got ", phi.sizes());
  TORCH_CHECK_VALUE(phi.device() == x.device(), "rms_projection: expected phi on x's device ",
                    x.device(), ", got ", phi.device());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "rms_projection: expected a finite eps >= 0, got ",
                    eps);
}

// y and r (..., 1), computed in phi's dtype.
std::tuple<at::Tensor, at::Tensor> project(const at::Tensor& x_in, const at::Tensor& phi,
                                           double eps) {
  const at::Tensor x = x_in.to(phi.scalar_type());
  const double d = static_cast<double>(x.size(-1));
  const at::Tensor norm = at::linalg_vector_norm(x, 2, at::IntArrayRef{-1}, /*keepdim=*/true);
  const at::Tensor inv_rms = at::rsqrt(norm.square() / d + eps);
  // Out of place: under autocast the matmul is bf16 and the product takes the fp32 norm's
  // promotion, as the plain formula does.
  return {at::matmul(x, phi) * inv_rms, inv_rms};
}

at::Tensor rms_projection_op(const at::Tensor& x, const at::Tensor& phi, double eps) {
  check_args(x, phi, eps);
  return std::get<0>(project(x, phi, eps));
}

// Saved: x (as it came), phi, y (the output) and r.
struct RmsProjectionBackward : autograd::NodeWith<RmsProjectionBackward> {
  double eps = 0;
  template <typename S>
  static auto options(S& n) {
    return std::tie(n.eps);
  }
  std::string name() const override { return "RmsProjectionBackward"; }

  variable_list backward(variable_list& grad, const variable_list& s) override {
    const at::Tensor& saved = s[0];
    const at::Tensor& phi = s[1];
    at::Tensor y = s[2], inv_rms = s[3];
    const at::Tensor& dy = grad[0];
    if (!dy.defined()) return {Variable(), Variable()};
    const at::Tensor x = saved.to(phi.scalar_type());
    // Under create_graph, y and r again as functions of x and phi (the saved ones carry no
    // history to them), so that the backward's own derivative is right.
    if (at::GradMode::is_enabled()) std::tie(y, inv_rms) = project(saved, phi, eps);
    const int64_t d = x.size(-1);
    const at::Tensor dr = dy * inv_rms;
    at::Tensor dx, dphi;
    if (needs_grad(0)) {
      const at::Tensor c = (dy * y).sum(-1, /*keepdim=*/true) * inv_rms.square() / d;
      // Out of place: under vmap (per-sample Hessians) an in-place addcmul_ has no batching
      // rule and would take PyTorch's per-sample fallback.
      dx = at::addcmul(at::matmul(dr, phi.mT()), x, c, -1).to(saved.scalar_type());
    }
    if (needs_grad(1))
      dphi = x.reshape({-1, d}).mT().mm(dr.reshape({-1, dr.size(-1)}));
    return {dx, dphi};
  }
};

}  // namespace
}  // namespace sinkhorn_ops

TORCH_LIBRARY_IMPL(sinkhorn_ops, CompositeExplicitAutograd, m) {
  m.impl("rms_projection", &sinkhorn_ops::rms_projection_op);
}

TORCH_LIBRARY_IMPL(sinkhorn_ops, Autograd, m) {
  m.impl("rms_projection", [](const at::Tensor& x, const at::Tensor& phi, double eps) {
    using namespace sinkhorn_ops;
    check_args(x, phi, eps);
    // Forward-mode AD: the same ATen ops, run where they carry the tangents.
    if (autograd::has_tangent({x, phi})) return std::get<0>(project(x, phi, eps));
    auto node = autograd::begin_node<RmsProjectionBackward>("rms_projection", {x, phi});
    auto [y, inv_rms] = autograd::below_autograd([&] { return project(x, phi, eps); });
    if (node) {
      autograd::set_history(node, {y});
      node->save(x);
      node->save(phi);
      node->save(y, /*is_output=*/true);
      node->save(inv_rms);
      node->eps = eps;
    }
    return y;
  });
}
