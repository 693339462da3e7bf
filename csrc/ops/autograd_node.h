// The C++ autograd of the operators (sinkhorn_autograd.cpp, mhc_autograd.cpp,
// rms_projection.cpp): each forward operator's Autograd kernel records one node, the way
// PyTorch's own generated kernels do (a torch::autograd::Node with its next edges and saved
// variables, outputs given their history), rather than through torch::autograd::Function. That
// keeps them usable under torch.func's transforms (grad, vjp, jacrev, vmap of those), which
// refuse C++ autograd Functions, and under compiled autograd, through the nodes' compiled_args
// and apply_with_saved. A backward operator's own node differentiates the operator's ATen form
// (differentiate_recomputed), so every operator differentiates twice.
#pragma once

#include <ATen/SavedTensorHooks.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace sinkhorn_ops {
namespace autograd {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::Variable;
using torch::autograd::variable_list;
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::SwapSavedVariables;
using T = const at::Tensor&;
using Opt = const c10::optional<at::Tensor>&;

// How this LibTorch holds nodes: std::shared_ptr<Node> (torch <= 2.11), c10::intrusive_ptr<Node>
// (later).
using NodePtr = decltype(torch::autograd::Edge::function);
constexpr bool kSharedNodes = std::is_same_v<NodePtr, std::shared_ptr<Node>>;

template <typename N>
auto make_node() {
  if constexpr (kSharedNodes) {
    // deleteNode frees long chains without deep recursion; found by argument-dependent lookup,
    // since later versions do not declare it.
    return std::shared_ptr<N>(new N(), [](N* n) { deleteNode(n); });
  } else {
    return c10::make_intrusive<N>();
  }
}

template <typename N>
auto self_ptr(N* n) {
  if constexpr (kSharedNodes) {
    return n->shared_from_this();
  } else {
    return n->getptr();
  }
}

// The optional argument as Node::apply's gradients come: undefined for absent.
inline c10::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// A forward operator's node: the variables it saved (inputs, or outputs after their history is
// set), its name, and compiled autograd's hooks. A subclass (through NodeWith) adds its options
// and its backward, which asks needs_grad(i) whether input i's gradient is wanted.
//
// Compiled autograd (torch._dynamo.compiled_autograd) keys its graph on compiled_args (the saved
// variables and the options) and calls the backward as an opaque function of the incoming
// gradients and packed arguments, as PyTorch's own nodes do: apply_with_saved binds
// functional_apply<N>, which rebuilds the node from [the saved variables' count, the saved
// variables, which inputs need gradients, the options] and runs its apply.
struct OpNode : Node {
  std::vector<SavedVariable> saved_;
  std::vector<bool> saved_is_output_;
  std::vector<bool> needs_;  // the functional form's: which inputs need gradients

  void save(const at::Tensor& t, bool is_output = false) {
    saved_.emplace_back(t, is_output);
    saved_is_output_.push_back(is_output);
  }
  void save_optional(const c10::optional<at::Tensor>& t) { save(t.value_or(at::Tensor())); }

  // The saved variables, unpacked (raises PyTorch's usual error after they were freed).
  variable_list unpack_saved() {
    variable_list out;
    out.reserve(saved_.size());
    for (size_t i = 0; i < saved_.size(); ++i)
      out.push_back(saved_is_output_[i] ? saved_[i].unpack(self_ptr(this)) : saved_[i].unpack());
    return out;
  }

  // The node's backward: its incoming gradients (undefined for an output that got none) and its
  // saved variables, unpacked under the node's lock.
  virtual variable_list backward(variable_list& grads, const variable_list& saved) = 0;

  variable_list apply(variable_list&& grads) final {
    std::lock_guard<std::mutex> lock(mutex_);
    return backward(grads, unpack_saved());
  }

  bool needs_grad(size_t i) const {
    return needs_.empty() ? task_should_compute_output(i) : needs_[i];
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& s : saved_) s.reset_data();
  }

  // The options, in NodeWith.
  virtual void collect_options(CompiledNodeArgs&) const = 0;
  virtual void swap_options(SwapSavedVariables&, bool before) = 0;
  virtual void pack_options(std::vector<c10::IValue>&) const = 0;
  virtual void unpack_options(const std::vector<c10::IValue>&, size_t first) = 0;
  virtual torch::autograd::functional_apply_t functional() const = 0;

  void compiled_args(CompiledNodeArgs& args) const override {
    args.collect(name());
    for (size_t i = 0; i < saved_.size(); ++i) args.collect(saved_[i], saved_is_output_[i]);
    collect_options(args);
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& swap) override {
    swap.before(saved_);
    swap_options(swap, true);
    std::vector<c10::IValue> args{static_cast<int64_t>(saved_.size())};
    for (const auto& t : unpack_saved())
      args.emplace_back(t.defined() ? c10::IValue(t) : c10::IValue());
    std::vector<bool> needs;
    for (size_t i = 0; i < num_outputs(); ++i) needs.push_back(task_should_compute_output(i));
    args.emplace_back(needs);
    pack_options(args);
    std::vector<at::TypePtr> schema;
    for (const auto& v : args) schema.push_back(v.isTensor() ? at::TensorType::get() : v.type());
    const auto& py = torch::dynamo::autograd::getPyCompilerInterface();
    // Bound anew on each trace under a unique name, as a C++ autograd Function's node is (the
    // schema changes with the saved variables and the options).
    const auto fn = py->bind_function(swap.get_py_compiler(), name(), functional(), schema,
                                      /*is_custom_function=*/true, /*is_traceable=*/true);
    const auto metadata = torch::dynamo::autograd::IValuePacker<
        std::vector<std::optional<torch::autograd::InputMetadata>>>::
        pack(torch::dynamo::autograd::get_input_metadata(next_edges()));
    auto out = py->call_function(swap.get_py_compiler(), "apply_functional", fn, grads, args,
                                 metadata);
    swap.after(saved_);
    swap_options(swap, false);
    return out;
  }
};

// The functional form of node N (see OpNode).
template <typename N>
variable_list functional_apply(const variable_list& grads, const std::vector<c10::IValue>& args) {
  auto node = make_node<N>();
  const auto count = static_cast<size_t>(args[0].toInt());
  {
    // Saved without the saved-tensor hooks active during the backward (those of the forward
    // already ran), as SwapSavedVariables saves its proxies.
    const bool prior = at::SavedTensorDefaultHooks::set_tracing(true);
    for (size_t i = 1; i <= count; ++i)
      node->save(args[i].isNone() ? at::Tensor() : args[i].toTensor());
    at::SavedTensorDefaultHooks::set_tracing(prior);
  }
  for (const auto b : args[count + 1].toBoolList()) node->needs_.push_back(b);
  node->unpack_options(args, count + 2);
  return node->apply(variable_list(grads));
}

// The base of node N, whose options are listed once, by `template <typename S> static auto
// options(S& self) { return std::tie(self.a, self.b); }` (ints, doubles, bools, strings, dtypes,
// symbolic shapes): compiled autograd's key, swaps and packing follow that list.
template <typename N>
struct NodeWith : OpNode {
  // A node without options.
  template <typename S>
  static auto options(S&) {
    return std::tuple<>();
  }

  void collect_options(CompiledNodeArgs& args) const override {
    std::apply([&](const auto&... o) { (args.collect(o), ...); },
               N::options(static_cast<const N&>(*this)));
  }
  void swap_options(SwapSavedVariables& swap, bool before) override {
    std::apply([&](auto&... o) { ((before ? swap.before(o) : swap.after(o)), ...); },
               N::options(static_cast<N&>(*this)));
  }
  void pack_options(std::vector<c10::IValue>& args) const override {
    std::apply(
        [&](const auto&... o) {
          (args.push_back(
               torch::dynamo::autograd::IValuePacker<std::decay_t<decltype(o)>>::pack(o)),
           ...);
        },
        N::options(static_cast<const N&>(*this)));
  }
  void unpack_options(const std::vector<c10::IValue>& args, size_t i) override {
    std::apply(
        [&](auto&... o) {
          ((o = torch::dynamo::autograd::IValuePacker<std::decay_t<decltype(o)>>::unpack(
                args[i++])),
           ...);
        },
        N::options(static_cast<N&>(*this)));
  }
  torch::autograd::functional_apply_t functional() const override {
    return &functional_apply<N>;
  }
};

// The safety net of begin_node: every operator handles forward-mode tangents before it records
// a node (its ATen form, or a clear error); one that reached here would raise rather than drop
// them.
inline void check_no_tangents(const char* op, const std::vector<at::Tensor>& args) {
  for (const auto& t : args) {
    TORCH_CHECK_NOT_IMPLEMENTED(!torch::autograd::isFwGradDefined(t), op,
                                ": forward-mode AD (torch.autograd.forward_ad, torch.func.jvp, "
                                "jacfwd) is not supported; use reverse mode (backward, "
                                "torch.func.grad, vjp, jacrev)");
  }
}

// Whether a call on `inputs` is recorded by reverse mode: grad mode on and an input that
// requires grad.
inline bool records_history(const std::vector<at::Tensor>& inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

// Whether an input carries a forward-mode tangent.
inline bool has_tangent(const std::vector<at::Tensor>& inputs) {
  for (const auto& t : inputs)
    if (t.defined() && torch::autograd::isFwGradDefined(t)) return true;
  return false;
}

// The node of a call whose differentiable inputs are `inputs` (their order is the order of the
// gradients the node's apply returns; undefined ones get no edge), or null when nothing is
// recorded (grad mode off, or no input requires grad). For an operator that sets its outputs'
// forward-mode tangents itself.
template <typename N>
auto record_node(const std::vector<at::Tensor>& inputs) {
  decltype(make_node<N>()) node;
  if (!records_history(inputs)) return node;
  node = make_node<N>();
  torch::autograd::edge_list edges;
  edges.reserve(inputs.size());
  for (const auto& t : inputs)
    edges.push_back(t.defined() ? torch::autograd::impl::gradient_edge(t)
                                : torch::autograd::Edge());
  node->set_next_edges(std::move(edges));
  return node;
}

// record_node for an operator that handles no forward-mode tangent (its check first).
template <typename N>
auto begin_node(const char* op, const std::vector<at::Tensor>& inputs) {
  check_no_tangents(op, inputs);
  return record_node<N>(inputs);
}

// Gives the differentiable outputs their history (in the order of the node's incoming
// gradients); an undefined output takes a slot.
template <typename P>
void set_history(const P& node, std::initializer_list<at::Tensor> outputs) {
  for (const auto& t : outputs) torch::autograd::set_history(t, node);
}

// The result of fn() computed below the Autograd key (the operators' own kernels).
template <typename F>
auto below_autograd(F&& fn) {
  at::AutoDispatchBelowADInplaceOrView below;
  return fn();
}

}  // namespace autograd
}  // namespace sinkhorn_ops

namespace at {
namespace functorch {
// ATen/functorch/DynamicLayer.h, whose includes need headers the wheels do not ship: the value
// of a torch.func wrapper whose level has ended, else the tensor.
TORCH_API Tensor unwrapIfDead(const Tensor& tensor);
}  // namespace functorch
}  // namespace at

namespace sinkhorn_ops {
namespace autograd {

// A saved tensor without the wrappers of torch.func levels that have ended (a vjp_fn runs after
// its vjp returned): computing on such a wrapper computes on its value, untracked.
inline at::Tensor without_dead_levels(at::Tensor t) {
  for (auto u = at::functorch::unwrapIfDead(t); !u.is_same(t); u = at::functorch::unwrapIfDead(t))
    t = u;
  return t;
}

// The backward of a node whose operator has a differentiable ATen form: `recompute(args)`
// returns the operator's outputs from its tensor arguments `args` (the first n_diff of which are
// the node's inputs, in its edges' order). The form is rebuilt with grad mode on and
// differentiated by a reentrant torch::autograd::grad, as reentrant checkpointing does, with
// respect to fresh handles on the arguments: detached leaves, or with create_graph (grad mode on
// here) views of the arguments that require grad, so that the gradients stay differentiable.
// (Not the arguments themselves: a gradient with respect to the scores would then also count
// the paths through grad_plan's own history to them, which the engine adds again.)
template <typename N, typename F>
variable_list differentiate_recomputed(const N& node, const variable_list& grads,
                                       const variable_list& args, size_t n_diff, F&& recompute) {
  variable_list x, wrt;
  for (const auto& a : args) x.push_back(a.defined() ? without_dead_levels(a) : a);
  // A saved argument still batched by a live vmap, or carrying a live jvp's tangent (the
  // node was recorded inside a transform that has ended, under one still running): autograd
  // does not see through those levels from here, and the result would silently drop them.
  for (size_t i = 0; i < n_diff; ++i) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        !x[i].defined() || !(x[i].key_set().has(c10::DispatchKey::FuncTorchBatched) ||
                             torch::autograd::isFwGradDefined(x[i])),
        node.name(), ": this second derivative needs the node's saved inputs through a vmap or "
        "jvp that is still running around a transform that has ended (for example vmap or "
        "jacfwd around jacrev(jacrev(f)) or jacrev(grad(f)), or a jvp of a vjp_fn); use "
        "vmap(hessian(f)) (forward over reverse, for operators with forward-mode AD) or loop "
        "over the batch");
  }
  // create_graph only when something it would reach is tracked: else the gradients would carry
  // a graph back to the detached copies alone.
  bool tracked = false;
  for (const auto& t : x) tracked = tracked || (t.defined() && t.requires_grad());
  for (const auto& t : grads) tracked = tracked || (t.defined() && t.requires_grad());
  const bool create = at::GradMode::is_enabled() && tracked;
  std::vector<size_t> wrt_index;
  for (size_t i = 0; i < n_diff; ++i) {
    if (!x[i].defined() || !node.needs_grad(i)) continue;
    x[i] = create && x[i].requires_grad() ? x[i].view_as(x[i])
                                          : x[i].detach().requires_grad_(true);
    wrt.push_back(x[i]);
    wrt_index.push_back(i);
  }
  variable_list result(n_diff);
  if (wrt.empty()) return result;
  variable_list outs;
  {
    at::AutoGradMode on(true);
    outs = recompute(x);
  }
  variable_list ys, gys;
  for (size_t j = 0; j < outs.size() && j < grads.size(); ++j) {
    if (grads[j].defined() && outs[j].defined() && outs[j].requires_grad()) {
      ys.push_back(outs[j]);
      gys.push_back(grads[j]);
    }
  }
  if (ys.empty()) return result;
  const auto g = torch::autograd::grad(ys, wrt, gys, /*retain_graph=*/create,
                                       /*create_graph=*/create, /*allow_unused=*/true);
  for (size_t k = 0; k < wrt_index.size(); ++k) result[wrt_index[k]] = g[k];
  return result;
}

// A tensor or a tuple of them, as a list.
inline variable_list as_list(const at::Tensor& t) { return {t}; }
template <typename... R>
variable_list as_list(const std::tuple<R...>& t) {
  return std::apply([](const auto&... x) { return variable_list{x...}; }, t);
}

}  // namespace autograd
}  // namespace sinkhorn_ops
