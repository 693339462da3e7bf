// The C++ API of the mHC operators (sinkhorn_ops.h): calls through the dispatcher, so the CPU or
// CUDA kernel runs by the inputs' device.
#include "../sinkhorn_ops.h"
#include "typed_op.h"

namespace sinkhorn_ops {
using detail::typed_op;

at::Tensor mhc_sinkhorn(const at::Tensor& logits, int64_t iters) {
  static auto h = typed_op<at::Tensor(const at::Tensor&, int64_t)>("sinkhorn_ops::mhc_sinkhorn");
  return h.call(logits, iters);
}

at::Tensor mhc_sinkhorn_backward(const at::Tensor& grad, const at::Tensor& logits,
                                 int64_t iters) {
  static auto h = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>(
      "sinkhorn_ops::mhc_sinkhorn_backward");
  return h.call(grad, logits, iters);
}

at::Tensor mhc_v4_sinkhorn(const at::Tensor& logits, int64_t iters, double eps) {
  static auto h =
      typed_op<at::Tensor(const at::Tensor&, int64_t, double)>("sinkhorn_ops::mhc_v4_sinkhorn");
  return h.call(logits, iters, eps);
}

at::Tensor mhc_v4_sinkhorn_backward(const at::Tensor& grad, const at::Tensor& logits,
                                    int64_t iters, double eps) {
  static auto h = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double)>(
      "sinkhorn_ops::mhc_v4_sinkhorn_backward");
  return h.call(grad, logits, iters, eps);
}

at::Tensor mhc_pre_mix(const at::Tensor& x, const at::Tensor& h_pre) {
  static auto h =
      typed_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("sinkhorn_ops::mhc_pre_mix");
  return h.call(x, h_pre);
}

at::Tensor mhc_post_mix(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h_post,
                        const at::Tensor& h_res) {
  static auto h = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&)>("sinkhorn_ops::mhc_post_mix");
  return h.call(x, y, h_post, h_res);
}

PreMixGrads mhc_pre_mix_backward(const at::Tensor& grad, const at::Tensor& x,
                                 const at::Tensor& h_pre) {
  static auto h = typed_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&)>(
      "sinkhorn_ops::mhc_pre_mix_backward");
  auto [dx, dh] = h.call(grad, x, h_pre);
  return {dx, dh};
}

PostMixGrads mhc_post_mix_backward(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& y, const at::Tensor& h_post,
                                   const at::Tensor& h_res) {
  static auto h =
      typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
          const at::Tensor&)>("sinkhorn_ops::mhc_post_mix_backward");
  auto [dx, dy, dq, dr] = h.call(grad, x, y, h_post, h_res);
  return {dx, dy, dq, dr};
}

at::Tensor rms_projection(const at::Tensor& x, const at::Tensor& phi, double eps) {
  static auto h = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>(
      "sinkhorn_ops::rms_projection");
  return h.call(x, phi, eps);
}

MHCMappings mhc_mappings(const at::Tensor& proj, const MHCWeights& w, int64_t iters, double eps,
                         c10::string_view variant) {
  using R = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
  static auto h = typed_op<R(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, int64_t, double, c10::string_view)>(
      "sinkhorn_ops::mhc_mappings");
  auto [pre, post, res] = h.call(proj, w.alpha_pre, w.alpha_post, w.alpha_res, w.b_pre, w.b_post,
                                 w.b_res, iters, eps, variant);
  return {pre, post, res};
}

namespace detail {

std::tuple<at::Tensor, at::Tensor> mhc_mappings_backward_flat(
    const c10::optional<at::Tensor>& grad_pre, const c10::optional<at::Tensor>& grad_post,
    const c10::optional<at::Tensor>& grad_res, const at::Tensor& proj, const MHCWeights& w,
    int64_t iters, double eps, c10::string_view variant) {
  using T = const at::Tensor&;
  using O = const c10::optional<at::Tensor>&;
  using R = std::tuple<at::Tensor, at::Tensor>;
  static auto h = typed_op<R(O, O, O, T, T, T, T, T, T, T, int64_t, double, c10::string_view)>(
      "sinkhorn_ops::mhc_mappings_backward");
  return h.call(grad_pre, grad_post, grad_res, proj, w.alpha_pre, w.alpha_post, w.alpha_res,
                w.b_pre, w.b_post, w.b_res, iters, eps, variant);
}

}  // namespace detail

MHCMappingsGrads mhc_mappings_backward(const c10::optional<at::Tensor>& grad_pre,
                                       const c10::optional<at::Tensor>& grad_post,
                                       const c10::optional<at::Tensor>& grad_res,
                                       const at::Tensor& proj, const MHCWeights& w,
                                       int64_t iters, double eps, c10::string_view variant) {
  auto [dp, flat] =
      detail::mhc_mappings_backward_flat(grad_pre, grad_post, grad_res, proj, w, iters, eps,
                                         variant);
  const auto g = detail::split_weight_grads(flat, w);
  return {dp, g[0], g[1], g[2], g[3], g[4], g[5]};
}

MHCCoefficients mhc_coefficients(const at::Tensor& x, const MHCProjections& phi,
                                 const MHCWeights& w, double norm_eps, int64_t iters, double eps,
                                 c10::string_view variant) {
  using T = const at::Tensor&;
  using R = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  static auto h = typed_op<R(T, T, T, T, T, T, T, T, T, T, double, int64_t, double,
                             c10::string_view)>("sinkhorn_ops::mhc_coefficients");
  auto [pre, post, res, proj, norm] =
      h.call(x, phi.pre, phi.post, phi.res, w.alpha_pre, w.alpha_post, w.alpha_res, w.b_pre,
             w.b_post, w.b_res, norm_eps, iters, eps, variant);
  return {pre, post, res, proj, norm};
}

MHCCoefficientsGrads mhc_coefficients_backward(
    const c10::optional<at::Tensor>& grad_pre, const c10::optional<at::Tensor>& grad_post,
    const c10::optional<at::Tensor>& grad_res, const at::Tensor& x, const MHCProjections& phi,
    const at::Tensor& proj, const at::Tensor& norm, const MHCWeights& w, double norm_eps,
    int64_t iters, double eps, c10::string_view variant) {
  auto [dx, dphi, flat] = detail::mhc_coefficients_backward_flat(
      grad_pre, grad_post, grad_res, x, phi, proj, norm, w, norm_eps, iters, eps, variant);
  const auto g = detail::split_weight_grads(flat, w);
  const auto p = detail::split_phi_grads(dphi, phi);
  return {dx, p[0], p[1], p[2], g[0], g[1], g[2], g[3], g[4], g[5]};
}

namespace detail {

std::tuple<at::Tensor, at::Tensor, at::Tensor> mhc_coefficients_backward_flat(
    const c10::optional<at::Tensor>& grad_pre, const c10::optional<at::Tensor>& grad_post,
    const c10::optional<at::Tensor>& grad_res, const at::Tensor& x, const MHCProjections& phi,
    const at::Tensor& proj, const at::Tensor& norm, const MHCWeights& w, double norm_eps,
    int64_t iters, double eps, c10::string_view variant, bool grad_x, bool grad_phi,
    bool grad_weights) {
  using T = const at::Tensor&;
  using O = const c10::optional<at::Tensor>&;
  using R = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
  static auto h = typed_op<R(O, O, O, T, T, T, T, T, T, T, T, T, T, T, T, double, int64_t,
                             double, c10::string_view, bool, bool, bool)>(
      "sinkhorn_ops::mhc_coefficients_backward");
  return h.call(grad_pre, grad_post, grad_res, x, phi.pre, phi.post, phi.res, proj, norm,
                w.alpha_pre, w.alpha_post, w.alpha_res, w.b_pre, w.b_post, w.b_res, norm_eps,
                iters, eps, variant, grad_x, grad_phi, grad_weights);
}

std::array<at::Tensor, 3> split_phi_grads(const at::Tensor& dphi, const MHCProjections& phi) {
  // Column views of the one matmul (AccumulateGrad stores contiguous copies).
  const c10::SymInt a = phi.pre.sym_size(1), b = a + phi.post.sym_size(1);
  return {dphi.narrow_symint(1, 0, a), dphi.narrow_symint(1, a, phi.post.sym_size(1)),
          dphi.narrow_symint(1, b, phi.res.sym_size(1))};
}

std::array<at::Tensor, 6> split_weight_grads(const at::Tensor& flat, const MHCWeights& w) {
  // Views of the one sum, in the weights' order and shapes (the operator checked the shapes).
  // Symbolic sizes: under torch.compile with dynamic shapes the weights' may be.
  c10::SymInt offset = 0;
  auto next = [&](const at::Tensor& like) {
    at::Tensor t = flat.narrow_symint(0, offset, like.sym_numel()).view_symint(like.sym_sizes());
    offset += like.sym_numel();
    return t;
  };
  // One statement per view: the offsets must advance in the weights' order.
  std::array<at::Tensor, 6> g;
  g[0] = next(w.alpha_pre);
  g[1] = next(w.alpha_post);
  g[2] = next(w.alpha_res);
  g[3] = next(w.b_pre);
  g[4] = next(w.b_post);
  g[5] = next(w.b_res);
  return g;
}

}  // namespace detail

}  // namespace sinkhorn_ops
