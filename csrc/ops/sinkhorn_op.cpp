// Schema of the operator (TORCH_LIBRARY) and the C++ API that calls it through the dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "../sinkhorn_ops.h"

namespace sinkhorn_ops {

SinkhornResult sinkhorn(const at::Tensor& scores, const SinkhornOptions& o) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sinkhorn_ops::sinkhorn", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const c10::optional<at::Tensor>&,
                           const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                           int64_t, c10::string_view, double)>();
  auto [plan, f, g, steps, error] = op.call(scores, o.a, o.b, o.mask, o.steps, o.start, o.tol);
  return {plan, f, g, steps, error};
}

}  // namespace sinkhorn_ops

TORCH_LIBRARY(sinkhorn_ops, m) {
  m.def(
      "sinkhorn(Tensor scores, Tensor? a, Tensor? b, Tensor? mask, int steps, str start, "
      "float tol) -> (Tensor plan, Tensor f, Tensor g, Tensor steps, Tensor error)",
      {at::Tag::pt2_compliant_tag});
}
