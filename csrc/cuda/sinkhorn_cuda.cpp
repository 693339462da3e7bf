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

#include "../ops/mhc_mix.h"
#include "../ops/mhc_v4.h"
#include "../ops/sinkhorn_backward.h"
#include "../ops/sinkhorn_forward.h"
#include "sinkhorn_kernel.h"

namespace sinkhorn_ops {
namespace cuda {
namespace {

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
    // Freed when this returns, which is safe: the caching allocator hands the block out again
    // only to work queued after the kernel on the same stream.
    const at::Tensor workspace =
        at::empty({static_cast<int64_t>(sinkhorn::forward_workspace_bytes(params))},
                  problem.scores.options().dtype(at::kByte));
    params.workspace = workspace.data_ptr();
    sinkhorn::launch_forward(params, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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
  // Large problems: whole-device ATen kernels per step instead of one block per problem.
  if (detail::composite_backward_applies(problem, /*cpu=*/false))
    return detail::unrolled_backward_composite(problem);
  return detail::run_backward(problem, [&](sinkhorn::BwdParams params) {
    // The LSE records of every step: B * steps * max(n, m) values (MATH.md section 2.1).
    const at::Tensor workspace =
        at::empty({static_cast<int64_t>(sinkhorn::backward_workspace_bytes(params))},
                  problem.fwd.scores.options().dtype(at::kByte));
    params.workspace = workspace.data_ptr();
    sinkhorn::launch_backward(params, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor mhc_v4_call(const at::Tensor& logits, const at::Tensor* grad, int64_t iters,
                       double eps) {
  auto call = detail::prepare_mhc_v4(logits, grad, iters, eps);
  const c10::cuda::CUDAGuard guard(logits.device());
  sinkhorn::launch_mhc_v4(call.params, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return call.out;
}

at::Tensor mhc_v4_sinkhorn_cuda(const at::Tensor& logits, int64_t iters, double eps) {
  return mhc_v4_call(logits, nullptr, iters, eps);
}

at::Tensor mhc_v4_sinkhorn_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                         int64_t iters, double eps) {
  return mhc_v4_call(logits, &grad, iters, eps);
}

detail::MixCall mix_cuda(bool post, const at::Tensor& x, const at::Tensor& y,
                         const at::Tensor& h_pre, const at::Tensor& h_post,
                         const at::Tensor& h_res, const at::Tensor& grad) {
  auto call = detail::prepare_mhc_mix(post, x, y, h_pre, h_post, h_res, grad);
  const c10::cuda::CUDAGuard guard(x.device());
  sinkhorn::launch_mhc_mix(call.params, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return call;
}

at::Tensor mhc_pre_mix_cuda(const at::Tensor& x, const at::Tensor& h_pre) {
  return mix_cuda(false, x, {}, h_pre, {}, {}, {}).out;
}

std::tuple<at::Tensor, at::Tensor> mhc_pre_mix_backward_cuda(const at::Tensor& grad,
                                                             const at::Tensor& x,
                                                             const at::Tensor& h_pre) {
  auto c = mix_cuda(false, x, {}, h_pre, {}, {}, grad);
  return {c.out, c.grad_h_pre};
}

at::Tensor mhc_post_mix_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h_post,
                             const at::Tensor& h_res) {
  return mix_cuda(true, x, y, {}, h_post, h_res, {}).out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mhc_post_mix_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& h_post,
    const at::Tensor& h_res) {
  auto c = mix_cuda(true, x, y, {}, h_post, h_res, grad);
  return {c.out, c.grad_y, c.grad_h_post, c.grad_h_res};
}

}  // namespace

TORCH_LIBRARY_IMPL(sinkhorn_ops, CUDA, m) {
  m.impl("sinkhorn", &sinkhorn_cuda);
  m.impl("sinkhorn_backward_unrolled", &sinkhorn_backward_unrolled_cuda);
  m.impl("mhc_v4_sinkhorn", &mhc_v4_sinkhorn_cuda);
  m.impl("mhc_v4_sinkhorn_backward", &mhc_v4_sinkhorn_backward_cuda);
  m.impl("mhc_pre_mix", &mhc_pre_mix_cuda);
  m.impl("mhc_pre_mix_backward", &mhc_pre_mix_backward_cuda);
  m.impl("mhc_post_mix", &mhc_post_mix_cuda);
  m.impl("mhc_post_mix_backward", &mhc_post_mix_backward_cuda);
}

}  // namespace cuda
}  // namespace sinkhorn_ops
