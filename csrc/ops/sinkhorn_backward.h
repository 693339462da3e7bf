// Front door of the backward operators (MATH.md section 2): checks, flattening, the params of
// the unrolled kernels, and the conversion of d(log a) into d a.
#pragma once

#include <functional>

#include "sinkhorn_forward.h"

namespace sinkhorn_ops {
namespace detail {

using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// One validated unrolled backward call: the forward problem it replays plus the upstream grads.
struct BackwardProblem {
  ForwardProblem fwd;
  at::Tensor a, b;            // the caller's marginals (undefined for defaults), for d a = d log a / a
  at::Tensor grad_plan;       // (B, n, m), scores dtype, contiguous
  at::Tensor grad_f, grad_g;  // (B, n), (B, m) accumulation dtype, or undefined
  at::Tensor steps_used;      // (B) int64
};

BackwardProblem prepare_backward(const at::Tensor& grad_plan, const c10::optional<at::Tensor>& grad_f,
                                 const c10::optional<at::Tensor>& grad_g, const at::Tensor& scores,
                                 const c10::optional<at::Tensor>& a,
                                 const c10::optional<at::Tensor>& b,
                                 const c10::optional<at::Tensor>& mask,
                                 const at::Tensor& steps_used, int64_t steps,
                                 c10::string_view start);

struct BackwardOutputs {
  at::Tensor grad_scores, grad_log_a, grad_log_b;
};
BackwardOutputs allocate_backward(const BackwardProblem& p);
sinkhorn::BwdParams backward_params(const BackwardProblem& p, BackwardOutputs& out);
// (grad_scores in the scores' shape, grad_a and grad_b in the broadcast shapes (..., n) and
// (..., m), accumulation dtype; empty tensors when the marginals were the defaults).
BackwardResult finish_backward(const BackwardProblem& p, BackwardOutputs& out);

// Whether t's values can be read here without a host synchronisation: a plain CPU tensor (not
// CUDA, not fake, functional or wrapped by torch.func).
bool readable_on_host(const at::Tensor& t);

// The largest of steps_used clamped to [0, cap] (and at least min(cap, 2)) where it can be
// read without a host synchronisation (a plain CPU tensor), else cap: what bounds the unrolled
// backward's steps when a tol run stopped before its cap.
int64_t steps_bound(const at::Tensor& steps_used, int64_t cap);

// Whether f.steps records of batch x max(n, m) values a step (8 bytes each at most) have a byte
// count that fits in 64 bits: the unrolled backward's LSE records and the differentiable replay.
bool step_records_fit(const ForwardProblem& f);

template <typename Kernel>
BackwardResult run_backward(const BackwardProblem& p, Kernel&& kernel) {
  BackwardOutputs out = allocate_backward(p);
  if (p.fwd.B > 0) kernel(backward_params(p, out));
  return finish_backward(p, out);
}

// The unrolled backward composed of ATen ops (sinkhorn_backward_composite.cpp), on any device,
// and whether a call takes it: on CUDA for n * m >= 2^20 unless SINKHORN_CUDA_BACKWARD=block, or
// at any size with SINKHORN_CUDA_BACKWARD=composite; on the CPU only when
// SINKHORN_CPU_BACKWARD=composite (for tests).
bool composite_backward_applies(const BackwardProblem& p, bool cpu);
// history: (steps, B, max(n, m)) accumulation type, every step's LSEs from a replay of the
// forward without early stopping (the CUDA large path's, launch_large_forward with
// FwdParams::history); undefined: the replay runs here, in ATen ops. reverse: a device's fused
// reverse step with its bookkeeping (sinkhorn::ReverseStepParams), false when it does not take
// the call; null or false: ATen ops.
//
// Reverse step t (a row step when row), in the accumulation type: lse (B, len) its LSEs, len the
// step axis' length; the other axis' potential as the step read it is
// math::potential(other_log_marginal, before_lse), 0 at t = 0 (before_lse undefined). S, dS,
// steps_used, other_log_marginal, u, target and grad_log_marginal are contiguous; u,
// grad_log_marginal (the step axis) and target (the other axis) and dS are updated in place: for
// the problems with steps_used > t, w = u (x) exp(S + before - lse) leaves dS and target, u joins
// grad_log_marginal where lse is finite, and u becomes 0.
struct ReverseStepArgs {
  bool row;
  int64_t t;
  at::Tensor S, dS, steps_used, lse, before_lse, other_log_marginal, u, target, grad_log_marginal;
};
using ReverseStep = std::function<bool(const ReverseStepArgs&)>;
// differentiable: out-of-place ATen ops only (no history, no reverse), so that autograd and
// forward-mode AD differentiate the gradient itself (the backward operator's second order).
BackwardResult unrolled_backward_composite(const BackwardProblem& p,
                                           const at::Tensor& history = at::Tensor(),
                                           const ReverseStep& reverse = nullptr,
                                           bool differentiable = false);

// A device's conjugate-gradient solve of the implicit backward's Schur system (the CUDA glue
// registers its fused kernel, cuda/implicit_cg.cu; sinkhorn::CgParams says what it solves): P
// (B, n, m) contiguous, flip when the solved side is P's rows, rinv (B, N), c, w, dinv and rhs
// (B, M), alpha (B), all contiguous in the accumulation type; fills y (B, M). False when it does
// not take the call (the ATen loop then runs).
struct CgSystem {
  at::Tensor P;
  bool flip;
  at::Tensor rinv, c, w, alpha, dinv, rhs;
  double tol;
  int64_t iters;
};
using CgSolver = bool (*)(const CgSystem&, const at::Tensor& y);
void register_cg_solver(c10::DeviceType device, CgSolver solver);

// The implicit-function-theorem backward (MATH.md section 2.2), in ATen ops on any device.
// differentiable: the dense solve whatever the solver (B problems of M x M, M the smaller side),
// so that autograd and forward-mode AD differentiate the gradient exactly.
BackwardResult sinkhorn_backward_implicit(const at::Tensor& grad_plan,
                                          const c10::optional<at::Tensor>& grad_f,
                                          const c10::optional<at::Tensor>& grad_g,
                                          const at::Tensor& plan, c10::string_view solver,
                                          double cg_tol, int64_t cg_max_iter,
                                          bool differentiable = false);

// The unrolled forward's outputs recomputed from the steps each problem ran (steps_used, from
// the operator's own run) in out-of-place ATen ops, for forward-mode AD (and, with it, reverse
// mode through the same ops): plan = exp(S + f (+) g), f and g the replayed potentials; a and b
// the caller's marginals (undefined for the defaults).
ForwardResult unrolled_forward_differentiable(const ForwardProblem& f, const at::Tensor& a,
                                              const at::Tensor& b, const at::Tensor& steps_used,
                                              const at::Tensor& error);

// The three operators called through the dispatcher (sinkhorn_op.cpp): the C++ API's calls, and
// the autograd registration's below the Autograd key (sinkhorn_autograd.cpp).
ForwardResult call_sinkhorn(const at::Tensor& scores, const c10::optional<at::Tensor>& a,
                            const c10::optional<at::Tensor>& b,
                            const c10::optional<at::Tensor>& mask, int64_t steps,
                            c10::string_view start, double tol, c10::string_view grad,
                            double cg_tol, int64_t cg_max_iter);
// The warm-started run (sinkhorn_warm.cpp): from (f0, g0) instead of zeros.
ForwardResult call_sinkhorn_warm(const at::Tensor& scores, const c10::optional<at::Tensor>& a,
                                 const c10::optional<at::Tensor>& b,
                                 const c10::optional<at::Tensor>& mask,
                                 const c10::optional<at::Tensor>& f0,
                                 const c10::optional<at::Tensor>& g0, int64_t steps,
                                 c10::string_view start, double tol, c10::string_view grad,
                                 double cg_tol, int64_t cg_max_iter);
BackwardResult call_backward_unrolled(const at::Tensor& grad_plan,
                                      const c10::optional<at::Tensor>& grad_f,
                                      const c10::optional<at::Tensor>& grad_g,
                                      const at::Tensor& scores,
                                      const c10::optional<at::Tensor>& a,
                                      const c10::optional<at::Tensor>& b,
                                      const c10::optional<at::Tensor>& mask,
                                      const at::Tensor& steps_used, int64_t steps,
                                      c10::string_view start);
BackwardResult call_backward_implicit(const at::Tensor& grad_plan,
                                      const c10::optional<at::Tensor>& grad_f,
                                      const c10::optional<at::Tensor>& grad_g,
                                      const at::Tensor& plan, c10::string_view solver,
                                      double cg_tol, int64_t cg_max_iter);

}  // namespace detail
}  // namespace sinkhorn_ops
