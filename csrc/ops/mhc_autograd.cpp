// Autograd of the mHC operators, registered in C++ on the Autograd key: the two fused Sinkhorns,
// the two stream mixings, the mappings and the coefficients differentiate from LibTorch as from
// Python, and a call records one C++ node instead of going through Python's autograd.Function
// machinery (a host cost that bounds mHC's small calls on a GPU). Each forward saves its inputs
// and calls its backward operator; each backward operator runs below autograd, and
// differentiating it raises a clear NotImplementedError (no double backward).
#include <torch/library.h>

#include "../sinkhorn_ops.h"
#include "autograd_node.h"

namespace sinkhorn_ops {
namespace autograd {

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Quad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The backward operators (the C++ API's calls through the dispatcher, below autograd in
// BackwardNode), in the schemas' return types.
struct PaperBackward {
  static constexpr const char* name = "mhc_sinkhorn";
  static at::Tensor call(T grad, T logits, int64_t iters) {
    return mhc_sinkhorn_backward(grad, logits, iters);
  }
};
struct V4Backward {
  static constexpr const char* name = "mhc_v4_sinkhorn";
  static at::Tensor call(T grad, T logits, int64_t iters, double eps) {
    return mhc_v4_sinkhorn_backward(grad, logits, iters, eps);
  }
};
struct PreMixBackward {
  static constexpr const char* name = "mhc_pre_mix";
  static Pair call(T grad, T x, T h_pre) {
    const auto g = mhc_pre_mix_backward(grad, x, h_pre);
    return {g.x, g.h_pre};
  }
};
struct PostMixBackward {
  static constexpr const char* name = "mhc_post_mix";
  static Quad call(T grad, T x, T y, T h_post, T h_res) {
    const auto g = mhc_post_mix_backward(grad, x, y, h_post, h_res);
    return {g.x, g.y, g.h_post, g.h_res};
  }
};

// The Sinkhorns: H = op(logits, iters[, eps]); dL/dlogits = backward(dL/dH, logits, ...).
struct PaperSinkhorn : torch::autograd::Function<PaperSinkhorn> {
  static Variable forward(AutogradContext* ctx, const Variable& logits, int64_t iters) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({logits});
    ctx->saved_data["iters"] = iters;
    return mhc_sinkhorn(logits, iters);
  }
  static variable_list backward(AutogradContext* ctx, const variable_list& grad) {
    const auto logits = ctx->get_saved_variables()[0];
    return {mhc_sinkhorn_backward(grad[0], logits, ctx->saved_data["iters"].toInt()), Variable()};
  }
};

struct V4Sinkhorn : torch::autograd::Function<V4Sinkhorn> {
  static Variable forward(AutogradContext* ctx, const Variable& logits, int64_t iters,
                          double eps) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({logits});
    ctx->saved_data["iters"] = iters;
    ctx->saved_data["eps"] = eps;
    return mhc_v4_sinkhorn(logits, iters, eps);
  }
  static variable_list backward(AutogradContext* ctx, const variable_list& grad) {
    const auto logits = ctx->get_saved_variables()[0];
    return {mhc_v4_sinkhorn_backward(grad[0], logits, ctx->saved_data["iters"].toInt(),
                                     ctx->saved_data["eps"].toDouble()),
            Variable(), Variable()};
  }
};

// The mixings: every input is differentiable and saved.
struct PreMix : torch::autograd::Function<PreMix> {
  static Variable forward(AutogradContext* ctx, const Variable& x, const Variable& h_pre) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({x, h_pre});
    return mhc_pre_mix(x, h_pre);
  }
  static variable_list backward(AutogradContext* ctx, const variable_list& grad) {
    const auto s = ctx->get_saved_variables();
    return detail::as_list(PreMixBackward::call(grad[0], s[0], s[1]));
  }
};

struct PostMix : torch::autograd::Function<PostMix> {
  static Variable forward(AutogradContext* ctx, const Variable& x, const Variable& y,
                          const Variable& h_post, const Variable& h_res) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({x, y, h_post, h_res});
    return mhc_post_mix(x, y, h_post, h_res);
  }
  static variable_list backward(AutogradContext* ctx, const variable_list& grad) {
    const auto s = ctx->get_saved_variables();
    return detail::as_list(PostMixBackward::call(grad[0], s[0], s[1], s[2], s[3]));
  }
};

// The mappings: H_pre, H_post, H_res = op(proj, the six weights, iters, eps, variant); every
// tensor input is differentiable and saved (proj is (..., 2n + n^2): small beside x).
using Opt = const c10::optional<at::Tensor>&;

MHCWeights weights_of(T a0, T a1, T a2, T b0, T b1, T b2) { return {a0, a1, a2, b0, b1, b2}; }

struct MappingsBackward {
  static constexpr const char* name = "mhc_mappings";
  static std::tuple<at::Tensor, at::Tensor> call(Opt g_pre, Opt g_post, Opt g_res, T proj, T a0,
                                                 T a1, T a2, T b0, T b1, T b2, int64_t iters,
                                                 double eps, c10::string_view variant) {
    return detail::mhc_mappings_backward_flat(g_pre, g_post, g_res, proj,
                                              weights_of(a0, a1, a2, b0, b1, b2), iters, eps,
                                              variant);
  }
};

c10::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

struct Mappings : torch::autograd::Function<Mappings> {
  static variable_list forward(AutogradContext* ctx, const Variable& proj, const Variable& a0,
                               const Variable& a1, const Variable& a2, const Variable& b0,
                               const Variable& b1, const Variable& b2, int64_t iters, double eps,
                               const std::string& variant) {
    at::AutoDispatchBelowADInplaceOrView below;
    // An output left out of the loss reaches backward undefined, not as zeros: the kernel then
    // skips its part (no Sinkhorn backward for an unused H_res) and gives it exact zeros.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({proj, a0, a1, a2, b0, b1, b2});
    ctx->saved_data["iters"] = iters;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["variant"] = variant;
    const auto m = mhc_mappings(proj, weights_of(a0, a1, a2, b0, b1, b2), iters, eps, variant);
    return {m.pre, m.post, m.res};
  }
  static variable_list backward(AutogradContext* ctx, const variable_list& grad) {
    const auto s = ctx->get_saved_variables();
    const std::string variant = ctx->saved_data["variant"].toStringRef();
    const auto g = mhc_mappings_backward(
        defined_or_none(grad[0]), defined_or_none(grad[1]), defined_or_none(grad[2]), s[0],
        weights_of(s[1], s[2], s[3], s[4], s[5], s[6]), ctx->saved_data["iters"].toInt(),
        ctx->saved_data["eps"].toDouble(), variant);
    variable_list grads{g.proj, g.alpha_pre, g.alpha_post, g.alpha_res, g.b_pre, g.b_post, g.b_res};
    grads.insert(grads.end(), {Variable(), Variable(), Variable()});
    return grads;
  }
};

// The coefficients: H_pre, H_post, H_res, proj, norm = op(x, phi_pre, phi_post, phi_res, the six
// weights, norm_eps, iters, eps, variant). proj and norm are saved for the backward and are not
// differentiable; x is saved as it came (the mixings save it too).
struct CoefficientsBackward {
  static constexpr const char* name = "mhc_coefficients";
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> call(
      Opt g_pre, Opt g_post, Opt g_res, T x, T p0, T p1, T p2, T proj, T norm, T a0, T a1, T a2,
      T b0, T b1, T b2, double norm_eps, int64_t iters, double eps, c10::string_view variant) {
    return detail::mhc_coefficients_backward_flat(g_pre, g_post, g_res, x, {p0, p1, p2}, proj,
                                                  norm, weights_of(a0, a1, a2, b0, b1, b2),
                                                  norm_eps, iters, eps, variant);
  }
};

struct Coefficients : torch::autograd::Function<Coefficients> {
  static variable_list forward(AutogradContext* ctx, const Variable& x, const Variable& p0,
                               const Variable& p1, const Variable& p2, const Variable& a0,
                               const Variable& a1, const Variable& a2, const Variable& b0,
                               const Variable& b1, const Variable& b2, double norm_eps,
                               int64_t iters, double eps, const std::string& variant) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->set_materialize_grads(false);  // as Mappings: an unused output's part is skipped
    const auto c = mhc_coefficients(x, {p0, p1, p2}, weights_of(a0, a1, a2, b0, b1, b2),
                                    norm_eps, iters, eps, variant);
    ctx->mark_non_differentiable({c.proj, c.norm});
    ctx->save_for_backward({x, p0, p1, p2, c.proj, c.norm, a0, a1, a2, b0, b1, b2});
    ctx->saved_data["norm_eps"] = norm_eps;
    ctx->saved_data["iters"] = iters;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["variant"] = variant;
    return {c.pre, c.post, c.res, c.proj, c.norm};
  }
  static variable_list backward(AutogradContext* ctx, const variable_list& grad) {
    const auto s = ctx->get_saved_variables();
    const std::string variant = ctx->saved_data["variant"].toStringRef();
    const auto g = mhc_coefficients_backward(
        defined_or_none(grad[0]), defined_or_none(grad[1]), defined_or_none(grad[2]), s[0],
        {s[1], s[2], s[3]}, s[4], s[5], weights_of(s[6], s[7], s[8], s[9], s[10], s[11]),
        ctx->saved_data["norm_eps"].toDouble(), ctx->saved_data["iters"].toInt(),
        ctx->saved_data["eps"].toDouble(), variant);
    return {g.x,         g.phi_pre, g.phi_post, g.phi_res, g.alpha_pre, g.alpha_post,
            g.alpha_res, g.b_pre,   g.b_post,   g.b_res,   Variable(),  Variable(),
            Variable(),  Variable()};
  }
};

}  // namespace autograd
}  // namespace sinkhorn_ops

TORCH_LIBRARY_IMPL(sinkhorn_ops, Autograd, m) {
  using namespace sinkhorn_ops::autograd;
  using sinkhorn_ops::detail::backward_kernel;
  m.impl("mhc_sinkhorn", [](T logits, int64_t iters) {
    return PaperSinkhorn::apply(logits, iters);
  });
  m.impl("mhc_v4_sinkhorn", [](T logits, int64_t iters, double eps) {
    return V4Sinkhorn::apply(logits, iters, eps);
  });
  m.impl("mhc_pre_mix", [](T x, T h_pre) { return PreMix::apply(x, h_pre); });
  m.impl("mhc_post_mix", [](T x, T y, T h_post, T h_res) {
    return PostMix::apply(x, y, h_post, h_res);
  });
  m.impl("mhc_sinkhorn_backward", [](T grad, T logits, int64_t iters) {
    return backward_kernel<PaperBackward>(grad, logits, iters);
  });
  m.impl("mhc_v4_sinkhorn_backward", [](T grad, T logits, int64_t iters, double eps) {
    return backward_kernel<V4Backward>(grad, logits, iters, eps);
  });
  m.impl("mhc_pre_mix_backward", [](T grad, T x, T h_pre) {
    return backward_kernel<PreMixBackward>(grad, x, h_pre);
  });
  m.impl("mhc_post_mix_backward", [](T grad, T x, T y, T h_post, T h_res) {
    return backward_kernel<PostMixBackward>(grad, x, y, h_post, h_res);
  });
  m.impl("mhc_mappings", [](T proj, T a0, T a1, T a2, T b0, T b1, T b2, int64_t iters, double eps,
                            c10::string_view variant) {
    const auto r = Mappings::apply(proj, a0, a1, a2, b0, b1, b2, iters, eps, std::string(variant));
    return std::make_tuple(r[0], r[1], r[2]);
  });
  m.impl("mhc_mappings_backward", [](Opt g_pre, Opt g_post, Opt g_res, T proj, T a0, T a1, T a2,
                                     T b0, T b1, T b2, int64_t iters, double eps,
                                     c10::string_view variant) {
    return backward_kernel<MappingsBackward>(g_pre, g_post, g_res, proj, a0, a1, a2, b0, b1, b2,
                                             iters, eps, variant);
  });
  m.impl("mhc_coefficients", [](T x, T p0, T p1, T p2, T a0, T a1, T a2, T b0, T b1, T b2,
                                double norm_eps, int64_t iters, double eps,
                                c10::string_view variant) {
    const auto r = Coefficients::apply(x, p0, p1, p2, a0, a1, a2, b0, b1, b2, norm_eps, iters, eps,
                                       std::string(variant));
    return std::make_tuple(r[0], r[1], r[2], r[3], r[4]);
  });
  m.impl("mhc_coefficients_backward",
         [](Opt g_pre, Opt g_post, Opt g_res, T x, T p0, T p1, T p2, T proj, T norm, T a0, T a1,
            T a2, T b0, T b1, T b2, double norm_eps, int64_t iters, double eps,
            c10::string_view variant) {
           return backward_kernel<CoefficientsBackward>(g_pre, g_post, g_res, x, p0, p1, p2, proj,
                                                        norm, a0, a1, a2, b0, b1, b2, norm_eps,
                                                        iters, eps, variant);
         });
}
