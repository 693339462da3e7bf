// Front door of the mHC stream-mixing operators (mhc_pre_mix, mhc_post_mix and their
// backwards): the checks every device shares, the outputs, and the params for a kernel.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "../sinkhorn_params.h"

namespace sinkhorn_ops {
namespace detail {

// One validated call. Inputs are contiguous; outputs are allocated in the caller's shapes.
struct MixCall {
  at::Tensor x, y, h_pre, h_post, h_res, grad;       // inputs (undefined where not used)
  at::Tensor out, grad_y, grad_h_pre, grad_h_post, grad_h_res;  // outputs
  sinkhorn::MixParams params;
};

// Pre mix (post = false: x, h_pre) or post mix (post = true: x, y, h_post, h_res); forward when
// grad is undefined. Raises ValueError/TypeError naming the op, the argument, what was
// expected and what came.
MixCall prepare_mhc_mix(bool post, const at::Tensor& x, const at::Tensor& y,
                        const at::Tensor& h_pre, const at::Tensor& h_post,
                        const at::Tensor& h_res, const at::Tensor& grad);

}  // namespace detail
}  // namespace sinkhorn_ops
