// Front door of the forward operator: the checks every device shares, the flattening of batch
// dimensions, and the conversion of marginals to log space in the accumulation dtype.
#include "sinkhorn_forward.h"

#include <cmath>
#include <limits>
#include <sstream>
#include <string>

namespace sinkhorn_ops {
namespace detail {
namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

// A marginal must be exactly `expected` in shape (the Python wrapper broadcasts), in the
// scores dtype or the accumulation dtype, on the scores' device. Returns its log, flattened.
at::Tensor log_marginal(const at::Tensor& x, const char* name, at::IntArrayRef expected,
                        const at::Tensor& scores, int64_t B, int64_t len) {
  const auto acc = accumulation_type(scores.scalar_type());
  check_marginal_dtype(x, name, scores.scalar_type());
  TORCH_CHECK_VALUE(x.device() == scores.device(), "sinkhorn: expected ", name,
                    " on the scores' device ", scores.device(), ", got ", x.device());
  TORCH_CHECK_VALUE(x.dim() >= 1 && at::is_expandable_to(x.sizes(), expected),
                    "sinkhorn: expected ", name, " of shape (..., ", expected.back(),
                    ") broadcastable to ", shape_str(expected), ", got ", shape_str(x.sizes()));
  return x.to(acc).log().expand(expected).reshape({B, len}).contiguous();
}

}  // namespace

void check_marginal_dtype(const at::Tensor& x, const char* name, at::ScalarType scores) {
  const auto acc = accumulation_type(scores);
  TORCH_CHECK_TYPE(x.scalar_type() == scores || x.scalar_type() == acc, "sinkhorn: expected ",
                   name, " of dtype ", scores,
                   acc == scores
                       ? std::string(" (the scores dtype)")
                       : c10::str(" or ", acc, " (the scores dtype or its accumulation dtype)"),
                   ", got ", x.scalar_type());
}

sinkhorn::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return sinkhorn::DType::Float32;
    case at::kDouble: return sinkhorn::DType::Float64;
    case at::kHalf: return sinkhorn::DType::Float16;
    case at::kBFloat16: return sinkhorn::DType::BFloat16;
    default: TORCH_CHECK_TYPE(false, "sinkhorn: expected scores of dtype float32, float64, float16 or bfloat16, got ", t);
  }
}

at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

ForwardProblem prepare_forward(const at::Tensor& scores, const c10::optional<at::Tensor>& a,
                               const c10::optional<at::Tensor>& b,
                               const c10::optional<at::Tensor>& mask, int64_t steps,
                               c10::string_view start, double tol) {
  TORCH_CHECK_VALUE(scores.dim() >= 2,
                    "sinkhorn: expected scores with at least 2 dimensions (..., n, m), got ",
                    scores.dim(), " dimension(s) of shape ", shape_str(scores.sizes()));
  kernel_dtype(scores.scalar_type());
  TORCH_CHECK_VALUE(steps >= 0, "sinkhorn: expected steps >= 0, got ", steps);
  TORCH_CHECK_VALUE(std::isfinite(tol) && tol >= 0, "sinkhorn: expected a finite tol >= 0, got ",
                    tol);
  TORCH_CHECK_VALUE(start == "row" || start == "col",
                    "sinkhorn: expected start \"row\" or \"col\", got \"", std::string(start),
                    "\"");
  TORCH_CHECK_VALUE(a.has_value() == b.has_value(),
                    "sinkhorn: expected both marginals a and b or neither (defaults), got only ",
                    a.has_value() ? "a" : "b");

  ForwardProblem p;
  const auto sizes = scores.sizes();
  p.batch_shape.assign(sizes.begin(), sizes.end() - 2);
  p.n = sizes[sizes.size() - 2];
  p.m = sizes[sizes.size() - 1];
  p.B = c10::multiply_integers(p.batch_shape);
  p.steps = steps;
  p.start_row = (start == "row");
  p.tol = tol;
  at::Tensor s = scores;
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool,
                     "sinkhorn: expected mask of dtype torch.bool (True = keep), got ",
                     mask->scalar_type(), "; add a float mask to the scores instead");
    TORCH_CHECK_VALUE(mask->device() == scores.device(),
                      "sinkhorn: expected mask on the scores' device ", scores.device(), ", got ",
                      mask->device());
    TORCH_CHECK_VALUE(at::is_expandable_to(mask->sizes(), sizes),
                      "sinkhorn: expected mask broadcastable to the scores' shape ",
                      shape_str(sizes), ", got ", shape_str(mask->sizes()));
    // A masked entry is S = -inf (MATH.md section 1); the kernels treat -inf as masked.
    s = scores.masked_fill(mask->logical_not(), -std::numeric_limits<double>::infinity());
  }
  p.scores = s.reshape({p.B, p.n, p.m}).contiguous();
  if (a.has_value()) {
    std::vector<int64_t> sa(p.batch_shape), sb(p.batch_shape);
    sa.push_back(p.n);
    sb.push_back(p.m);
    p.log_a = log_marginal(*a, "a", sa, scores, p.B, p.n);
    p.log_b = log_marginal(*b, "b", sb, scores, p.B, p.m);
  }
  return p;
}

void check_grad_options(c10::string_view grad, double cg_tol, int64_t cg_max_iter) {
  TORCH_CHECK_VALUE(grad == "unrolled" || grad == "implicit" || grad == "implicit_dense" ||
                        grad == "implicit_cg",
                    "sinkhorn: expected grad \"unrolled\", \"implicit\", \"implicit_dense\" or "
                    "\"implicit_cg\", got \"", std::string(grad), "\"");
  TORCH_CHECK_VALUE(std::isfinite(cg_tol) && cg_tol >= 0,
                    "sinkhorn: expected a finite cg_tol >= 0, got ", cg_tol);
  TORCH_CHECK_VALUE(cg_max_iter >= 1, "sinkhorn: expected cg_max_iter >= 1, got ", cg_max_iter);
}

ForwardOutputs allocate_forward(const ForwardProblem& p) {
  const auto acc_opts = p.scores.options().dtype(accumulation_type(p.scores.scalar_type()));
  ForwardOutputs out;
  out.plan = at::empty({p.B, p.n, p.m}, p.scores.options());
  out.f = at::empty({p.B, p.n}, acc_opts);
  out.g = at::empty({p.B, p.m}, acc_opts);
  out.steps_used = at::empty({p.B}, p.scores.options().dtype(at::kLong));
  out.error = at::empty({p.B}, acc_opts);
  return out;
}

sinkhorn::FwdParams forward_params(const ForwardProblem& p, ForwardOutputs& out) {
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; };
  sinkhorn::FwdParams params;
  params.scores = p.scores.data_ptr();
  params.log_a = ptr(p.log_a);
  params.log_b = ptr(p.log_b);
  params.plan = ptr(out.plan);
  params.f = ptr(out.f);
  params.g = ptr(out.g);
  params.steps_used = static_cast<int64_t*>(ptr(out.steps_used));
  params.error = ptr(out.error);
  params.B = p.B;
  params.n = p.n;
  params.m = p.m;
  params.steps = p.steps;
  params.start_row = p.start_row;
  params.tol = p.tol;
  params.dtype = kernel_dtype(p.scores.scalar_type());
  return params;
}

ForwardResult finish_forward(const ForwardProblem& p, ForwardOutputs& out) {
  std::vector<int64_t> plan_shape(p.batch_shape), f_shape(p.batch_shape), g_shape(p.batch_shape);
  plan_shape.push_back(p.n);
  plan_shape.push_back(p.m);
  f_shape.push_back(p.n);
  g_shape.push_back(p.m);
  return {out.plan.view(plan_shape), out.f.view(f_shape), out.g.view(g_shape),
          out.steps_used.view(p.batch_shape), out.error.view(p.batch_shape)};
}

}  // namespace detail
}  // namespace sinkhorn_ops
