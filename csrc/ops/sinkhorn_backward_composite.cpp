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
#include <limits>
#include <vector>

#include "../env_flag.h"
#include "sinkhorn_backward.h"

namespace sinkhorn_ops {
namespace detail {

bool composite_backward_applies(const BackwardProblem& p, bool cpu) {
  static const bool cpu_forced = sinkhorn::env_is("SINKHORN_CPU_BACKWARD", "composite");
  static const bool cuda_disabled = sinkhorn::env_is("SINKHORN_CUDA_BACKWARD", "block");
  static const bool cuda_forced = sinkhorn::env_is("SINKHORN_CUDA_BACKWARD", "composite");
  if (cpu) return cpu_forced;
  return cuda_forced || (!cuda_disabled && p.fwd.n * p.fwd.m >= (int64_t(1) << 20));
}

BackwardResult unrolled_backward_composite(const BackwardProblem& p, const at::Tensor& history,
                                           const ReverseStep& reverse) {
  const auto& f = p.fwd;
  BackwardOutputs out = allocate_backward(p);
  if (f.B == 0) return finish_backward(p, out);
  const auto acc = accumulation_type(f.scores.scalar_type());
  const auto opts = f.scores.options().dtype(acc);
  const double ninf = -std::numeric_limits<double>::infinity();
  const auto S = f.scores.to(acc);  // (B, n, m), masked entries -inf
  const auto zero = at::zeros({}, opts), masked = at::full({}, ninf, opts);
  // An empty line's LSE (-inf) read as +inf in the reverse: its R = exp(S + before - LSE) is 0,
  // as math::step_weight makes it in the kernels (a NaN LSE stays NaN, as there).
  const auto inf = at::full({}, -ninf, opts);

  at::Tensor la = f.log_a, lb = f.log_b;
  if (!la.defined()) {  // the default marginals (MATH.md section 1, masks)
    const auto allowed = S != ninf;
    const auto alive_r = allowed.any(-1), alive_c = allowed.any(-2);
    const auto rows = alive_r.sum(-1, true).to(acc), cols = alive_c.sum(-1, true).to(acc);
    la = at::where(alive_r, zero, masked);
    lb = at::where(alive_c & (rows > 0), at::log(rows / cols.clamp_min(1)), masked);
  }
  // math::potential: log(marginal) - LSE, 0 for an empty line, NaN for a NaN LSE.
  auto potential = [&](const at::Tensor& lm, const at::Tensor& lse) {
    return at::where(lse == ninf, zero, lm - lse);
  };
  const int64_t K = f.steps;
  const auto used = p.steps_used.clamp(0, K).unsqueeze(-1);  // (B, 1)
  auto row_step = [&](int64_t t) { return ((t % 2) == 0) == f.start_row; };

  // The replay: each step's LSEs (from `history` when given: the same steps, run without the
  // freezing, whose extra steps the reverse never reads) and the potentials each problem ended
  // with, frozen after its steps_used steps.
  at::Tensor pf = at::zeros({f.B, f.n}, opts), pg = at::zeros({f.B, f.m}, opts);
  std::vector<at::Tensor> hist(K);
  for (int64_t t = 0; t < K; ++t) {
    const auto active = used > t;
    const bool row = row_step(t);
    if (history.defined()) {
      hist[t] = history.select(0, t).narrow(-1, 0, row ? f.n : f.m);
    } else {
      hist[t] = row ? at::logsumexp(S + pg.unsqueeze(-2), -1)
                    : at::logsumexp(S + pf.unsqueeze(-1), -2);
    }
    if (row) {
      pf = at::where(active, potential(la, hist[t]), pf);
    } else {
      pg = at::where(active, potential(lb, hist[t]), pg);
    }
  }
  // The output P = exp(S + f (+) g): dS = Gamma, and Gamma's sums join dL/df and dL/dg.
  auto dS = p.grad_plan.to(acc) * at::exp(S + pf.unsqueeze(-1) + pg.unsqueeze(-2));
  auto uf = dS.sum(-1), ug = dS.sum(-2);
  if (p.grad_f.defined()) uf = uf + p.grad_f;
  if (p.grad_g.defined()) ug = ug + p.grad_g;
  auto dla = at::zeros({f.B, f.n}, opts), dlb = at::zeros({f.B, f.m}, opts);
  const auto steps_used = p.steps_used.contiguous();
  for (int64_t t = K - 1; t >= 0; --t) {
    // The step's axis (d) and the other one (e): a row step reads the row LSEs and g as step t-1
    // left it, and its sums go to g's upstream; a column step the transpose.
    const bool row = row_step(t);
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
    auto w = at::add(S, before.unsqueeze(e));  // then in place: one temporary a step
    w.sub_(at::where(lse == ninf, inf, lse).unsqueeze(d)).exp_().mul_(u.unsqueeze(d));
    // A problem that did not run the step takes no part in it, even where its LSE of a step it
    // never ran is NaN (0 x NaN): as the kernels, which skip it.
    w.masked_fill_(~active.unsqueeze(-1), 0);
    dS.sub_(w);
    other.sub_(w.sum(e));
    dl = dl + at::where(lse > ninf, u, zero);
    u_axis = at::where(active, zero, u_axis);  // consumed: the step overwrote that potential
  }
  out.grad_scores.copy_(dS);
  out.grad_log_a.copy_(dla);
  out.grad_log_b.copy_(dlb);
  return finish_backward(p, out);
}

}  // namespace detail
}  // namespace sinkhorn_ops
