// CUDA registrations of sinkhorn_ops::sinkhorn, sinkhorn_backward_unrolled and the mHC ops (V4
// Sinkhorn, stream mixings): the ATen glue (device guard, stream, workspace, launch check)
// around the ATen-free kernel launchers (sinkhorn_kernel.h).
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS and
// cuSPARSE), so CI can syntax-check this file against a CPU build of torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../env_flag.h"
#include "../ops/mhc_ops.h"
#include "../ops/sinkhorn_backward.h"
#include "../ops/sinkhorn_forward.h"
#include "sinkhorn_kernel.h"

namespace sinkhorn_ops {
namespace cuda {
namespace {

// Device scratch of `bytes` on like's device, for a launcher's params.workspace. Freed when the
// caller returns, which is safe: the caching allocator hands the block out again only to work
// queued after the kernels on the same stream.
at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

detail::ForwardResult sinkhorn_cuda(const at::Tensor& scores, const c10::optional<at::Tensor>& a,
                                    const c10::optional<at::Tensor>& b,
                                    const c10::optional<at::Tensor>& mask, int64_t steps,
                                    c10::string_view start, double tol, c10::string_view grad,
                                    double cg_tol, int64_t cg_max_iter) {
  detail::check_grad_options(grad, cg_tol, cg_max_iter);
  // The checks first: they name a tensor on the wrong device, where a guard would only say
  // "expected a CUDA device". Then the outputs and the launch go to the scores' device.
  const auto problem = detail::prepare_forward(scores, a, b, mask, steps, start, tol);
  const c10::cuda::CUDAGuard guard(scores.device());
  return detail::run_forward(problem, [&](sinkhorn::FwdParams params) {
    const at::Tensor scratch = workspace(sinkhorn::forward_workspace_bytes(params), problem.scores);
    params.workspace = scratch.data_ptr();
    sinkhorn::launch_forward(params, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The composite backward's replay on the large forward path when that path takes the problem:
// every step's LSEs, (steps, B, max(n, m)), from the forward's kernels without early stopping
// (about one read of S a step instead of ATen's logsumexp passes); undefined when the path does
// not take it, and the composite replays in ATen.
at::Tensor large_replay(const detail::ForwardProblem& p) {
  if (p.B == 0 || p.steps == 0) return {};
  const auto acc = p.scores.options().dtype(detail::accumulation_type(p.scores.scalar_type()));
  detail::ForwardOutputs out;  // the potentials and the steps' bookkeeping; no plan
  out.f = at::empty({p.B, p.n}, acc);
  out.g = at::empty({p.B, p.m}, acc);
  out.error = at::empty({p.B}, acc);
  out.steps_used = at::empty({p.B}, p.scores.options().dtype(at::kLong));
  sinkhorn::FwdParams params = detail::forward_params(p, out);
  params.tol = 0.0;  // every step, for every problem: the reverse masks those not run
  if (!sinkhorn::large_forward_applies(params)) return {};
  const at::Tensor history = at::empty({p.steps, p.B, std::max(p.n, p.m)}, acc);
  params.history = history.data_ptr();
  const at::Tensor scratch = workspace(sinkhorn::large_forward_workspace_bytes(params), p.scores);
  params.workspace = scratch.data_ptr();
  sinkhorn::launch_large_forward(params, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return history;
}

// The composite backward's fused reverse step and its bookkeeping (large_backward.cu; the
// arguments as detail::ReverseStepArgs says); false when the grid cannot take it (the composite
// then runs the step in ATen ops).
bool reverse_step(const detail::ReverseStepArgs& a) {
  TORCH_INTERNAL_ASSERT(a.S.dim() == 3 && a.dS.is_contiguous() &&
                        a.u.is_contiguous() && a.target.is_contiguous() &&
                        a.grad_log_marginal.is_contiguous() &&
                        a.steps_used.scalar_type() == at::kLong && a.steps_used.is_contiguous());
  // The LSEs are a step's slice of the replay's history (rows strided by max(n, m)) or
  // contiguous; keep their row stride rather than copy them.
  auto rows = [](const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); };
  const at::Tensor lse = rows(a.lse);
  const at::Tensor before = a.before_lse.defined() ? rows(a.before_lse) : at::Tensor();
  const at::Tensor S = a.S.contiguous();
  const at::Tensor lm = a.other_log_marginal.to(a.S.scalar_type()).contiguous();
  sinkhorn::ReverseStepParams p;
  p.S = S.data_ptr();
  p.dS = a.dS.data_ptr();
  p.other_log_marginal = lm.data_ptr();
  p.before_lse = before.defined() ? before.data_ptr() : nullptr;
  p.before_stride = before.defined() ? before.stride(0) : 0;
  p.lse = lse.data_ptr();
  p.lse_stride = lse.stride(0);
  p.steps_used = a.steps_used.data_ptr<int64_t>();
  p.t = a.t;
  p.u = a.u.data_ptr();
  p.grad_log_marginal = a.grad_log_marginal.data_ptr();
  p.target = a.target.data_ptr();
  p.B = a.S.size(0);
  p.n = a.S.size(1);
  p.m = a.S.size(2);
  p.row = a.row;
  p.dtype = detail::kernel_dtype(a.S.scalar_type());  // the accumulation type
  if (!sinkhorn::reverse_step_fits(p)) return false;
  const at::Tensor scratch = workspace(sinkhorn::reverse_step_workspace_bytes(p), a.S);
  p.workspace = scratch.data_ptr();
  sinkhorn::launch_reverse_step(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// The implicit backward's conjugate gradients in one cooperative kernel (implicit_cg.cu),
// registered with the ATen loop (sinkhorn_implicit.cpp) for CUDA tensors; false when the kernel
// did not launch.
bool cg_cuda(const detail::CgSystem& s, const at::Tensor& y) {
  const c10::cuda::CUDAGuard guard(s.P.device());
  sinkhorn::CgParams q;
  q.P = s.P.data_ptr();
  q.rinv = s.rinv.data_ptr();
  q.c = s.c.data_ptr();
  q.w = s.w.data_ptr();
  q.alpha = s.alpha.data_ptr();
  q.dinv = s.dinv.data_ptr();
  q.rhs = s.rhs.data_ptr();
  q.y = y.data_ptr();
  q.B = s.P.size(0);
  q.n = s.P.size(1);
  q.m = s.P.size(2);
  q.iters = s.iters;
  q.flip = s.flip;
  q.tol = s.tol;
  q.dtype = detail::kernel_dtype(s.P.scalar_type());  // the accumulation type
  const at::Tensor scratch = workspace(sinkhorn::cg_workspace_bytes(q), s.P);
  q.workspace = scratch.data_ptr();
  if (!sinkhorn::launch_cg(q, c10::cuda::getCurrentCUDAStream())) return false;
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}
const bool cg_registered =
    (detail::register_cg_solver(c10::DeviceType::CUDA, &cg_cuda), true);

// Few problems too large for shared memory, which the forward runs on its large path
// (large_forward_applies; at n * m >= 2^20 composite_backward_applies already decides): the block
// backward would give each one SM. SINKHORN_CUDA_BACKWARD=block keeps them on the block kernel.
bool few_off_chip(const detail::BackwardProblem& p) {
  static const bool block_forced = sinkhorn::env_is("SINKHORN_CUDA_BACKWARD", "block");
  if (block_forced || p.fwd.B == 0) return false;
  detail::ForwardOutputs none;
  return sinkhorn::large_forward_applies(detail::forward_params(p.fwd, none));
}

detail::BackwardResult sinkhorn_backward_unrolled_cuda(
    const at::Tensor& grad_plan, const c10::optional<at::Tensor>& grad_f,
    const c10::optional<at::Tensor>& grad_g, const at::Tensor& scores,
    const c10::optional<at::Tensor>& a, const c10::optional<at::Tensor>& b,
    const c10::optional<at::Tensor>& mask, const at::Tensor& steps_used, int64_t steps,
    c10::string_view start) {
  // Checks before the guard, as in the forward.
  const auto problem = detail::prepare_backward(grad_plan, grad_f, grad_g, scores, a, b, mask,
                                                steps_used, steps, start);
  const c10::cuda::CUDAGuard guard(scores.device());
  // Large problems, and few problems too large for shared memory (the forward's rule): the
  // whole device on each step instead of one block per problem: the replay on the large forward
  // path when it takes the problem, a fused kernel per reverse step.
  if (detail::composite_backward_applies(problem, /*cpu=*/false) || few_off_chip(problem))
    return detail::unrolled_backward_composite(problem, large_replay(problem.fwd), reverse_step);
  return detail::run_backward(problem, [&](sinkhorn::BwdParams params) {
    // The LSE records of every step: B * steps * max(n, m) values (MATH.md section 2.1).
    const at::Tensor scratch =
        workspace(sinkhorn::backward_workspace_bytes(params), problem.fwd.scores);
    params.workspace = scratch.data_ptr();
    sinkhorn::launch_backward(params, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The mHC operators' kernels (detail::register_mhc_ops), on the inputs' device and stream.
struct Cuda {
  static void run(const detail::V4Call& call) {
    const c10::cuda::CUDAGuard guard(call.logits.device());
    sinkhorn::launch_mhc_v4(call.params, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  static void run(const detail::MixCall& call) {
    const c10::cuda::CUDAGuard guard(call.x.device());
    sinkhorn::launch_mhc_mix(call.params, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  static void run(const detail::MappingsCall& call) {
    const c10::cuda::CUDAGuard guard(call.proj.device());
    sinkhorn::launch_mhc_mappings(call.params, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(sinkhorn_ops, CUDA, m) {
  m.impl("sinkhorn", &sinkhorn_cuda);
  m.impl("sinkhorn_backward_unrolled", &sinkhorn_backward_unrolled_cuda);
  detail::register_mhc_ops<Cuda>(m);
}

}  // namespace cuda
}  // namespace sinkhorn_ops
