// Front door of the unrolled backward: it replays the forward's front door (masking, log
// marginals), checks the upstream gradients, and turns d(log a) into d a for the caller.
#include "sinkhorn_backward.h"

#include <algorithm>
#include <limits>

#include "safe_div.h"

namespace sinkhorn_ops {
namespace detail {
namespace {

at::Tensor flat_grad(const c10::optional<at::Tensor>& g, const char* name,
                     at::IntArrayRef expected, const at::Tensor& like, int64_t B, int64_t len) {
  if (!g.has_value() || !g->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(g->sizes() == expected, "sinkhorn_backward: expected ", name, " of shape ",
                    expected, ", got ", g->sizes());
  TORCH_CHECK_VALUE(g->device() == like.device(), "sinkhorn_backward: expected ", name, " on ",
                    like.device(), ", got ", g->device());
  return g->to(accumulation_type(like.scalar_type())).reshape({B, len}).contiguous();
}

// d a = d(log a) / a, broadcast shape; an a_i of 0 (an empty row's mass) gets 0, not inf (nor
// NaN in the derivative of this division, for the differentiable backward).
at::Tensor to_linear(const at::Tensor& grad_log, const at::Tensor& x, at::IntArrayRef shape) {
  if (!x.defined()) return at::empty({0}, grad_log.options());
  const auto g = grad_log.reshape(shape);
  const auto xv = x.to(g.scalar_type()).expand(shape);
  return safe_div(g, xv);
}

}  // namespace

bool readable_on_host(const at::Tensor& t) {
  // On CUDA a read would be a host synchronisation, and a fake (Python key), functional or
  // torch.func-wrapped tensor has no data to read here (the wrappers' headers are not usable
  // from an extension: they need nlohmann/json).
  static const c10::DispatchKeySet opaque({c10::DispatchKey::Python,
                                           c10::DispatchKey::Functionalize,
                                           c10::DispatchKey::FuncTorchBatched,
                                           c10::DispatchKey::FuncTorchGradWrapper});
  return t.defined() && t.device().is_cpu() && !t.key_set().has_any(opaque);
}

int64_t steps_bound(const at::Tensor& steps_used, int64_t cap) {
  const at::Tensor& t = steps_used;
  if (cap <= 0 || !readable_on_host(t) || t.scalar_type() != at::kLong) return cap;
  const auto used = t.contiguous();
  const int64_t* d = used.const_data_ptr<int64_t>();
  // At least a row and a column step (an empty batch, or one that ran none): the replay's
  // potentials then depend on the scores, so that forward mode gives them (zero) tangents.
  int64_t bound = std::min<int64_t>(cap, 2);
  for (int64_t i = 0; i < used.numel(); ++i)
    bound = std::max(bound, std::min(std::max<int64_t>(d[i], 0), cap));
  return bound;
}

bool step_records_fit(const ForwardProblem& f) {
  const int64_t side = std::max<int64_t>({f.n, f.m, 1});
  return f.B == 0 || f.steps <= std::numeric_limits<int64_t>::max() / 8 / side / f.B;
}

BackwardProblem prepare_backward(const at::Tensor& grad_plan, const c10::optional<at::Tensor>& grad_f,
                                 const c10::optional<at::Tensor>& grad_g, const at::Tensor& scores,
                                 const c10::optional<at::Tensor>& a,
                                 const c10::optional<at::Tensor>& b,
                                 const c10::optional<at::Tensor>& mask,
                                 const at::Tensor& steps_used, int64_t steps,
                                 c10::string_view start) {
  BackwardProblem p;
  p.fwd = prepare_forward(scores, a, b, mask, steps, start, 0.0);
  const auto& f = p.fwd;
  TORCH_CHECK_VALUE(grad_plan.sizes() == scores.sizes(), "sinkhorn_backward: expected grad_plan of shape ",
                    scores.sizes(), ", got ", grad_plan.sizes());
  TORCH_CHECK_VALUE(grad_plan.device() == scores.device(), "sinkhorn_backward: expected grad_plan on ",
                    scores.device(), ", got ", grad_plan.device());
  p.grad_plan = grad_plan.to(scores.scalar_type()).reshape({f.B, f.n, f.m}).contiguous();
  std::vector<int64_t> fs(f.batch_shape), gs(f.batch_shape);
  fs.push_back(f.n);
  gs.push_back(f.m);
  p.grad_f = flat_grad(grad_f, "grad_f", fs, scores, f.B, f.n);
  p.grad_g = flat_grad(grad_g, "grad_g", gs, scores, f.B, f.m);
  TORCH_CHECK_VALUE(steps_used.device() == scores.device(),
                    "sinkhorn_backward: expected steps_used on ", scores.device(), ", got ",
                    steps_used.device());
  TORCH_CHECK_VALUE(steps_used.sizes() == at::IntArrayRef(f.batch_shape) &&
                        steps_used.scalar_type() == at::kLong,
                    "sinkhorn_backward: expected steps_used of shape ", at::IntArrayRef(f.batch_shape),
                    " and dtype int64, got ", steps_used.sizes(), " ", steps_used.scalar_type());
  p.steps_used = steps_used.reshape({f.B}).contiguous();
  // The steps run bound the work, not the cap `steps` (a tol run stops early), where they can
  // be read; on CUDA the cap sizes the LSE records: B * steps * max(n, m) values, which must fit.
  p.fwd.steps = steps_bound(p.steps_used, f.steps);
  TORCH_CHECK_VALUE(step_records_fit(f),
                    "sinkhorn_backward: the unrolled backward keeps every step's LSEs, batch ",
                    f.B, " x steps ", f.steps, " x max(n, m) ", std::max<int64_t>({f.n, f.m, 1}),
                    " values, which overflows a 64-bit byte count; expected a smaller `steps` "
                    "(with tol it is the cap, and on CUDA it sizes the backward's memory)");
  if (a.has_value()) {
    p.a = *a;
    p.b = *b;
  }
  return p;
}

BackwardOutputs allocate_backward(const BackwardProblem& p) {
  const auto& f = p.fwd;
  const auto acc = f.scores.options().dtype(accumulation_type(f.scores.scalar_type()));
  return {at::empty({f.B, f.n, f.m}, f.scores.options()), at::empty({f.B, f.n}, acc),
          at::empty({f.B, f.m}, acc)};
}

sinkhorn::BwdParams backward_params(const BackwardProblem& p, BackwardOutputs& out) {
  const auto& f = p.fwd;
  sinkhorn::BwdParams q;
  q.scores = f.scores.data_ptr();
  q.log_a = f.log_a.defined() ? f.log_a.data_ptr() : nullptr;
  q.log_b = f.log_b.defined() ? f.log_b.data_ptr() : nullptr;
  q.grad_plan = p.grad_plan.data_ptr();
  q.grad_f = p.grad_f.defined() ? p.grad_f.data_ptr() : nullptr;
  q.grad_g = p.grad_g.defined() ? p.grad_g.data_ptr() : nullptr;
  q.steps_used = p.steps_used.data_ptr<int64_t>();
  q.grad_scores = out.grad_scores.data_ptr();
  q.grad_log_a = out.grad_log_a.data_ptr();
  q.grad_log_b = out.grad_log_b.data_ptr();
  q.B = f.B;
  q.n = f.n;
  q.m = f.m;
  q.max_steps = f.steps;
  q.start_row = f.start_row;
  q.dtype = kernel_dtype(f.scores.scalar_type());
  return q;
}

BackwardResult finish_backward(const BackwardProblem& p, BackwardOutputs& out) {
  const auto& f = p.fwd;
  std::vector<int64_t> s(f.batch_shape), fs(f.batch_shape), gs(f.batch_shape);
  s.push_back(f.n);
  s.push_back(f.m);
  fs.push_back(f.n);
  gs.push_back(f.m);
  return {out.grad_scores.view(s), to_linear(out.grad_log_a, p.a, fs),
          to_linear(out.grad_log_b, p.b, gs)};
}

}  // namespace detail
}  // namespace sinkhorn_ops
