// Second order and forward mode of a backward operator through its differentiable ATen form
// (autograd_node.h): the operator runs its fused kernel, and a call whose result is recorded
// (create_graph, torch.func's nested transforms) records a FormNode, which recomputes the form
// and differentiates it only if its own backward ever runs. A call with a forward-mode tangent
// (jacfwd of jacrev, torch.func.hessian) computes the form itself, which carries the tangents.
//
// A Form (sinkhorn_autograd.cpp, mhc_backward_forms.h) is a struct with
//   Options, and `template <typename O> static auto tie(O& o)` listing them (NodeWith's options);
//   kName, the node's name;
//   kDiff, the count of differentiable arguments (the first ones);
//   `static variable_list form(const variable_list& args, const Options&)`, the operator's
//     outputs as differentiable ATen ops of its tensor arguments, in its return layout, with
//     forward-mode tangents carried through (forms::tracked keeps them).
#pragma once

#include <tuple>
#include <utility>

#include "autograd_node.h"

namespace sinkhorn_ops {
namespace autograd {

// The node of a backward operator's result: gradients of its differentiable arguments (the
// first Form::kDiff saved variables) from those of its outputs. Saved: every tensor argument.
template <typename Form>
struct FormNode : NodeWith<FormNode<Form>> {
  typename Form::Options o;
  template <typename S>
  static auto options(S& n) {
    return Form::tie(n.o);
  }
  std::string name() const override { return Form::kName; }
  variable_list backward(variable_list& grads, const variable_list& s) override {
    return differentiate_recomputed(*this, grads, s, Form::kDiff,
                                    [&](const variable_list& x) { return Form::form(x, o); });
  }
};

// A list of tensors as R: a tensor, or a tuple of them.
template <typename R>
struct FromList;
template <>
struct FromList<at::Tensor> {
  static at::Tensor get(const variable_list& v) { return v.at(0); }
};
template <typename... Ts>
struct FromList<std::tuple<Ts...>> {
  static std::tuple<Ts...> get(const variable_list& v) {
    TORCH_INTERNAL_ASSERT(v.size() == sizeof...(Ts));
    return get(v, std::index_sequence_for<Ts...>{});
  }
  template <size_t... I>
  static std::tuple<Ts...> get(const variable_list& v, std::index_sequence<I...>) {
    return std::tuple<Ts...>(v[I]...);
  }
};

// The Autograd kernel of a backward operator with a Form: `run()` (its fused kernel) below
// autograd, and a FormNode when its result is recorded. With a forward-mode tangent on a
// differentiable argument, the form's result instead, after the kernel's run for its checks
// (through the dispatcher: under torch.func the arguments here can be wrappers that only the
// dispatcher reads). diff: the differentiable arguments (the node's inputs, undefined for an
// absent optional); rest: the other tensor arguments the form needs (saved after diff).
template <typename Form, typename Run>
auto form_backward_kernel(const char* op, const variable_list& diff, const variable_list& rest,
                          const typename Form::Options& o, Run&& run) {
  using R = std::decay_t<decltype(run())>;
  TORCH_INTERNAL_ASSERT(diff.size() == Form::kDiff);
  variable_list args(diff);
  args.insert(args.end(), rest.begin(), rest.end());
  if (has_tangent(diff)) {
    below_autograd(run);
    return FromList<R>::get(Form::form(args, o));
  }
  auto node = begin_node<FormNode<Form>>(op, diff);
  R r = below_autograd(run);
  if (node) {
    node->o = o;
    for (const auto& t : args) node->save(t);
    for (const auto& t : as_list(r))
      if (!t.defined() || at::isFloatingType(t.scalar_type()))
        torch::autograd::set_history(t, node);
  }
  return r;
}

}  // namespace autograd
}  // namespace sinkhorn_ops
