// Warm starts (MATH.md section 1: "start from f = g = 0 (or a warm start)"):
// sinkhorn_ops::sinkhorn_warm, the operator's run from the potentials (f0, g0) instead of zeros,
// for the C++ API (SinkhornOptions::f0, g0) and the Python function (init=).
//
// The steps from (f0, g0) on S are the steps from zeros on S' = S + f0 (+) g0 with f0 and g0
// added back: a row step's LSE over S + g is the LSE over S' + (g - g0) less f0_i, which the
// new potential subtracts back; likewise for columns; the plan, the stopping test and the error
// are the same. So this is the operator on S' (a copy of S in the accumulation dtype, which the
// unrolled backward saves in place of S) and a few ATen ops, registered as
// CompositeImplicitAutograd: autograd (including the gradients of f0 and g0), torch.compile,
// vmap and the fake kernels come from the ops it is made of.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "sinkhorn_backward.h"

namespace sinkhorn_ops {
namespace detail {
namespace {

using Opt = c10::optional<at::Tensor>;

bool is_scores_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// f0 or g0: floating, on the scores' device, broadcastable to `full`; in the accumulation dtype.
at::Tensor initial_potential(const at::Tensor& x, const char* name, at::IntArrayRef full,
                             const at::Tensor& scores, at::ScalarType acc) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "sinkhorn: expected init's ", name,
                   " of a floating dtype, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == scores.device(), "sinkhorn: expected init's ", name,
                    " on the scores' device ", scores.device(), ", got ", x.device());
  TORCH_CHECK_VALUE(at::is_expandable_to(x.sizes(), full), "sinkhorn: expected init's ", name,
                    " broadcastable to ", full, ", got ", x.sizes());
  return x.to(acc);
}

ForwardResult sinkhorn_warm(const at::Tensor& scores, const Opt& a, const Opt& b,
                            const Opt& mask, const Opt& f0, const Opt& g0, int64_t steps,
                            c10::string_view start, double tol, c10::string_view grad,
                            double cg_tol, int64_t cg_max_iter) {
  if (!is_scores_dtype(scores.scalar_type()) || scores.dim() < 2) {
    // The operator's own message, before any conversion could hide the problem.
    return call_sinkhorn(scores, a, b, mask, steps, start, tol, grad, cg_tol, cg_max_iter);
  }
  const at::ScalarType acc = accumulation_type(scores.scalar_type());
  for (const auto& [name, x] : {std::make_pair("a", a), std::make_pair("b", b)}) {
    // The operator's dtype rule, checked on the marginals as they came: it sees S' in acc.
    if (x) check_marginal_dtype(*x, name, scores.scalar_type());
  }
  const auto sizes = scores.sizes();
  std::vector<int64_t> rows(sizes.begin(), sizes.end() - 1), cols(sizes.begin(), sizes.end() - 2);
  cols.push_back(sizes.back());
  at::Tensor shifted = scores.to(acc), f_init, g_init;
  if (f0 && f0->defined()) {
    f_init = initial_potential(*f0, "f0", rows, scores, acc);
    shifted = shifted + f_init.unsqueeze(-1);
  }
  if (g0 && g0->defined()) {
    g_init = initial_potential(*g0, "g0", cols, scores, acc);
    shifted = shifted + g_init.unsqueeze(-2);
  }
  // Marginals in the scores' dtype follow the scores to the accumulation dtype.
  auto follow = [&](const Opt& x) -> Opt {
    return x && x->defined() && x->scalar_type() == scores.scalar_type() ? Opt(x->to(acc)) : x;
  };
  auto [plan, f, g, used, error] =
      call_sinkhorn(shifted, follow(a), follow(b), mask, steps, start, tol, grad, cg_tol,
                    cg_max_iter);
  // An empty line (every entry masked) gets potential 0 from a step, as in a run from zeros
  // (where the operator gave 0: a problem with NaN or +inf scores keeps its NaN); one whose axis
  // took no step keeps its initial potential.
  at::Tensor empty = at::isneginf(shifted);
  if (mask && mask->defined()) empty = empty.logical_or(mask->logical_not());
  const bool row_first = start == "row";
  if (f_init.defined()) {
    const at::Tensor zeroed = used.ge(row_first ? 1 : 2).unsqueeze(-1).logical_and(
        empty.all(-1).logical_and(f.eq(0)));
    f = at::where(zeroed, at::zeros_like(f), f + f_init);
  }
  if (g_init.defined()) {
    const at::Tensor zeroed = used.ge(row_first ? 2 : 1).unsqueeze(-1).logical_and(
        empty.all(-2).logical_and(g.eq(0)));
    g = at::where(zeroed, at::zeros_like(g), g + g_init);
  }
  return {plan.to(scores.scalar_type()), f, g, used, error};
}

}  // namespace
}  // namespace detail
}  // namespace sinkhorn_ops

TORCH_LIBRARY_IMPL(sinkhorn_ops, CompositeImplicitAutograd, m) {
  m.impl("sinkhorn_warm", &sinkhorn_ops::detail::sinkhorn_warm);
}
