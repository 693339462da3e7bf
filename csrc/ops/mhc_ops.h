// The mHC operators' bodies (the two fused Sinkhorns, the stream mixings, their backwards),
// shared by the CPU and CUDA registrations: the front door's checks, then Device::run(call),
// which launches the device's kernel on a checked call (a V4Call, a MixCall or a MappingsCall),
// then the outputs.
#pragma once

#include <torch/library.h>

#include <tuple>

#include "mhc_mappings.h"
#include "mhc_mix.h"
#include "mhc_v4.h"

namespace sinkhorn_ops {
namespace detail {

template <typename Device>
at::Tensor mhc_v4_sinkhorn_op(const at::Tensor& logits, int64_t iters, double eps) {
  auto call = prepare_mhc_v4(logits, nullptr, iters, eps);
  Device::run(call);
  return call.out;
}

template <typename Device>
at::Tensor mhc_v4_sinkhorn_backward_op(const at::Tensor& grad, const at::Tensor& logits,
                                       int64_t iters, double eps) {
  auto call = prepare_mhc_v4(logits, &grad, iters, eps);
  Device::run(call);
  return call.out;
}

template <typename Device>
at::Tensor mhc_sinkhorn_op(const at::Tensor& logits, int64_t iters) {
  auto call = prepare_mhc_v4(logits, nullptr, iters, 0.0, /*paper=*/true);
  Device::run(call);
  return call.out;
}

template <typename Device>
at::Tensor mhc_sinkhorn_backward_op(const at::Tensor& grad, const at::Tensor& logits,
                                    int64_t iters) {
  auto call = prepare_mhc_v4(logits, &grad, iters, 0.0, /*paper=*/true);
  Device::run(call);
  return call.out;
}

template <typename Device>
at::Tensor mhc_pre_mix_op(const at::Tensor& x, const at::Tensor& h_pre) {
  auto call = prepare_mhc_mix(false, x, {}, h_pre, {}, {}, {});
  Device::run(call);
  return call.out;
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor> mhc_pre_mix_backward_op(const at::Tensor& grad,
                                                           const at::Tensor& x,
                                                           const at::Tensor& h_pre) {
  auto call = prepare_mhc_mix(false, x, {}, h_pre, {}, {}, grad);
  Device::run(call);
  return {call.out, call.grad_h_pre};
}

template <typename Device>
at::Tensor mhc_post_mix_op(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h_post,
                           const at::Tensor& h_res) {
  auto call = prepare_mhc_mix(true, x, y, {}, h_post, h_res, {});
  Device::run(call);
  return call.out;
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mhc_post_mix_backward_op(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y, const at::Tensor& h_post,
    const at::Tensor& h_res) {
  auto call = prepare_mhc_mix(true, x, y, {}, h_post, h_res, grad);
  Device::run(call);
  return {call.out, call.grad_y, call.grad_h_post, call.grad_h_res};
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mhc_mappings_op(
    const at::Tensor& proj, const at::Tensor& alpha_pre, const at::Tensor& alpha_post,
    const at::Tensor& alpha_res, const at::Tensor& b_pre, const at::Tensor& b_post,
    const at::Tensor& b_res, int64_t iters, double eps, c10::string_view variant) {
  auto call = prepare_mhc_mappings(false, proj,
                                   {alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res},
                                   iters, eps, variant);
  Device::run(call);
  return {call.pre, call.post, call.res};
}

// (dL/dproj, the six weights' gradients flattened).
using MappingsGrads = std::tuple<at::Tensor, at::Tensor>;

template <typename Device>
MappingsGrads mhc_mappings_backward_op(
    const c10::optional<at::Tensor>& grad_pre, const c10::optional<at::Tensor>& grad_post,
    const c10::optional<at::Tensor>& grad_res, const at::Tensor& proj,
    const at::Tensor& alpha_pre, const at::Tensor& alpha_post, const at::Tensor& alpha_res,
    const at::Tensor& b_pre, const at::Tensor& b_post, const at::Tensor& b_res, int64_t iters,
    double eps, c10::string_view variant) {
  auto call = prepare_mhc_mappings(
      true, proj, {alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res}, iters, eps, variant,
      grad_pre.value_or(at::Tensor()), grad_post.value_or(at::Tensor()),
      grad_res.value_or(at::Tensor()));
  Device::run(call);
  return std::make_tuple(call.grad_proj, mappings_weight_grads(call));
}

// Registers the ten operators for one dispatch key with Device's kernels.
template <typename Device>
void register_mhc_ops(torch::Library& m) {
  m.impl("mhc_sinkhorn", &mhc_sinkhorn_op<Device>);
  m.impl("mhc_sinkhorn_backward", &mhc_sinkhorn_backward_op<Device>);
  m.impl("mhc_v4_sinkhorn", &mhc_v4_sinkhorn_op<Device>);
  m.impl("mhc_v4_sinkhorn_backward", &mhc_v4_sinkhorn_backward_op<Device>);
  m.impl("mhc_pre_mix", &mhc_pre_mix_op<Device>);
  m.impl("mhc_pre_mix_backward", &mhc_pre_mix_backward_op<Device>);
  m.impl("mhc_post_mix", &mhc_post_mix_op<Device>);
  m.impl("mhc_post_mix_backward", &mhc_post_mix_backward_op<Device>);
  m.impl("mhc_mappings", &mhc_mappings_op<Device>);
  m.impl("mhc_mappings_backward", &mhc_mappings_backward_op<Device>);
}

}  // namespace detail
}  // namespace sinkhorn_ops
