// Front door of the fused mHC Sinkhorn operators (mhc_v4_sinkhorn, mhc_sinkhorn, their backwards):
// the checks every device shares and the plain params handed to a kernel.
#pragma once

#include <ATen/ATen.h>

#include "../sinkhorn_params.h"

namespace sinkhorn_ops {
namespace detail {

// One validated call: the contiguous inputs, the output (the logits' shape) and the params
// that point at them.
struct V4Call {
  at::Tensor logits, grad, out;
  sinkhorn::V4Params params;
};

// Checks the arguments of the forward (grad == nullptr) or of the backward and raises
// ValueError/TypeError naming the op, the argument, what was expected and what came. paper:
// the mHC paper's Sinkhorn (mhc_sinkhorn, V4Params::paper), which ignores eps.
V4Call prepare_mhc_v4(const at::Tensor& logits, const at::Tensor* grad, int64_t iters,
                      double eps, bool paper = false);

}  // namespace detail
}  // namespace sinkhorn_ops
