// The mHC operators' bodies (the two fused Sinkhorns, the stream mixings, the mappings and the
// coefficients, their backwards), shared by the CPU and CUDA registrations: the front door's
// checks, then Device::run(call), which launches the device's kernel on a checked call (a V4Call,
// a MixCall or a MappingsCall), then the outputs.
#pragma once

#include <torch/library.h>

#include <tuple>

#include "../mhc_mappings_math.h"
#include "arg_checks.h"
#include "mhc_coefficients.h"
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

// (H_pre, H_post, H_res, the raw projections x phi, the norms ||x||): the last two are what the
// backward needs, saved rather than recomputed.
using Coefficients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename Device>
Coefficients mhc_coefficients_op(const at::Tensor& x, const at::Tensor& phi_pre,
                                 const at::Tensor& phi_post, const at::Tensor& phi_res,
                                 const at::Tensor& alpha_pre, const at::Tensor& alpha_post,
                                 const at::Tensor& alpha_res, const at::Tensor& b_pre,
                                 const at::Tensor& b_post, const at::Tensor& b_res,
                                 double norm_eps, int64_t iters, double eps,
                                 c10::string_view variant) {
  const MappingsWeights weights{alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res};
  const auto in =
      prepare_coefficients("mhc_coefficients", x, {phi_pre, phi_post, phi_res}, weights, norm_eps);
  auto [proj, norm] = raw_projection(in);
  proj = proj.view(with(in.batch, {proj.size(1)}));
  norm = norm.view(in.batch);
  const FoldedNorm rms{"mhc_coefficients", norm, in.dim, norm_eps};
  auto call = prepare_mhc_mappings(false, proj, weights, iters, eps, variant, {}, {}, {}, &rms);
  Device::run(call);
  return {call.pre, call.post, call.res, proj, norm};
}

// (dL/dx, dL/d[phi_pre | phi_post | phi_res], the six weights' gradients flattened).
using CoefficientsGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

template <typename Device>
CoefficientsGrads mhc_coefficients_backward_op(
    const c10::optional<at::Tensor>& grad_pre, const c10::optional<at::Tensor>& grad_post,
    const c10::optional<at::Tensor>& grad_res, const at::Tensor& x, const at::Tensor& phi_pre,
    const at::Tensor& phi_post, const at::Tensor& phi_res, const at::Tensor& proj,
    const at::Tensor& norm, const at::Tensor& alpha_pre, const at::Tensor& alpha_post,
    const at::Tensor& alpha_res, const at::Tensor& b_pre, const at::Tensor& b_post,
    const at::Tensor& b_res, double norm_eps, int64_t iters, double eps, c10::string_view variant,
    bool grad_x, bool grad_phi, bool grad_weights) {
  constexpr const char* op = "mhc_coefficients_backward";
  const MappingsWeights weights{alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res};
  const auto in = prepare_coefficients(op, x, {phi_pre, phi_post, phi_res}, weights, norm_eps);
  const int64_t K = sinkhorn::mappings::projections(b_res.size(0));
  TORCH_CHECK_TYPE(proj.scalar_type() == phi_pre.scalar_type(), op,
                   ": expected proj (the forward's raw projections) of phi's dtype ",
                   phi_pre.scalar_type(), ", got ", proj.scalar_type());
  TORCH_CHECK_VALUE(proj.sizes() == at::IntArrayRef(with(in.batch, {K})), op,
                    ": expected proj (the forward's raw projections) of shape ",
                    at::IntArrayRef(with(in.batch, {K})), ", got ", proj.sizes());
  const FoldedNorm rms{op, norm, in.dim, norm_eps};
  auto call = prepare_mhc_mappings(true, proj, weights, iters, eps, variant,
                                   grad_pre.value_or(at::Tensor()),
                                   grad_post.value_or(at::Tensor()),
                                   grad_res.value_or(at::Tensor()), &rms);
  Device::run(call);
  auto [dx, dphi] = coefficient_grads(in, x, call, grad_x, grad_phi);
  return {dx, dphi, grad_weights ? mappings_weight_grads(call) : proj.new_empty({0})};
}

// Registers the twelve operators for one dispatch key with Device's kernels.
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
  m.impl("mhc_coefficients", &mhc_coefficients_op<Device>);
  m.impl("mhc_coefficients_backward", &mhc_coefficients_backward_op<Device>);
}

}  // namespace detail
}  // namespace sinkhorn_ops
