// Pieces shared by the C++ autograd registrations (sinkhorn_autograd.cpp, mhc_autograd.cpp): a
// backward operator as an autograd node of its own whose backward is the double-backward error.
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/custom_function.h>

#include <tuple>
#include <type_traits>
#include <utility>

namespace sinkhorn_ops {
namespace detail {

// Whether a call with these tensor arguments records an autograd node (what Function::apply
// decides): grad mode on and one of them requiring grad. Asked before apply (a forward runs with
// grad mode off); without a node a forward saves nothing (no size of an input read under
// torch.compile either). The call still goes through Function::apply, which raises for
// forward-mode AD rather than dropping the tangent.
inline bool any_requires_grad() { return false; }
template <typename... Rest>
bool any_requires_grad(const at::Tensor& t, const Rest&... rest);
template <typename... Rest>
bool any_requires_grad(const c10::optional<at::Tensor>& t, const Rest&... rest) {
  return (t.has_value() && t->defined() && t->requires_grad()) || any_requires_grad(rest...);
}
template <typename... Rest>
bool any_requires_grad(const at::Tensor& t, const Rest&... rest) {
  return (t.defined() && t.requires_grad()) || any_requires_grad(rest...);
}
template <typename... Tensors>
bool records_graph(const Tensors&... t) {
  return c10::GradMode::is_enabled() && any_requires_grad(t...);
}

inline torch::autograd::variable_list as_list(const at::Tensor& t) { return {t}; }
template <typename... T>
torch::autograd::variable_list as_list(const std::tuple<T...>& t) {
  return std::apply([](const auto&... x) { return torch::autograd::variable_list{x...}; }, t);
}

// A backward operator: Op::call(args...) runs below autograd; differentiating its result raises
// NotImplementedError naming the forward operator Op::name.
template <typename Op>
struct BackwardNode : torch::autograd::Function<BackwardNode<Op>> {
  template <typename... Args>
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext*,
                                                const Args&... args) {
    at::AutoDispatchBelowADInplaceOrView below;
    return as_list(Op::call(args...));
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 const torch::autograd::variable_list&) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, Op::name,
                                ": double backward (differentiating the gradient) is not "
                                "supported; compute second-order terms by finite differences of "
                                "the gradient instead");
  }
};

// The Autograd kernel of a backward operator: Op::call's result (a tensor or a tuple of them),
// recorded as a BackwardNode when grad mode is on and an argument requires grad.
template <typename R, size_t... I>
R to_tuple(const torch::autograd::variable_list& v, std::index_sequence<I...>) {
  return R(v[I]...);
}
template <typename Op, typename... Args>
auto backward_kernel(const Args&... args) {
  using R = decltype(Op::call(args...));
  const auto r = BackwardNode<Op>::apply(args...);
  if constexpr (std::is_same_v<R, at::Tensor>) {
    return r[0];
  } else {
    return to_tuple<R>(r, std::make_index_sequence<std::tuple_size_v<R>>{});
  }
}

}  // namespace detail

// The autograd registrations' classes (sinkhorn_autograd.cpp, mhc_autograd.cpp) live here, named
// rather than anonymous, so that a grad_fn reads e.g.
// torch::autograd::CppNode<sinkhorn_ops::autograd::Sinkhorn>.
namespace autograd {
using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;
using T = const at::Tensor&;
}  // namespace autograd
}  // namespace sinkhorn_ops
