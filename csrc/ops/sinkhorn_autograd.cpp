// Autograd of the Sinkhorn operator (MATH.md section 2), registered in C++ on the Autograd key
// (autograd_node.h): sinkhorn_ops::sinkhorn differentiates from LibTorch as from Python, and a
// call records one C++ node. The forward saves what the chosen backward needs (grad="unrolled":
// the inputs and the steps run, for the replay; the implicit modes: the plan alone); the
// backward calls the backward operator.
//
// Second order: the backward operators are differentiable through their ATen forms
// (form_node.h: the unrolled backward's replay and reverse steps; the implicit backward's solve).
// They run their fused kernels and record a node that recomputes and differentiates the form
// only if its own backward ever runs: so create_graph=True without a second backward, and
// torch.func.grad (whose backward always records a graph), keep the fused kernels. A
// forward-mode tangent on their arguments runs the form directly, as does forward-mode AD of
// the unrolled operator itself (its outputs recomputed from the steps its run took).
#include <torch/library.h>

#include <string>

#include "form_node.h"
#include "sinkhorn_backward.h"

namespace sinkhorn_ops {
namespace autograd {

using Str = c10::string_view;

// The backward operators' Forms (form_node.h): the unrolled backward's replay and reverse
// steps, the implicit backward's solve (always dense: its derivative is exact), both out of
// place.

// (grad_plan, grad_f, grad_g, scores, a, b | mask, steps_used) -> (dS, da, db)
struct UnrolledForm {
  struct Options {
    int64_t steps = 0;
    std::string start;
  };
  template <typename O>
  static auto tie(O& o) {
    return std::tie(o.steps, o.start);
  }
  static constexpr const char* kName = "SinkhornBackwardUnrolledBackward";
  static constexpr size_t kDiff = 6;
  static variable_list form(const variable_list& x, const Options& o) {
    return as_list(detail::unrolled_backward_composite(
        detail::prepare_backward(x[0], present(x[1]), present(x[2]), x[3], present(x[4]),
                                 present(x[5]), present(x[6]), x[7], o.steps, o.start),
        at::Tensor(), nullptr, /*differentiable=*/true));
  }
};

// (grad_plan, grad_f, grad_g, plan) -> (dS, da, db)
struct ImplicitForm {
  struct Options {
    std::string solver;
    double cg_tol = 0;
    int64_t cg_max_iter = 0;
  };
  template <typename O>
  static auto tie(O& o) {
    return std::tie(o.solver, o.cg_tol, o.cg_max_iter);
  }
  static constexpr const char* kName = "SinkhornBackwardImplicitBackward";
  static constexpr size_t kDiff = 4;
  static variable_list form(const variable_list& x, const Options& o) {
    return as_list(detail::sinkhorn_backward_implicit(x[0], present(x[1]), present(x[2]), x[3],
                                                      o.solver, o.cg_tol, o.cg_max_iter,
                                                      /*differentiable=*/true));
  }
};

// Gradients of scores, a and b from those of plan, f and g. Saved: unrolled, the scores, a, b,
// mask and the steps run; implicit, the plan (an output).
struct SinkhornBackward : NodeWith<SinkhornBackward> {
  std::string grad, start;
  int64_t steps = 0, cg_max_iter = 0;
  double cg_tol = 0;
  // dL/da and dL/db come back in the broadcast shapes (..., n), (..., m): summed to the
  // marginals' own shapes (symbolic sizes: under torch.compile(dynamic=True) a concrete size
  // here would specialise the graph to it) and dtypes. Empty when the marginals were defaults.
  std::vector<c10::SymInt> a_shape, b_shape;
  at::ScalarType a_dtype = at::kFloat, b_dtype = at::kFloat;
  bool marginals = false;

  template <typename S>
  static auto options(S& n) {
    return std::tie(n.grad, n.start, n.steps, n.cg_max_iter, n.cg_tol, n.marginals, n.a_shape,
                    n.b_shape, n.a_dtype, n.b_dtype);
  }
  std::string name() const override { return "SinkhornBackward"; }

  variable_list backward(variable_list& grads, const variable_list& s) override {
    const auto grad_plan = grads[0].defined() ? grads[0] : at::zeros_like(s[0]);
    const auto [ds, da, db] =
        grad == "unrolled"
            ? detail::call_backward_unrolled(grad_plan, present(grads[1]), present(grads[2]),
                                             s[0], present(s[1]), present(s[2]), present(s[3]),
                                             s[4], steps, start)
            : detail::call_backward_implicit(grad_plan, present(grads[1]), present(grads[2]),
                                             s[0], grad, cg_tol, cg_max_iter);
    variable_list out{ds, Variable(), Variable()};
    if (marginals) {
      if (needs_grad(1)) out[1] = da.sum_to_size_symint(a_shape).to(a_dtype);
      if (needs_grad(2)) out[2] = db.sum_to_size_symint(b_shape).to(b_dtype);
    }
    return out;
  }
};

namespace {

// Forward-mode AD of the unrolled operator: its run (the steps each problem took, the error),
// then its outputs recomputed by the differentiable replay, which carries the tangents.
detail::ForwardResult unrolled_with_tangents(T scores, Opt a, Opt b, Opt mask, int64_t steps,
                                             Str start, double tol, Str grad, double cg_tol,
                                             int64_t cg_max_iter) {
  const auto run = below_autograd([&] {
    return detail::call_sinkhorn(scores, a, b, mask, steps, start, tol, grad, cg_tol,
                                 cg_max_iter);
  });
  const auto problem = detail::prepare_forward(scores, a, b, mask, steps, start, tol);
  return detail::unrolled_forward_differentiable(problem, a.value_or(at::Tensor()),
                                                 b.value_or(at::Tensor()), std::get<3>(run),
                                                 std::get<4>(run));
}

// The forward-mode tangent of an input, or undefined.
at::Tensor tangent_of(Opt t) {
  return t && t->defined() && torch::autograd::isFwGradDefined(*t) ? t->_fw_grad(0)
                                                                    : at::Tensor();
}

// Forward-mode AD of the implicit modes: the tangents of the fixed point, set on the outputs r
// (which carry their reverse-mode history, if any, so the tangents differentiate too). The
// linearised marginal equations, with r = P1, c = P^T 1 (MATH.md section 2.2's H),
//   H [df; dg] = [da - (P o dS) 1 ; db - (P o dS)^T 1],
// are solved by the implicit backward itself (H is symmetric: with zero grad_plan and grad_f,
// grad_g the right-hand side, its gradients of a and b are the solution orthogonal to the null
// space (1, -1), with its solver, the right-hand side projected as for its own): the gauge in
// which this jvp is the transpose of the implicit vjp. Then dP = P o (dS + df (+) dg). The
// solve reads a copy of the plan: a saved plan would carry the tangent set here, which that
// solve's own second-order node cannot differentiate.
void set_implicit_tangents(const detail::ForwardResult& r, T scores, Opt a, Opt b, Str solver,
                           double cg_tol, int64_t cg_max_iter) {
  const auto& [plan, f, g, steps_used, error] = r;
  const auto acc = f.scalar_type();
  const auto P = plan.to(acc, /*non_blocking=*/false, /*copy=*/true);
  const auto mass = P > 0;
  const auto zero = at::zeros({}, P.options());
  const auto dS = tangent_of(scores);
  const auto PdS = dS.defined() ? at::where(mass, P * dS.to(acc), zero) : at::zeros_like(P);
  auto rhs_f = -PdS.sum(-1), rhs_g = -PdS.sum(-2);
  if (const auto da = tangent_of(a); da.defined()) rhs_f = rhs_f + da.to(acc);
  if (const auto db = tangent_of(b); db.defined()) rhs_g = rhs_g + db.to(acc);
  const auto [unused, df, dg] = detail::call_backward_implicit(
      at::zeros_like(P), rhs_f, rhs_g, P, solver, cg_tol, cg_max_iter);
  auto inner = df.unsqueeze(-1) + dg.unsqueeze(-2);
  if (dS.defined()) inner = inner + dS.to(acc);
  const auto dP = at::where(mass, P * inner, zero);
  plan._set_fw_grad(dP.to(plan.scalar_type()), /*level=*/0, /*is_inplace_op=*/false);
  f._set_fw_grad(df.to(f.scalar_type()), 0, false);
  g._set_fw_grad(dg.to(g.scalar_type()), 0, false);
}

// Saves on the node what the chosen backward needs (after the outputs got their history, and
// their tangents, which a saved output keeps as they are when saved).
template <typename P>
void record_sinkhorn(const P& node, const detail::ForwardResult& r, T scores, Opt a, Opt b,
                     Opt mask, int64_t steps, Str start, Str grad, double cg_tol,
                     int64_t cg_max_iter) {
  const auto& [plan, f, g, steps_used, error] = r;
  node->grad = std::string(grad);
  if (a && b) {
    node->marginals = true;
    node->a_shape = a->sym_sizes().vec();
    node->a_dtype = a->scalar_type();
    node->b_shape = b->sym_sizes().vec();
    node->b_dtype = b->scalar_type();
  }
  if (grad == "unrolled") {
    node->steps = steps;
    node->start = std::string(start);
    node->save(scores);
    node->save_optional(a);
    node->save_optional(b);
    node->save_optional(mask);
    node->save(steps_used);
  } else {
    node->cg_tol = cg_tol;
    node->cg_max_iter = cg_max_iter;
    node->save(plan, /*is_output=*/true);
  }
}

}  // namespace

}  // namespace autograd
}  // namespace sinkhorn_ops

TORCH_LIBRARY_IMPL(sinkhorn_ops, Autograd, m) {
  using namespace sinkhorn_ops::autograd;
  m.impl("sinkhorn", [](T scores, Opt a, Opt b, Opt mask, int64_t steps, Str start, double tol,
                        Str grad, double cg_tol, int64_t cg_max_iter) {
    const std::vector<at::Tensor> inputs{scores, a.value_or(at::Tensor()),
                                         b.value_or(at::Tensor())};
    const bool tangent = has_tangent(inputs);
    if (tangent && grad == "unrolled")
      return unrolled_with_tangents(scores, a, b, mask, steps, start, tol, grad, cg_tol,
                                    cg_max_iter);
    auto node = tangent ? record_node<SinkhornBackward>(inputs)
                        : begin_node<SinkhornBackward>("sinkhorn", inputs);
    auto r = below_autograd([&] {
      return sinkhorn_ops::detail::call_sinkhorn(scores, a, b, mask, steps, start, tol, grad,
                                                 cg_tol, cg_max_iter);
    });
    // Unused outputs get no zero gradient: the backward ops take absent grad_f, grad_g.
    if (node) set_history(node, {std::get<0>(r), std::get<1>(r), std::get<2>(r)});
    if (tangent) set_implicit_tangents(r, scores, a, b, grad, cg_tol, cg_max_iter);
    if (node)
      record_sinkhorn(node, r, scores, a, b, mask, steps, start, grad, cg_tol, cg_max_iter);
    return r;
  });
  m.impl("sinkhorn_backward_unrolled", [](T grad_plan, Opt grad_f, Opt grad_g, T scores, Opt a,
                                          Opt b, Opt mask, T steps_used, int64_t steps,
                                          Str start) {
    return form_backward_kernel<UnrolledForm>(
        "sinkhorn",
        {grad_plan, grad_f.value_or(at::Tensor()), grad_g.value_or(at::Tensor()), scores,
         a.value_or(at::Tensor()), b.value_or(at::Tensor())},
        {mask.value_or(at::Tensor()), steps_used}, {steps, std::string(start)}, [&] {
          return sinkhorn_ops::detail::call_backward_unrolled(grad_plan, grad_f, grad_g, scores,
                                                              a, b, mask, steps_used, steps,
                                                              start);
        });
  });
  m.impl("sinkhorn_backward_implicit", [](T grad_plan, Opt grad_f, Opt grad_g, T plan, Str solver,
                                          double cg_tol, int64_t cg_max_iter) {
    return form_backward_kernel<ImplicitForm>(
        "sinkhorn",
        {grad_plan, grad_f.value_or(at::Tensor()), grad_g.value_or(at::Tensor()), plan}, {},
        {std::string(solver), cg_tol, cg_max_iter}, [&] {
          return sinkhorn_ops::detail::call_backward_implicit(grad_plan, grad_f, grad_g, plan,
                                                              solver, cg_tol, cg_max_iter);
        });
  });
}
