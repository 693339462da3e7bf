// Autograd of the mHC operators, registered in C++ on the Autograd key: the two fused Sinkhorns
// and the two stream mixings differentiate from LibTorch as from Python, and a call records one
// C++ node instead of going through Python's autograd.Function machinery (a host cost that
// bounds mHC's small calls on a GPU). Each forward saves its inputs and calls its backward
// operator; each backward operator runs below autograd, and differentiating it raises a clear
// NotImplementedError (no double backward).
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "../sinkhorn_ops.h"

namespace sinkhorn_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

variable_list as_list(const at::Tensor& t) { return {t}; }
variable_list as_list(const PreMixGrads& g) { return {g.x, g.h_pre}; }
variable_list as_list(const PostMixGrads& g) { return {g.x, g.y, g.h_post, g.h_res}; }

// A backward operator (Op::call, named after its forward Op::name) as a node of its own: it runs
// below autograd, and its backward is the double-backward error.
template <typename Op>
struct Backward : torch::autograd::Function<Backward<Op>> {
  template <typename... Args>
  static variable_list forward(AutogradContext*, const Args&... args) {
    at::AutoDispatchBelowADInplaceOrView below;
    return as_list(Op::call(args...));
  }
  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, Op::name,
                                ": double backward (differentiating the gradient) is not "
                                "supported; compute second-order terms by finite differences of "
                                "the gradient instead");
  }
};

struct PaperBackward {
  static constexpr const char* name = "mhc_sinkhorn";
  static at::Tensor call(const at::Tensor& grad, const at::Tensor& logits, int64_t iters) {
    return mhc_sinkhorn_backward(grad, logits, iters);
  }
};
struct V4Backward {
  static constexpr const char* name = "mhc_v4_sinkhorn";
  static at::Tensor call(const at::Tensor& grad, const at::Tensor& logits, int64_t iters,
                         double eps) {
    return mhc_v4_sinkhorn_backward(grad, logits, iters, eps);
  }
};
struct PreMixBackward {
  static constexpr const char* name = "mhc_pre_mix";
  static PreMixGrads call(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& h_pre) {
    return mhc_pre_mix_backward(grad, x, h_pre);
  }
};
struct PostMixBackward {
  static constexpr const char* name = "mhc_post_mix";
  static PostMixGrads call(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                           const at::Tensor& h_post, const at::Tensor& h_res) {
    return mhc_post_mix_backward(grad, x, y, h_post, h_res);
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
    return as_list(mhc_pre_mix_backward(grad[0], s[0], s[1]));
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
    return as_list(mhc_post_mix_backward(grad[0], s[0], s[1], s[2], s[3]));
  }
};

template <typename Op, typename... Args>
std::tuple<at::Tensor, at::Tensor> pair_of(const Args&... args) {
  const auto r = Backward<Op>::apply(args...);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace sinkhorn_ops

TORCH_LIBRARY_IMPL(sinkhorn_ops, Autograd, m) {
  using namespace sinkhorn_ops;
  using T = const at::Tensor&;
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
    return Backward<PaperBackward>::apply(grad, logits, iters)[0];
  });
  m.impl("mhc_v4_sinkhorn_backward", [](T grad, T logits, int64_t iters, double eps) {
    return Backward<V4Backward>::apply(grad, logits, iters, eps)[0];
  });
  m.impl("mhc_pre_mix_backward", [](T grad, T x, T h_pre) {
    return pair_of<PreMixBackward>(grad, x, h_pre);
  });
  m.impl("mhc_post_mix_backward", [](T grad, T x, T y, T h_post, T h_res) {
    const auto r = Backward<PostMixBackward>::apply(grad, x, y, h_post, h_res);
    return std::make_tuple(r[0], r[1], r[2], r[3]);
  });
}
