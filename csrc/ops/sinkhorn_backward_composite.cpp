// The unrolled backward (MATH.md section 2.1) composed of ATen ops, every step a few kernels over
// the whole device. The CUDA glue takes it for large problems (n * m >= 2^20), where the block
// kernel would give a whole problem to one SM; being device-agnostic, it also runs on the CPU,
// where the tests check it against the CPU kernel (SINKHORN_CPU_BACKWARD=composite).
//
// Same algorithm as the kernels: replay the steps, keeping each step's LSEs, then reverse them.
// On CUDA the replay runs on the large forward path when that path takes the problem (its LSEs
// passed in as `history`), else here. Problems that ran fewer steps (steps_used) are frozen in
// the replay and inactive in the reverse, by masks on the device: no host synchronisation. A
// reverse step is two fused kernels on CUDA (large_backward.cu: the pass over S and dS, then the
// step's bookkeeping), else 6 ATen passes over n x m, in place on one temporary, and a few vector
// ops. uf, ug, dla and dlb are fresh contiguous tensors here, which the kernels update in place.
#include <algorithm>
#include <limits>
#include <vector>

#include "../env_flag.h"
#include "sinkhorn_backward.h"

namespace sinkhorn_ops {
namespace detail {

namespace {

// log(x) flattened to (B, len) as the forward's log marginal, with a derivative that stays
// finite where x is 0 (there log x = -inf and the gradient's 1 / x would make 0 x inf = NaN).
at::Tensor differentiable_log(const at::Tensor& x, at::ScalarType acc,
                              const std::vector<int64_t>& batch, int64_t len, int64_t B) {
  std::vector<int64_t> shape(batch);
  shape.push_back(len);
  const auto v = x.to(acc).expand(shape).reshape({B, len});
  const auto zero = v == 0;
  return at::log(v.masked_fill(zero, 1)).masked_fill(zero, -std::numeric_limits<double>::infinity());
}

// logsumexp over dim whose derivative is 0, not NaN, on an empty line (all -inf): log of the sum
// of exp(x - shift), the shift (a line's max, or 0 for a line without a finite max) held
// constant, with the log taken of 1 where that sum is 0. Vector ops besides logsumexp's own
// passes over x (no mask of x), so that the second order pays nothing for empty lines.
at::Tensor differentiable_lse(const at::Tensor& x, int64_t dim) {
  if (x.size(dim) == 0) return at::logsumexp(x, dim);  // all -inf, with no entry to differentiate
  const auto max = x.detach().amax(dim, /*keepdim=*/true);
  const auto shift = at::where(max.isfinite(), max, at::zeros({}, max.options()));
  const auto sum = at::exp(x - shift).sum(dim);
  const auto empty = sum == 0;
  return at::where(empty, -std::numeric_limits<double>::infinity(),
                   at::log(sum.masked_fill(empty, 1)) + shift.squeeze(dim));
}

}  // namespace

bool composite_backward_applies(const BackwardProblem& p, bool cpu) {
  static const bool cpu_forced = sinkhorn::env_is("SINKHORN_CPU_BACKWARD", "composite");
  static const bool cuda_disabled = sinkhorn::env_is("SINKHORN_CUDA_BACKWARD", "block");
  static const bool cuda_forced = sinkhorn::env_is("SINKHORN_CUDA_BACKWARD", "composite");
  if (cpu) return cpu_forced;
  return cuda_forced || (!cuda_disabled && p.fwd.n * p.fwd.m >= (int64_t(1) << 20));
}

namespace {

// The replay of a forward (MATH.md section 1): each step's LSEs (from `history` when given: the
// same steps, run without the freezing, whose extra steps the reverse never reads) and the
// potentials each problem ended with, frozen after its steps_used steps; differentiable when
// asked (out of place, safe logs).
struct Replay {
  at::Tensor S, la, lb, pf, pg;  // S (B, n, m) in the accumulation type, masked entries -inf
  std::vector<at::Tensor> hist;
};

// math::potential: log(marginal) - LSE, 0 for an empty line, NaN for a NaN LSE.
at::Tensor potential(const at::Tensor& lm, const at::Tensor& lse) {
  return at::where(lse == -std::numeric_limits<double>::infinity(), at::zeros({}, lse.options()),
                   lm - lse);
}

bool row_step(const ForwardProblem& f, int64_t t) { return ((t % 2) == 0) == f.start_row; }

Replay replay(const ForwardProblem& f, const at::Tensor& a, const at::Tensor& b,
              const at::Tensor& steps_used, const at::Tensor& history, bool differentiable) {
  const auto acc = accumulation_type(f.scores.scalar_type());
  const auto opts = f.scores.options().dtype(acc);
  const double ninf = -std::numeric_limits<double>::infinity();
  Replay r;
  r.S = f.scores.to(acc);
  r.la = f.log_a;
  r.lb = f.log_b;
  if (differentiable && r.la.defined()) {
    r.la = differentiable_log(a, acc, f.batch_shape, f.n, f.B);
    r.lb = differentiable_log(b, acc, f.batch_shape, f.m, f.B);
  }
  if (!r.la.defined()) {  // the default marginals (MATH.md section 1, masks)
    const auto allowed = r.S != ninf;
    const auto alive_r = allowed.any(-1), alive_c = allowed.any(-2);
    const auto rows = alive_r.sum(-1, true).to(acc), cols = alive_c.sum(-1, true).to(acc);
    const auto masked = at::full({}, ninf, opts);
    r.la = at::where(alive_r, at::zeros({}, opts), masked);
    r.lb = at::where(alive_c & (rows > 0), at::log(rows / cols.clamp_min(1)), masked);
  }
  const auto used = steps_used.clamp(0, f.steps).unsqueeze(-1);  // (B, 1)
  r.pf = at::zeros({f.B, f.n}, opts);
  r.pg = at::zeros({f.B, f.m}, opts);
  // Every step of f.steps is replayed (the steps run where steps_bound could read them, the cap
  // otherwise): a cap beyond what memory could hold is a clear error, not a length_error.
  TORCH_CHECK_VALUE(step_records_fit(f),
                    "sinkhorn: the differentiable replay (second order, forward mode) keeps "
                    "every step of steps = ", f.steps, ", batch ", f.B, " x max(n, m) ",
                    std::max<int64_t>({f.n, f.m, 1}),
                    " values a step, which overflows a 64-bit byte count; expected a smaller "
                    "steps (with tol it is the cap)");
  r.hist.resize(f.steps);
  for (int64_t t = 0; t < f.steps; ++t) {
    const auto active = used > t;
    const bool row = row_step(f, t);
    if (history.defined()) {
      r.hist[t] = history.select(0, t).narrow(-1, 0, row ? f.n : f.m);
    } else {
      const auto x = row ? r.S + r.pg.unsqueeze(-2) : r.S + r.pf.unsqueeze(-1);
      r.hist[t] = differentiable ? differentiable_lse(x, row ? -1 : -2)
                                 : at::logsumexp(x, row ? -1 : -2);
    }
    if (row) {
      r.pf = at::where(active, potential(r.la, r.hist[t]), r.pf);
    } else {
      r.pg = at::where(active, potential(r.lb, r.hist[t]), r.pg);
    }
  }
  return r;
}

}  // namespace

ForwardResult unrolled_forward_differentiable(const ForwardProblem& f, const at::Tensor& a,
                                              const at::Tensor& b, const at::Tensor& steps_used,
                                              const at::Tensor& error) {
  // (Empty batches too: their outputs then carry zero tangents, as ATen ops' do.)
  ForwardOutputs out;
  ForwardProblem bounded = f;  // the steps run, not the cap, where they can be read
  bounded.steps = steps_bound(steps_used, f.steps);
  const auto r = replay(bounded, a, b, steps_used.reshape({f.B}), at::Tensor(), true);
  out.plan = at::exp(r.S + r.pf.unsqueeze(-1) + r.pg.unsqueeze(-2)).to(f.scores.scalar_type());
  out.f = r.pf;
  out.g = r.pg;
  out.steps_used = steps_used.reshape({f.B});
  out.error = error.reshape({f.B});
  return finish_forward(f, out);
}

BackwardResult unrolled_backward_composite(const BackwardProblem& p, const at::Tensor& history,
                                           const ReverseStep& reverse, bool differentiable) {
  const auto& f = p.fwd;
  BackwardOutputs out = allocate_backward(p);
  if (f.B == 0) return finish_backward(p, out);
  // Differentiable: out of place throughout (autograd saves what it differentiates), no device
  // kernels, no history.
  TORCH_INTERNAL_ASSERT(!differentiable || (!history.defined() && !reverse));
  const auto acc = accumulation_type(f.scores.scalar_type());
  const auto opts = f.scores.options().dtype(acc);
  const double ninf = -std::numeric_limits<double>::infinity();
  const auto zero = at::zeros({}, opts);
  // An empty line's LSE (-inf) read as +inf in the reverse: its R = exp(S + before - LSE) is 0,
  // as math::step_weight makes it in the kernels (a NaN LSE stays NaN, as there).
  const auto inf = at::full({}, -ninf, opts);
  const int64_t K = f.steps;
  const auto used = p.steps_used.clamp(0, K).unsqueeze(-1);  // (B, 1)
  const auto r = replay(f, p.a, p.b, p.steps_used, history, differentiable);
  const auto& S = r.S;
  const auto &la = r.la, &lb = r.lb, &pf = r.pf, &pg = r.pg;
  const auto& hist = r.hist;
  // The output P = exp(S + f (+) g): dS = Gamma, and Gamma's sums join dL/df and dL/dg.
  auto dS = p.grad_plan.to(acc) * at::exp(S + pf.unsqueeze(-1) + pg.unsqueeze(-2));
  auto uf = dS.sum(-1), ug = dS.sum(-2);
  if (p.grad_f.defined()) uf = uf + p.grad_f;
  if (p.grad_g.defined()) ug = ug + p.grad_g;
  auto dla = at::zeros({f.B, f.n}, opts), dlb = at::zeros({f.B, f.m}, opts);
  const auto steps_used = p.steps_used.contiguous();
  at::Tensor w_sum;  // differentiable: the steps' w, subtracted from dS at the end
  for (int64_t t = K - 1; t >= 0; --t) {
    // The step's axis (d) and the other one (e): a row step reads the row LSEs and g as step t-1
    // left it, and its sums go to g's upstream; a column step the transpose.
    const bool row = row_step(f, t);
    at::Tensor& u_axis = row ? uf : ug;
    at::Tensor& other = row ? ug : uf;
    at::Tensor& dl = row ? dla : dlb;
    const at::Tensor& lm_other = row ? lb : la;
    const at::Tensor& lse = hist[t];
    const at::Tensor prev = t > 0 ? hist[t - 1] : at::Tensor();
    if (reverse &&
        reverse(ReverseStepArgs{row, t, S, dS, steps_used, lse, prev, lm_other, u_axis, other, dl}))
      continue;
    const int64_t d = row ? -1 : -2, e = row ? -2 : -1;
    const auto active = used > t;
    const auto before =
        prev.defined() ? potential(lm_other, prev) : at::zeros({f.B, row ? f.m : f.n}, opts);
    const auto u = at::where(active, u_axis, zero);
    const auto lse_read = at::where(lse == ninf, inf, lse).unsqueeze(d);
    // A problem that did not run the step takes no part in it, even where its LSE of a step it
    // never ran is NaN (0 x NaN): as the kernels, which skip it.
    const auto idle = ~active.unsqueeze(-1);
    at::Tensor w;
    if (differentiable) {
      // The idle problems' LSEs read as +inf (their w is then 0, NaN LSEs included): a vector
      // op where the in-place form masks w, one n x m pass fewer, forward and backward. Vectors
      // negated before they broadcast, and the steps' w summed into one tensor subtracted once:
      // autograd negates what a subtraction's right side gets, a pass over n x m per step.
      const auto neg_lse = (-at::where(active, lse_read.squeeze(d), inf)).unsqueeze(d);
      w = at::exp(S + before.unsqueeze(e) + neg_lse) * u.unsqueeze(d);
      w_sum = w_sum.defined() ? w_sum + w : w;
      other = other - w.sum(e);
    } else {
      w = at::add(S, before.unsqueeze(e));  // then in place: one temporary a step
      w.sub_(lse_read).exp_().mul_(u.unsqueeze(d));
      w.masked_fill_(idle, 0);
      dS.sub_(w);
      other.sub_(w.sum(e));
    }
    dl = dl + at::where(lse > ninf, u, zero);
    u_axis = at::where(active, zero, u_axis);  // consumed: the step overwrote that potential
  }
  if (differentiable) {
    if (w_sum.defined()) dS = dS - w_sum;
    out = {dS.to(f.scores.scalar_type()), dla, dlb};
  } else {
    out.grad_scores.copy_(dS);
    out.grad_log_a.copy_(dla);
    out.grad_log_b.copy_(dlb);
  }
  return finish_backward(p, out);
}

}  // namespace detail
}  // namespace sinkhorn_ops
