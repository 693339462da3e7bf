// Front door of the fused mHC Sinkhorn operators (DeepSeek-V4's and the paper's).
#include "mhc_v4.h"

#include <cmath>

#include "../mhc_v4_math.h"

namespace sinkhorn_ops {
namespace detail {

V4Call prepare_mhc_v4(const at::Tensor& logits, const at::Tensor* grad, int64_t iters,
                      double eps, bool paper) {
  const char* op = paper ? (grad ? "mhc_sinkhorn_backward" : "mhc_sinkhorn")
                         : (grad ? "mhc_v4_sinkhorn_backward" : "mhc_v4_sinkhorn");
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
                   op, ": expected logits of dtype float32 or float64 (mHC runs its Sinkhorn in "
                   "fp32), got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() >= 2 && logits.size(-1) == logits.size(-2), op,
                    ": expected logits of shape (..., n, n), got ", logits.sizes());
  const int64_t n = logits.size(-1);
  TORCH_CHECK_VALUE(n >= 1 && n <= sinkhorn::v4::kMaxN, op, ": expected 1 <= n <= ",
                    sinkhorn::v4::kMaxN, " (the fused kernel's largest n), got n = ", n);
  TORCH_CHECK_VALUE(iters >= 1 && iters <= sinkhorn::v4::kMaxIters, op,
                    ": expected 1 <= iters <= ", sinkhorn::v4::kMaxIters, ", got ", iters);
  TORCH_CHECK_VALUE(paper || (std::isfinite(eps) && eps > 0), op,
                    ": expected a finite eps > 0, got ", eps);
  V4Call c;
  c.logits = logits.contiguous();
  if (grad) {
    TORCH_CHECK_TYPE(grad->scalar_type() == logits.scalar_type(), op,
                     ": expected grad of the logits' dtype ", logits.scalar_type(), ", got ",
                     grad->scalar_type());
    TORCH_CHECK_VALUE(grad->sizes() == logits.sizes(), op,
                      ": expected grad of the logits' shape ", logits.sizes(), ", got ",
                      grad->sizes());
    TORCH_CHECK_VALUE(grad->device() == logits.device(), op,
                      ": expected grad on the logits' device ", logits.device(), ", got ",
                      grad->device());
    c.grad = grad->contiguous();
  }
  c.out = at::empty_like(c.logits, at::MemoryFormat::Contiguous);
  auto& p = c.params;
  p.logits = c.logits.data_ptr();
  p.grad = grad ? c.grad.data_ptr() : nullptr;
  p.out = c.out.data_ptr();
  p.n = n;
  p.B = n == 0 ? 0 : logits.numel() / (n * n);
  p.iters = static_cast<int>(iters);
  p.eps = paper ? 0.0 : eps;
  p.paper = paper;
  p.dtype = logits.scalar_type() == at::kDouble ? sinkhorn::DType::Float64
                                                 : sinkhorn::DType::Float32;
  return c;
}

}  // namespace detail
}  // namespace sinkhorn_ops
