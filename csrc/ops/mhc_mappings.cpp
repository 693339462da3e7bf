// Front door of mHC's fused mappings operators.
#include "mhc_mappings.h"

#include <cmath>
#include <string>

#include "../mhc_mappings_math.h"
#include "arg_checks.h"

namespace sinkhorn_ops {
namespace detail {

int64_t checked_streams(const std::string& op, const at::Tensor& b_res) {
  TORCH_CHECK_VALUE(b_res.dim() == 2 && b_res.size(0) == b_res.size(1) && b_res.size(0) >= 1 &&
                        b_res.size(0) <= sinkhorn::v4::kMaxN,
                    op, ": expected b_res of shape (n, n) with 1 <= n <= ", sinkhorn::v4::kMaxN,
                    " (the fused kernel's largest n), got ", b_res.sizes());
  return b_res.size(0);
}

MappingsCall prepare_mhc_mappings(bool backward, const at::Tensor& proj,
                                  const MappingsWeights& weights, int64_t iters, double eps,
                                  c10::string_view variant, const at::Tensor& grad_pre,
                                  const at::Tensor& grad_post, const at::Tensor& grad_res,
                                  const FoldedNorm* rms) {
  const std::string op = rms != nullptr ? rms->op
                         : backward     ? "mhc_mappings_backward"
                                        : "mhc_mappings";
  const auto dtype = proj.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, op,
                   ": expected proj of dtype float32 or float64 (mHC computes its mappings in "
                   "fp32), got ", dtype);
  TORCH_CHECK_VALUE(variant == "paper" || variant == "v4", op,
                    ": expected variant \"paper\" or \"v4\", got \"", std::string(variant), "\"");
  const bool v4 = variant == "v4";
  const int64_t n = checked_streams(op, weights[5]), K = sinkhorn::mappings::projections(n);
  TORCH_CHECK_VALUE(proj.dim() >= 1 && proj.size(-1) == K, op,
                    ": expected proj of shape (..., 2n + n^2) = (..., ", K, ") for n = ", n,
                    ", got ", proj.sizes());
  TORCH_CHECK_VALUE(iters >= 1 && iters <= sinkhorn::v4::kMaxIters, op,
                    ": expected 1 <= iters <= ", sinkhorn::v4::kMaxIters, ", got ", iters);
  TORCH_CHECK_VALUE(!v4 || (std::isfinite(eps) && eps > 0), op,
                    ": expected a finite eps > 0 for variant \"v4\", got ", eps);
  MappingsCall c;
  c.proj = proj.contiguous();
  const auto batch = proj.sizes().slice(0, proj.dim() - 1);
  for (int w = 0; w < 6; ++w) {
    const at::Tensor& t = weights[w];
    const auto shape = w < 3   ? t.sizes().vec()
                       : w < 5 ? std::vector<int64_t>{n}
                               : std::vector<int64_t>{n, n};
    TORCH_CHECK_VALUE(w >= 3 || t.numel() == 1, op, ": expected ", kWeightNames[w],
                      " to hold one value (a scalar gate), got shape ", t.sizes());
    c.weights[w] = checked(op, kWeightNames[w], t, shape, dtype, proj, "proj");
  }
  auto& p = c.params;
  p.proj = c.proj.data_ptr();
  for (int g = 0; g < 3; ++g) {
    p.alpha[g] = c.weights[g].data_ptr();
    p.bias[g] = c.weights[3 + g].data_ptr();
  }
  const auto options = c.proj.options();
  if (rms != nullptr) {
    // D and norm_eps were checked by the op's own front door (prepare_coefficients).
    TORCH_INTERNAL_ASSERT(rms->dim >= 1 && rms->eps > 0);
    c.norm = checked(op, "norm", rms->norm, batch.vec(), dtype, proj, "proj");
    p.norm = c.norm.data_ptr();
    p.inv_dim = 1.0 / static_cast<double>(rms->dim);
    p.norm_eps = rms->eps;
    if (backward) {
      c.rms_coef = at::empty(batch, options);
      p.rms_coef = c.rms_coef.data_ptr();
    }
  }
  if (backward) {
    auto grad = [&](const char* name, const at::Tensor& t, std::vector<int64_t> shape,
                    at::Tensor& into) -> const void* {
      if (!t.defined()) return nullptr;
      into = checked(op, name, t, shape, dtype, proj, "proj");
      return into.data_ptr();
    };
    p.grad_pre = grad("grad_pre", grad_pre, with(batch, {n}), c.grad_pre);
    p.grad_post = grad("grad_post", grad_post, with(batch, {n}), c.grad_post);
    p.grad_res = grad("grad_res", grad_res, with(batch, {n, n}), c.grad_res);
    c.grad_proj = at::empty(proj.sizes(), options);
    c.partials = at::empty(with(batch, {sinkhorn::mappings::partials(n)}), options);
    p.grad_proj = c.grad_proj.data_ptr();
    p.partials = c.partials.data_ptr();
  } else {
    c.pre = at::empty(with(batch, {n}), options);
    c.post = at::empty(with(batch, {n}), options);
    c.res = at::empty(with(batch, {n, n}), options);
    p.pre = c.pre.data_ptr();
    p.post = c.post.data_ptr();
    p.res = c.res.data_ptr();
  }
  p.backward = backward;
  p.T = proj.numel() / K;
  p.n = n;
  p.iters = static_cast<int>(iters);
  p.v4 = v4;
  p.eps = v4 ? eps : 0.0;
  p.dtype = dtype == at::kDouble ? sinkhorn::DType::Float64 : sinkhorn::DType::Float32;
  return c;
}

at::Tensor mappings_weight_grads(const MappingsCall& call) {
  const int64_t n = call.params.n;
  return call.partials.view({-1, sinkhorn::mappings::partials(n)})
      .sum(0)
      .narrow(0, 0, sinkhorn::mappings::weight_values(n));
}

}  // namespace detail
}  // namespace sinkhorn_ops
