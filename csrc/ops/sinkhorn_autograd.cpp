// Autograd of the Sinkhorn operator (MATH.md section 2), registered in C++ on the Autograd key:
// sinkhorn_ops::sinkhorn differentiates from LibTorch as from Python, and a call records one C++
// node instead of going through Python's autograd.Function machinery. The forward saves what
// the chosen backward needs (grad="unrolled": the inputs and the steps run, for the replay;
// the implicit modes: the plan alone); the backward calls the backward operator, which is a
// node of its own whose differentiation raises NotImplementedError (no double backward).
#include <torch/library.h>

#include <string>

#include "autograd_node.h"
#include "sinkhorn_backward.h"

namespace sinkhorn_ops {
namespace autograd {

using Opt = c10::optional<at::Tensor>;
using Str = c10::string_view;
using Triple = detail::BackwardResult;

struct UnrolledBackward {
  static constexpr const char* name = "sinkhorn";
  static Triple call(T grad_plan, const Opt& grad_f, const Opt& grad_g, T scores, const Opt& a,
                     const Opt& b, const Opt& mask, T steps_used, int64_t steps, Str start) {
    return detail::call_backward_unrolled(grad_plan, grad_f, grad_g, scores, a, b, mask,
                                          steps_used, steps, start);
  }
};

struct ImplicitBackward {
  static constexpr const char* name = "sinkhorn";
  static Triple call(T grad_plan, const Opt& grad_f, const Opt& grad_g, T plan, Str solver,
                     double cg_tol, int64_t cg_max_iter) {
    return detail::call_backward_implicit(grad_plan, grad_f, grad_g, plan, solver, cg_tol,
                                          cg_max_iter);
  }
};

Opt present(const at::Tensor& t) { return t.defined() ? Opt(t) : Opt(); }

struct Sinkhorn : torch::autograd::Function<Sinkhorn> {
  static variable_list forward(AutogradContext* ctx, T scores, const Opt& a, const Opt& b,
                               const Opt& mask, int64_t steps, Str start, double tol, Str grad,
                               double cg_tol, int64_t cg_max_iter, bool record) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [plan, f, g, steps_used, error] =
        detail::call_sinkhorn(scores, a, b, mask, steps, start, tol, grad, cg_tol, cg_max_iter);
    // Unused outputs get no zero gradient: the backward ops take absent grad_f, grad_g.
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({steps_used, error});
    // Nothing to save when no node is recorded (decided before apply: forward runs with grad
    // mode off).
    if (!record) return {plan, f, g, steps_used, error};
    auto& d = ctx->saved_data;
    d["grad"] = std::string(grad);
    // dL/da and dL/db come back in the broadcast shapes (..., n), (..., m): summed to the
    // marginals' own shapes (symbolic sizes: under torch.compile(dynamic=True) a concrete
    // size here would specialise the graph to it) and dtypes.
    if (a && b) {
      d["a_shape"] = a->sym_sizes();
      d["a_dtype"] = a->scalar_type();
      d["b_shape"] = b->sym_sizes();
      d["b_dtype"] = b->scalar_type();
    }
    if (grad == "unrolled") {
      d["steps"] = steps;
      d["start"] = std::string(start);
      ctx->save_for_backward({scores, a.value_or(at::Tensor()), b.value_or(at::Tensor()),
                              mask.value_or(at::Tensor()), steps_used});
    } else {
      d["cg_tol"] = cg_tol;
      d["cg_max_iter"] = cg_max_iter;
      ctx->save_for_backward({plan});
    }
    return {plan, f, g, steps_used, error};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    auto& d = ctx->saved_data;
    const auto saved = ctx->get_saved_variables();
    const auto mode = d["grad"].toStringRef();
    const auto grad_plan = grads[0].defined() ? grads[0] : at::zeros_like(saved[0]);
    const auto [ds, da, db] =
        mode == "unrolled"
            ? UnrolledBackward::call(grad_plan, present(grads[1]), present(grads[2]), saved[0],
                                     present(saved[1]), present(saved[2]), present(saved[3]),
                                     saved[4], d["steps"].toInt(), d["start"].toStringRef())
            : ImplicitBackward::call(grad_plan, present(grads[1]), present(grads[2]), saved[0],
                                     mode, d["cg_tol"].toDouble(), d["cg_max_iter"].toInt());
    // One gradient per forward argument: scores, a, b, then none for mask, the options and
    // `record`.
    variable_list out(11);
    out[0] = ds;
    if (d.count("a_shape")) {
      if (ctx->needs_input_grad(1)) {
        out[1] = da.sum_to_size_symint(d["a_shape"].toSymIntVector())
                     .to(d["a_dtype"].toScalarType());
      }
      if (ctx->needs_input_grad(2)) {
        out[2] = db.sum_to_size_symint(d["b_shape"].toSymIntVector())
                     .to(d["b_dtype"].toScalarType());
      }
    }
    return out;
  }
};

}  // namespace autograd
}  // namespace sinkhorn_ops

TORCH_LIBRARY_IMPL(sinkhorn_ops, Autograd, m) {
  using namespace sinkhorn_ops::autograd;
  using sinkhorn_ops::detail::backward_kernel;
  m.impl("sinkhorn", [](T scores, const Opt& a, const Opt& b, const Opt& mask, int64_t steps,
                        Str start, double tol, Str grad, double cg_tol, int64_t cg_max_iter) {
    const bool record = sinkhorn_ops::detail::records_graph(scores, a, b);
    const auto r = Sinkhorn::apply(scores, a, b, mask, steps, start, tol, grad, cg_tol,
                                   cg_max_iter, record);
    return std::make_tuple(r[0], r[1], r[2], r[3], r[4]);
  });
  m.impl("sinkhorn_backward_unrolled",
         [](T grad_plan, const Opt& grad_f, const Opt& grad_g, T scores, const Opt& a,
            const Opt& b, const Opt& mask, T steps_used, int64_t steps, Str start) {
           return backward_kernel<UnrolledBackward>(grad_plan, grad_f, grad_g, scores, a, b, mask,
                                                    steps_used, steps, start);
         });
  m.impl("sinkhorn_backward_implicit", [](T grad_plan, const Opt& grad_f, const Opt& grad_g,
                                          T plan, Str solver, double cg_tol, int64_t cg_max_iter) {
    return backward_kernel<ImplicitBackward>(grad_plan, grad_f, grad_g, plan, solver, cg_tol,
                                             cg_max_iter);
  });
}
