// CUDA registration of sinkhorn_ops::sinkhorn: the ATen glue (device guard, stream, workspace,
// launch check) around the ATen-free kernel launcher of sinkhorn_kernel.cu.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS and
// cuSPARSE), so CI can syntax-check this file against a CPU build of torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ops/sinkhorn_forward.h"
#include "sinkhorn_kernel.h"

namespace sinkhorn_ops {
namespace cuda {
namespace {

detail::ForwardResult sinkhorn_cuda(const at::Tensor& scores, const c10::optional<at::Tensor>& a,
                                    const c10::optional<at::Tensor>& b,
                                    const c10::optional<at::Tensor>& mask, int64_t steps,
                                    c10::string_view start, double tol) {
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

}  // namespace

TORCH_LIBRARY_IMPL(sinkhorn_ops, CUDA, m) {
  m.impl("sinkhorn", &sinkhorn_cuda);
}

}  // namespace cuda
}  // namespace sinkhorn_ops
