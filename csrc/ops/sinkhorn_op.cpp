// Schema of the operator (TORCH_LIBRARY) and the C++ API that calls it through the dispatcher.
#include <torch/library.h>

#include "../sinkhorn_ops.h"
#include "schema.h"
#include "sinkhorn_backward.h"
#include "typed_op.h"

namespace sinkhorn_ops {
namespace detail {

using Opt = c10::optional<at::Tensor>;

ForwardResult call_sinkhorn(const at::Tensor& scores, const Opt& a, const Opt& b, const Opt& mask,
                            int64_t steps, c10::string_view start, double tol,
                            c10::string_view grad, double cg_tol, int64_t cg_max_iter) {
  static auto op = typed_op<ForwardResult(const at::Tensor&, const Opt&, const Opt&, const Opt&,
                                          int64_t, c10::string_view, double, c10::string_view,
                                          double, int64_t)>("sinkhorn_ops::sinkhorn");
  return op.call(scores, a, b, mask, steps, start, tol, grad, cg_tol, cg_max_iter);
}

ForwardResult call_sinkhorn_warm(const at::Tensor& scores, const Opt& a, const Opt& b,
                                 const Opt& mask, const Opt& f0, const Opt& g0, int64_t steps,
                                 c10::string_view start, double tol, c10::string_view grad,
                                 double cg_tol, int64_t cg_max_iter) {
  static auto op = typed_op<ForwardResult(const at::Tensor&, const Opt&, const Opt&, const Opt&,
                                          const Opt&, const Opt&, int64_t, c10::string_view,
                                          double, c10::string_view, double, int64_t)>(
      "sinkhorn_ops::sinkhorn_warm");
  return op.call(scores, a, b, mask, f0, g0, steps, start, tol, grad, cg_tol, cg_max_iter);
}

BackwardResult call_backward_unrolled(const at::Tensor& grad_plan, const Opt& grad_f,
                                      const Opt& grad_g, const at::Tensor& scores, const Opt& a,
                                      const Opt& b, const Opt& mask, const at::Tensor& steps_used,
                                      int64_t steps, c10::string_view start) {
  static auto op =
      typed_op<BackwardResult(const at::Tensor&, const Opt&, const Opt&, const at::Tensor&,
                              const Opt&, const Opt&, const Opt&, const at::Tensor&, int64_t,
                              c10::string_view)>("sinkhorn_ops::sinkhorn_backward_unrolled");
  return op.call(grad_plan, grad_f, grad_g, scores, a, b, mask, steps_used, steps, start);
}

BackwardResult call_backward_implicit(const at::Tensor& grad_plan, const Opt& grad_f,
                                      const Opt& grad_g, const at::Tensor& plan,
                                      c10::string_view solver, double cg_tol,
                                      int64_t cg_max_iter) {
  static auto op =
      typed_op<BackwardResult(const at::Tensor&, const Opt&, const Opt&, const at::Tensor&,
                              c10::string_view, double, int64_t)>(
          "sinkhorn_ops::sinkhorn_backward_implicit");
  return op.call(grad_plan, grad_f, grad_g, plan, solver, cg_tol, cg_max_iter);
}

}  // namespace detail

SinkhornResult sinkhorn(const at::Tensor& scores, const SinkhornOptions& o) {
  auto [plan, f, g, steps, error] =
      o.f0 || o.g0
          ? detail::call_sinkhorn_warm(scores, o.a, o.b, o.mask, o.f0, o.g0, o.steps, o.start,
                                       o.tol, o.grad, o.cg_tol, o.cg_max_iter)
          : detail::call_sinkhorn(scores, o.a, o.b, o.mask, o.steps, o.start, o.tol, o.grad,
                                  o.cg_tol, o.cg_max_iter);
  return {plan, f, g, steps, error};
}

SinkhornGrads sinkhorn_backward(const at::Tensor& scores, const SinkhornOptions& o,
                                const SinkhornResult& forward, const at::Tensor& grad_plan,
                                const c10::optional<at::Tensor>& grad_f,
                                const c10::optional<at::Tensor>& grad_g) {
  TORCH_CHECK_VALUE(!o.f0 && !o.g0,
                    "sinkhorn_backward: expected options without a warm start (f0, g0), got "
                    "one; differentiate a warm-started sinkhorn() with autograd instead");
  auto [ds, da, db] =
      o.grad == "unrolled"
          ? detail::call_backward_unrolled(grad_plan, grad_f, grad_g, scores, o.a, o.b, o.mask,
                                           forward.steps, o.steps, o.start)
          : detail::call_backward_implicit(grad_plan, grad_f, grad_g, forward.plan, o.grad,
                                           o.cg_tol, o.cg_max_iter);
  return {ds, da, db};
}

}  // namespace sinkhorn_ops

TORCH_LIBRARY(sinkhorn_ops, m) { sinkhorn_ops::detail::define_ops(m); }

TORCH_LIBRARY_IMPL(sinkhorn_ops, CompositeExplicitAutograd, m) {
  m.impl("sinkhorn_backward_implicit",
         [](const at::Tensor& grad_plan, const c10::optional<at::Tensor>& grad_f,
            const c10::optional<at::Tensor>& grad_g, const at::Tensor& plan,
            c10::string_view solver, double cg_tol, int64_t cg_max_iter) {
           return sinkhorn_ops::detail::sinkhorn_backward_implicit(grad_plan, grad_f, grad_g, plan,
                                                                   solver, cg_tol, cg_max_iter);
         });
}
