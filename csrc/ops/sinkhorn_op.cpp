// Schema of the operator (TORCH_LIBRARY) and the C++ API that calls it through the dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "../sinkhorn_ops.h"
#include "schema.h"
#include "sinkhorn_backward.h"

namespace sinkhorn_ops {

SinkhornResult sinkhorn(const at::Tensor& scores, const SinkhornOptions& o) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sinkhorn_ops::sinkhorn", "")
                       .typed<detail::ForwardResult(
                           const at::Tensor&, const c10::optional<at::Tensor>&,
                           const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                           int64_t, c10::string_view, double, c10::string_view, double, int64_t)>();
  auto [plan, f, g, steps, error] = op.call(scores, o.a, o.b, o.mask, o.steps, o.start, o.tol,
                                            o.grad, o.cg_tol, o.cg_max_iter);
  return {plan, f, g, steps, error};
}

SinkhornGrads sinkhorn_backward(const at::Tensor& scores, const SinkhornOptions& o,
                                const SinkhornResult& forward, const at::Tensor& grad_plan,
                                const c10::optional<at::Tensor>& grad_f,
                                const c10::optional<at::Tensor>& grad_g) {
  using Opt = c10::optional<at::Tensor>;
  detail::BackwardResult r;
  if (o.grad == "unrolled") {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sinkhorn_ops::sinkhorn_backward_unrolled", "")
                         .typed<detail::BackwardResult(const at::Tensor&, const Opt&, const Opt&,
                                                       const at::Tensor&, const Opt&, const Opt&,
                                                       const Opt&, const at::Tensor&, int64_t,
                                                       c10::string_view)>();
    r = op.call(grad_plan, grad_f, grad_g, scores, o.a, o.b, o.mask, forward.steps, o.steps,
                o.start);
  } else {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("sinkhorn_ops::sinkhorn_backward_implicit", "")
                         .typed<detail::BackwardResult(const at::Tensor&, const Opt&, const Opt&,
                                                       const at::Tensor&, c10::string_view, double,
                                                       int64_t)>();
    r = op.call(grad_plan, grad_f, grad_g, forward.plan, o.grad, o.cg_tol, o.cg_max_iter);
  }
  auto [ds, da, db] = r;
  return {ds, da, db};
}

}  // namespace sinkhorn_ops

TORCH_LIBRARY(sinkhorn_ops, m) { sinkhorn_ops::detail::define_ops(m); }

TORCH_LIBRARY_IMPL(sinkhorn_ops, CompositeExplicitAutograd, m) {
  m.impl("sinkhorn_backward_implicit", &sinkhorn_ops::detail::sinkhorn_backward_implicit);
}
