// Front door of mHC's fused mappings operators (mhc_mappings and its backward): the checks every
// device shares, the outputs, and the params for a kernel.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <tuple>

#include "../sinkhorn_params.h"

namespace sinkhorn_ops {
namespace detail {

// The gates' and biases' tensors of a call: alpha_pre, alpha_post, alpha_res, b_pre, b_post,
// b_res.
using MappingsWeights = std::array<at::Tensor, 6>;

// The weights' names, in MappingsWeights' order (for the messages).
inline constexpr const char* kWeightNames[6] = {"alpha_pre", "alpha_post", "alpha_res",
                                                "b_pre",     "b_post",     "b_res"};

// n of b_res (n, n) with 1 <= n <= the fused kernels' largest; raises ValueError naming op.
int64_t checked_streams(const std::string& op, const at::Tensor& b_res);

// The RMSNorm folded into a call by the op `op` (mhc_coefficients and its backward): the
// per-token norms ||x|| over dim inputs, with proj's leading shape and dtype; proj then holds the
// raw projections x phi.
struct FoldedNorm {
  const char* op;
  at::Tensor norm;
  int64_t dim;
  double eps;
};

// One validated call. Inputs are contiguous; outputs are allocated in the caller's shapes.
struct MappingsCall {
  at::Tensor proj;
  MappingsWeights weights;
  at::Tensor grad_pre, grad_post, grad_res;         // backward inputs (undefined: zeros)
  at::Tensor pre, post, res;                        // forward outputs
  at::Tensor grad_proj, partials;                   // backward outputs (partials: scratch)
  at::Tensor norm, rms_coef;                        // a folded norm's input and backward output
  sinkhorn::MappingsParams params;
};

// The forward (backward = false) or the backward (grads may be undefined) of the mappings of
// projections proj (..., 2n + n^2) with the weights; variant "paper" or "v4"; rms: the norm
// folded in, if any. Raises ValueError/TypeError naming the op, the argument, what was expected
// and what came.
MappingsCall prepare_mhc_mappings(bool backward, const at::Tensor& proj,
                                  const MappingsWeights& weights, int64_t iters, double eps,
                                  c10::string_view variant, const at::Tensor& grad_pre = {},
                                  const at::Tensor& grad_post = {},
                                  const at::Tensor& grad_res = {},
                                  const FoldedNorm* rms = nullptr);

// The backward's gradients of the weights from a run call, flattened in the weights' order
// (3 + 2n + n^2 values): the tokens' partials rows summed, one reduction for all six.
at::Tensor mappings_weight_grads(const MappingsCall& call);

}  // namespace detail
}  // namespace sinkhorn_ops
