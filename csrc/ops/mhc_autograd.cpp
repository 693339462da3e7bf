// Autograd of the mHC operators, registered in C++ on the Autograd key: the two fused Sinkhorns,
// the two stream mixings, the mappings and the coefficients differentiate from LibTorch as from
// Python, and a call records one C++ node (autograd_node.h) instead of going through Python's
// autograd.Function machinery (a host cost that bounds mHC's small calls on a GPU). Each
// forward's node saves its inputs and calls its backward operator; each backward operator runs
// below autograd. Second order and forward mode go through the operators' ATen forms
// (mhc_forms.h): a forward operator with a tangent returns its form; a backward operator's
// result records a FormNode, and with a tangent (forward over reverse, torch.func.hessian)
// returns its form (form_node.h, mhc_backward_forms.h).
#include <torch/library.h>

#include <algorithm>

#include "../sinkhorn_ops.h"
#include "form_node.h"
#include "mhc_backward_forms.h"
#include "mhc_forms.h"

namespace sinkhorn_ops {
namespace autograd {

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Quad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The backward operators (the C++ API's calls through the dispatcher, below autograd in
// form_backward_kernel), in the schemas' return types.
struct PaperBackward {
  static at::Tensor call(T grad, T logits, int64_t iters) {
    return mhc_sinkhorn_backward(grad, logits, iters);
  }
};
struct V4Backward {
  static at::Tensor call(T grad, T logits, int64_t iters, double eps) {
    return mhc_v4_sinkhorn_backward(grad, logits, iters, eps);
  }
};
struct PreMixBackward {
  static Pair call(T grad, T x, T h_pre) {
    const auto g = mhc_pre_mix_backward(grad, x, h_pre);
    return {g.x, g.h_pre};
  }
};
struct PostMixBackward {
  static Quad call(T grad, T x, T y, T h_post, T h_res) {
    const auto g = mhc_post_mix_backward(grad, x, y, h_post, h_res);
    return {g.x, g.y, g.h_post, g.h_res};
  }
};

// Each forward's node: its saved inputs and options, and the backward operator's call.
// The Sinkhorns: H = op(logits, iters[, eps]); dL/dlogits = backward(dL/dH, logits, ...).
struct MhcSinkhornBackward : NodeWith<MhcSinkhornBackward> {
  int64_t iters = 0;
  template <typename S>
  static auto options(S& n) {
    return std::tie(n.iters);
  }
  std::string name() const override { return "MhcSinkhornBackward"; }
  variable_list backward(variable_list& grad, const variable_list& s) override {
    if (!grad[0].defined()) return {Variable()};
    return {mhc_sinkhorn_backward(grad[0], s[0], iters)};
  }
};

struct MhcV4SinkhornBackward : NodeWith<MhcV4SinkhornBackward> {
  int64_t iters = 0;
  double eps = 0;
  template <typename S>
  static auto options(S& n) {
    return std::tie(n.iters, n.eps);
  }
  std::string name() const override { return "MhcV4SinkhornBackward"; }
  variable_list backward(variable_list& grad, const variable_list& s) override {
    if (!grad[0].defined()) return {Variable()};
    return {mhc_v4_sinkhorn_backward(grad[0], s[0], iters, eps)};
  }
};

// The mixings: every input is differentiable and saved.
struct MhcPreMixBackward : NodeWith<MhcPreMixBackward> {
  std::string name() const override { return "MhcPreMixBackward"; }
  variable_list backward(variable_list& grad, const variable_list& s) override {
    if (!grad[0].defined()) return {Variable(), Variable()};
    return as_list(PreMixBackward::call(grad[0], s[0], s[1]));
  }
};

struct MhcPostMixBackward : NodeWith<MhcPostMixBackward> {
  std::string name() const override { return "MhcPostMixBackward"; }
  variable_list backward(variable_list& grad, const variable_list& s) override {
    if (!grad[0].defined()) return variable_list(4);
    return as_list(PostMixBackward::call(grad[0], s[0], s[1], s[2], s[3]));
  }
};

// The mappings: H_pre, H_post, H_res = op(proj, the six weights, iters, eps, variant); every
// tensor input is differentiable and saved (proj is (..., 2n + n^2): small beside x).
MHCWeights weights_of(T a0, T a1, T a2, T b0, T b1, T b2) { return {a0, a1, a2, b0, b1, b2}; }

struct MappingsBackward {
  static std::tuple<at::Tensor, at::Tensor> call(Opt g_pre, Opt g_post, Opt g_res, T proj, T a0,
                                                 T a1, T a2, T b0, T b1, T b2, int64_t iters,
                                                 double eps, c10::string_view variant) {
    return detail::mhc_mappings_backward_flat(g_pre, g_post, g_res, proj,
                                              weights_of(a0, a1, a2, b0, b1, b2), iters, eps,
                                              variant);
  }
};

// An output left out of the loss reaches apply undefined, not as zeros: the kernel then skips
// its part (no Sinkhorn backward for an unused H_res) and gives it exact zeros.
struct MhcMappingsBackward : NodeWith<MhcMappingsBackward> {
  mhc::MappingsForm::Options o;
  template <typename S>
  static auto options(S& n) {
    return mhc::MappingsForm::tie(n.o);
  }
  std::string name() const override { return "MhcMappingsBackward"; }
  variable_list backward(variable_list& grad, const variable_list& s) override {
    if (!grad[0].defined() && !grad[1].defined() && !grad[2].defined()) return variable_list(7);
    const auto g = mhc_mappings_backward(present(grad[0]), present(grad[1]), present(grad[2]),
                                         s[0], weights_of(s[1], s[2], s[3], s[4], s[5], s[6]),
                                         o.iters, o.eps, o.variant);
    return {g.proj, g.alpha_pre, g.alpha_post, g.alpha_res, g.b_pre, g.b_post, g.b_res};
  }
};

// The coefficients: H_pre, H_post, H_res, proj, norm = op(x, phi_pre, phi_post, phi_res, the six
// weights, norm_eps, iters, eps, variant). proj and norm are saved for the backward and are not
// differentiable; x is saved as it came (the mixings save it too).
struct CoefficientsBackward {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> call(
      Opt g_pre, Opt g_post, Opt g_res, T x, T p0, T p1, T p2, T proj, T norm, T a0, T a1, T a2,
      T b0, T b1, T b2, double norm_eps, int64_t iters, double eps, c10::string_view variant,
      bool grad_x, bool grad_phi, bool grad_weights) {
    return detail::mhc_coefficients_backward_flat(g_pre, g_post, g_res, x, {p0, p1, p2}, proj,
                                                  norm, weights_of(a0, a1, a2, b0, b1, b2),
                                                  norm_eps, iters, eps, variant, grad_x, grad_phi,
                                                  grad_weights);
  }
};

struct MhcCoefficientsBackward : NodeWith<MhcCoefficientsBackward> {
  int64_t iters = 0;
  double eps = 0, norm_eps = 0;
  std::string variant;
  template <typename S>
  static auto options(S& n) {
    return std::tie(n.iters, n.eps, n.norm_eps, n.variant);
  }
  std::string name() const override { return "MhcCoefficientsBackward"; }
  variable_list backward(variable_list& grad, const variable_list& s) override {
    variable_list out(10);
    if (!grad[0].defined() && !grad[1].defined() && !grad[2].defined()) return out;
    // Only what is needed: frozen phi (fine-tuning) skips the (D, 2n + n^2) matmul, an x that
    // needs no gradient the (T, D) one.
    const bool need_x = needs_grad(0);
    const bool need_phi = needs_grad(1) || needs_grad(2) || needs_grad(3);
    bool need_weights = false;
    for (size_t i = 4; i < 10; ++i) need_weights = need_weights || needs_grad(i);
    const MHCProjections phi{s[1], s[2], s[3]};
    const MHCWeights weights = weights_of(s[6], s[7], s[8], s[9], s[10], s[11]);
    const auto [dx, dphi, flat] = detail::mhc_coefficients_backward_flat(
        present(grad[0]), present(grad[1]), present(grad[2]), s[0], phi, s[4], s[5], weights,
        norm_eps, iters, eps, variant, need_x, need_phi, need_weights);
    if (need_x) out[0] = dx;
    if (need_phi) {
      const auto p = detail::split_phi_grads(dphi, phi);
      std::copy(p.begin(), p.end(), out.begin() + 1);
    }
    if (need_weights) {
      const auto w = detail::split_weight_grads(flat, weights);
      std::copy(w.begin(), w.end(), out.begin() + 4);
    }
    return out;
  }
};

}  // namespace autograd
}  // namespace sinkhorn_ops

TORCH_LIBRARY_IMPL(sinkhorn_ops, Autograd, m) {
  using namespace sinkhorn_ops::autograd;
  namespace forms = sinkhorn_ops::forms;
  // Forward-mode AD: the operator's kernel (its checks, through the dispatcher: under torch.func
  // the arguments here can be wrappers that only the dispatcher reads), then its ATen form,
  // which carries the tangents.
  m.impl("mhc_sinkhorn", [](T logits, int64_t iters) {
    if (has_tangent({logits})) {
      below_autograd([&] { return sinkhorn_ops::mhc_sinkhorn(logits, iters); });
      return forms::paper_sinkhorn(logits, iters);
    }
    auto node = begin_node<MhcSinkhornBackward>("mhc_sinkhorn", {logits});
    auto h = below_autograd([&] { return sinkhorn_ops::mhc_sinkhorn(logits, iters); });
    if (node) {
      set_history(node, {h});
      node->save(logits);
      node->iters = iters;
    }
    return h;
  });
  m.impl("mhc_v4_sinkhorn", [](T logits, int64_t iters, double eps) {
    if (has_tangent({logits})) {
      below_autograd([&] { return sinkhorn_ops::mhc_v4_sinkhorn(logits, iters, eps); });
      return forms::v4_sinkhorn(logits, iters, eps);
    }
    auto node = begin_node<MhcV4SinkhornBackward>("mhc_v4_sinkhorn", {logits});
    auto h = below_autograd([&] { return sinkhorn_ops::mhc_v4_sinkhorn(logits, iters, eps); });
    if (node) {
      set_history(node, {h});
      node->save(logits);
      node->iters = iters;
      node->eps = eps;
    }
    return h;
  });
  m.impl("mhc_pre_mix", [](T x, T h_pre) {
    if (has_tangent({x, h_pre})) {
      below_autograd([&] { return sinkhorn_ops::mhc_pre_mix(x, h_pre); });
      return forms::pre_mix(x, h_pre);
    }
    auto node = begin_node<MhcPreMixBackward>("mhc_pre_mix", {x, h_pre});
    auto out = below_autograd([&] { return sinkhorn_ops::mhc_pre_mix(x, h_pre); });
    if (node) {
      set_history(node, {out});
      for (const auto& t : {x, h_pre}) node->save(t);
    }
    return out;
  });
  m.impl("mhc_post_mix", [](T x, T y, T h_post, T h_res) {
    if (has_tangent({x, y, h_post, h_res})) {
      below_autograd([&] { return sinkhorn_ops::mhc_post_mix(x, y, h_post, h_res); });
      return forms::post_mix(x, y, h_post, h_res);
    }
    auto node = begin_node<MhcPostMixBackward>("mhc_post_mix", {x, y, h_post, h_res});
    auto out = below_autograd([&] { return sinkhorn_ops::mhc_post_mix(x, y, h_post, h_res); });
    if (node) {
      set_history(node, {out});
      for (const auto& t : {x, y, h_post, h_res}) node->save(t);
    }
    return out;
  });
  // The backward operators: their Forms (mhc_backward_forms.h).
  m.impl("mhc_sinkhorn_backward", [](T grad, T logits, int64_t iters) {
    return form_backward_kernel<mhc::PaperForm>(
        "mhc_sinkhorn", {grad, logits}, {}, {iters},
        [&] { return PaperBackward::call(grad, logits, iters); });
  });
  m.impl("mhc_v4_sinkhorn_backward", [](T grad, T logits, int64_t iters, double eps) {
    return form_backward_kernel<mhc::V4Form>(
        "mhc_v4_sinkhorn", {grad, logits}, {}, {iters, eps},
        [&] { return V4Backward::call(grad, logits, iters, eps); });
  });
  m.impl("mhc_pre_mix_backward", [](T grad, T x, T h_pre) {
    return form_backward_kernel<mhc::PreMixForm>(
        "mhc_pre_mix", {grad, x, h_pre}, {}, {},
        [&] { return PreMixBackward::call(grad, x, h_pre); });
  });
  m.impl("mhc_post_mix_backward", [](T grad, T x, T y, T h_post, T h_res) {
    return form_backward_kernel<mhc::PostMixForm>(
        "mhc_post_mix", {grad, x, y, h_post, h_res}, {}, {},
        [&] { return PostMixBackward::call(grad, x, y, h_post, h_res); });
  });
  m.impl("mhc_mappings", [](T proj, T a0, T a1, T a2, T b0, T b1, T b2, int64_t iters, double eps,
                            c10::string_view variant) {
    if (has_tangent({proj, a0, a1, a2, b0, b1, b2})) {
      below_autograd([&] {
        return sinkhorn_ops::mhc_mappings(proj, weights_of(a0, a1, a2, b0, b1, b2), iters, eps,
                                          variant);
      });
      const auto h =
          forms::mappings(proj, {a0, a1, a2, b0, b1, b2}, iters, eps, std::string(variant));
      return std::make_tuple(h[0], h[1], h[2]);
    }
    auto node = begin_node<MhcMappingsBackward>("mhc_mappings", {proj, a0, a1, a2, b0, b1, b2});
    auto m = below_autograd([&] {
      return sinkhorn_ops::mhc_mappings(proj, weights_of(a0, a1, a2, b0, b1, b2), iters, eps,
                                        variant);
    });
    if (node) {
      set_history(node, {m.pre, m.post, m.res});
      for (const auto& t : {proj, a0, a1, a2, b0, b1, b2}) node->save(t);
      node->o = {iters, eps, std::string(variant)};
    }
    return std::make_tuple(m.pre, m.post, m.res);
  });
  m.impl("mhc_mappings_backward", [](Opt g_pre, Opt g_post, Opt g_res, T proj, T a0, T a1, T a2,
                                     T b0, T b1, T b2, int64_t iters, double eps,
                                     c10::string_view variant) {
    const variable_list diff{g_pre.value_or(at::Tensor()), g_post.value_or(at::Tensor()),
                             g_res.value_or(at::Tensor()), proj, a0, a1, a2, b0, b1, b2};
    return form_backward_kernel<mhc::MappingsForm>(
        "mhc_mappings", diff, {}, {iters, eps, std::string(variant)}, [&] {
          return MappingsBackward::call(g_pre, g_post, g_res, proj, a0, a1, a2, b0, b1, b2, iters,
                                        eps, variant);
        });
  });
  m.impl("mhc_coefficients", [](T x, T p0, T p1, T p2, T a0, T a1, T a2, T b0, T b1, T b2,
                                double norm_eps, int64_t iters, double eps,
                                c10::string_view variant) {
    const std::vector<at::Tensor> inputs{x, p0, p1, p2, a0, a1, a2, b0, b1, b2};
    if (has_tangent(inputs)) {
      // proj and norm (not differentiable) from the kernel.
      const auto c = below_autograd([&] {
        return sinkhorn_ops::mhc_coefficients(x, {p0, p1, p2}, weights_of(a0, a1, a2, b0, b1, b2),
                                              norm_eps, iters, eps, variant);
      });
      const auto h = forms::coefficients(x, {p0, p1, p2}, {a0, a1, a2, b0, b1, b2}, norm_eps,
                                         iters, eps, std::string(variant));
      return std::make_tuple(h[0], h[1], h[2], c.proj, c.norm);
    }
    auto node = begin_node<MhcCoefficientsBackward>("mhc_coefficients", inputs);
    auto c = below_autograd([&] {
      return sinkhorn_ops::mhc_coefficients(x, {p0, p1, p2}, weights_of(a0, a1, a2, b0, b1, b2),
                                            norm_eps, iters, eps, variant);
    });
    if (node) {
      // proj and norm are not differentiable: no history.
      set_history(node, {c.pre, c.post, c.res});
      for (const auto& t : {x, p0, p1, p2, c.proj, c.norm, a0, a1, a2, b0, b1, b2}) node->save(t);
      node->norm_eps = norm_eps;
      node->iters = iters;
      node->eps = eps;
      node->variant = std::string(variant);
    }
    return std::make_tuple(c.pre, c.post, c.res, c.proj, c.norm);
  });
  m.impl("mhc_coefficients_backward",
         [](Opt g_pre, Opt g_post, Opt g_res, T x, T p0, T p1, T p2, T proj, T norm, T a0, T a1,
            T a2, T b0, T b1, T b2, double norm_eps, int64_t iters, double eps,
            c10::string_view variant, bool grad_x, bool grad_phi, bool grad_weights) {
           const variable_list diff{g_pre.value_or(at::Tensor()), g_post.value_or(at::Tensor()),
                                    g_res.value_or(at::Tensor()), x, p0, p1, p2, a0, a1, a2, b0,
                                    b1, b2};
           return form_backward_kernel<mhc::CoefficientsForm>(
               "mhc_coefficients", diff, {proj, norm},
               {norm_eps, iters, eps, std::string(variant), grad_x, grad_phi, grad_weights}, [&] {
                 return CoefficientsBackward::call(g_pre, g_post, g_res, x, p0, p1, p2, proj,
                                                   norm, a0, a1, a2, b0, b1, b2, norm_eps, iters,
                                                   eps, variant, grad_x, grad_phi, grad_weights);
               });
         });
}
