// The mHC operators' differentiable ATen forms (mhc_forms.h).
#include "mhc_forms.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>

#include "sinkhorn_backward.h"

namespace sinkhorn_ops {
namespace forms {
namespace {

at::ScalarType accumulation(T x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor steps_run(T logits, int64_t iters) {
  return at::full(logits.sizes().slice(0, logits.dim() - 2), 2 * iters,
                  logits.options().dtype(at::kLong));
}

}  // namespace

at::Tensor paper_sinkhorn(T logits, int64_t iters) {
  const auto f = detail::prepare_forward(logits, c10::nullopt, c10::nullopt, c10::nullopt,
                                         2 * iters, "col", 0);
  const auto error = at::zeros({f.B}, f.scores.options());
  return std::get<0>(detail::unrolled_forward_differentiable(
      f, {}, {}, steps_run(logits, iters).reshape({f.B}), error));
}

at::Tensor paper_sinkhorn_backward(T grad, T logits, int64_t iters) {
  const auto p = detail::prepare_backward(grad, c10::nullopt, c10::nullopt, logits, c10::nullopt,
                                          c10::nullopt, c10::nullopt, steps_run(logits, iters),
                                          2 * iters, "col");
  return std::get<0>(detail::unrolled_backward_composite(p, at::Tensor(), nullptr, true));
}

at::Tensor v4_sinkhorn(T logits, int64_t iters, double eps) {
  auto comb = at::softmax(logits, -1) + eps;
  comb = comb / (comb.sum(-2, /*keepdim=*/true) + eps);
  for (int64_t i = 1; i < iters; ++i) {
    comb = comb / (comb.sum(-1, true) + eps);
    comb = comb / (comb.sum(-2, true) + eps);
  }
  return comb;
}

at::Tensor pre_mix(T x, T h_pre) {
  const auto acc = accumulation(x);
  return (h_pre.to(acc).unsqueeze(-1) * x.to(acc)).sum(-2).to(x.scalar_type());
}

at::Tensor post_mix(T x, T y, T h_post, T h_res) {
  const auto acc = accumulation(x);
  return (at::matmul(h_res.to(acc), x.to(acc)) +
          h_post.to(acc).unsqueeze(-1) * y.to(acc).unsqueeze(-2))
      .to(x.scalar_type());
}

TensorList mappings(T proj, const TensorList& w, int64_t iters, double eps,
                    const std::string& variant) {
  const int64_t n = w[5].size(-1);
  const auto pre = proj.narrow(-1, 0, n), post = proj.narrow(-1, n, n);
  std::vector<int64_t> res_shape(proj.sizes().begin(), proj.sizes().end() - 1);
  res_shape.push_back(n);
  res_shape.push_back(n);
  const auto res = proj.narrow(-1, 2 * n, n * n).reshape(res_shape);
  // The gates as scalars, whatever their shape of one value (the kernels take them so).
  auto h_pre = at::sigmoid(w[0].reshape({}) * pre + w[3]);
  const auto h_post = 2 * at::sigmoid(w[1].reshape({}) * post + w[4]);
  const auto logits = w[2].reshape({}) * res + w[5];
  at::Tensor h_res;
  if (variant == "v4") {
    h_pre = h_pre + eps;
    h_res = v4_sinkhorn(logits, iters, eps).transpose(-1, -2);
  } else {
    h_res = paper_sinkhorn(logits, iters);
  }
  return {h_pre, h_post, h_res};
}

TensorList coefficients(T x, const TensorList& phi, const TensorList& w, double norm_eps,
                        int64_t iters, double eps, const std::string& variant) {
  const auto xs = x.to(phi[0].scalar_type());
  const auto r = at::rsqrt(xs.square().mean(-1, /*keepdim=*/true) + norm_eps);
  const auto proj = at::matmul(xs, at::cat({phi[0], phi[1], phi[2]}, 1)) * r;
  return mappings(proj, w, iters, eps, variant);
}

at::Tensor tracked(T t) {
  if (!t.defined()) return t;
  const auto handle = [](const at::Tensor& p) {
    return p.requires_grad() ? p.view_as(p) : p.detach().requires_grad_(true);
  };
  if (!torch::autograd::isFwGradDefined(t)) return handle(t);
  // Forward over reverse: the tangent rides on the handle, so the gradients carry theirs.
  return at::_make_dual(handle(t._fw_primal(0)), t._fw_grad(0), 0);
}

bool recorded(const TensorList& args) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& t : args)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

TensorList gradients(const TensorList& outs, const TensorList& ins, const TensorList& grads,
                     bool create_graph) {
  TensorList ys, gs;
  for (size_t j = 0; j < outs.size(); ++j) {
    if (outs[j].defined() && grads[j].defined() && outs[j].requires_grad()) {
      ys.push_back(outs[j]);
      gs.push_back(grads[j]);
    }
  }
  TensorList result(ins.size());
  if (!ys.empty()) {
    result = torch::autograd::grad(ys, ins, gs, /*retain_graph=*/create_graph, create_graph,
                                   /*allow_unused=*/true);
  }
  for (size_t i = 0; i < ins.size(); ++i)
    if (!result[i].defined()) result[i] = at::zeros_like(ins[i]);
  return result;
}

}  // namespace forms
}  // namespace sinkhorn_ops
