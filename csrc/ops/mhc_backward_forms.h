// The mHC backward operators' Forms (form_node.h): their second order (a FormNode differentiates
// the form) and forward mode (forward over reverse: the form carries the tangents), through the
// ATen forms of mhc_forms.h. Each form takes the backward operator's tensor arguments and
// returns its outputs in its layout.
#pragma once

#include <string>
#include <tuple>

#include "autograd_node.h"
#include "mhc_forms.h"

namespace sinkhorn_ops {
namespace autograd {
namespace mhc {

using forms::tracked;

// The tensors first .. first + count - 1 of g, flattened or not.
inline variable_list slice(const variable_list& g, size_t first, size_t count, bool flatten) {
  variable_list parts;
  for (size_t i = first; i < first + count; ++i) parts.push_back(flatten ? g[i].reshape(-1) : g[i]);
  return parts;
}

// A form without options.
struct WithoutOptions {
  struct Options {};
  template <typename O>
  static auto tie(O&) {
    return std::tuple<>();
  }
};

struct PaperForm {  // (grad, logits) -> dlogits
  struct Options {
    int64_t iters = 0;
  };
  template <typename O>
  static auto tie(O& o) {
    return std::tie(o.iters);
  }
  static constexpr const char* kName = "MhcSinkhornBackwardBackward";
  static constexpr size_t kDiff = 2;
  static variable_list form(const variable_list& x, const Options& o) {
    return {forms::paper_sinkhorn_backward(x[0], x[1], o.iters)};
  }
};

struct V4Form {  // (grad, logits) -> dlogits
  struct Options {
    int64_t iters = 0;
    double eps = 0;
  };
  template <typename O>
  static auto tie(O& o) {
    return std::tie(o.iters, o.eps);
  }
  static constexpr const char* kName = "MhcV4SinkhornBackwardBackward";
  static constexpr size_t kDiff = 2;
  static variable_list form(const variable_list& x, const Options& o) {
    const auto L = tracked(x[1]);
    return forms::gradients({forms::v4_sinkhorn(L, o.iters, o.eps)}, {L}, {x[0]},
                            forms::recorded(x));
  }
};

struct PreMixForm : WithoutOptions {  // (grad, x, h_pre) -> (dx, dh_pre)
  static constexpr const char* kName = "MhcPreMixBackwardBackward";
  static constexpr size_t kDiff = 3;
  static variable_list form(const variable_list& x, const Options&) {
    const auto xs = tracked(x[1]), h = tracked(x[2]);
    return forms::gradients({forms::pre_mix(xs, h)}, {xs, h}, {x[0]},
                            forms::recorded(x));
  }
};

struct PostMixForm : WithoutOptions {  // (grad, x, y, h_post, h_res) -> (dx, dy, dh_post, dh_res)
  static constexpr const char* kName = "MhcPostMixBackwardBackward";
  static constexpr size_t kDiff = 5;
  static variable_list form(const variable_list& x, const Options&) {
    variable_list in;
    for (size_t i = 1; i < 5; ++i) in.push_back(tracked(x[i]));
    return forms::gradients({forms::post_mix(in[0], in[1], in[2], in[3])}, in, {x[0]},
                            forms::recorded(x));
  }
};

// (grad_pre, grad_post, grad_res, proj, the six weights) -> (dproj, the weights' gradients
// flattened in their order). Its options are also the forward's node's (mhc_autograd.cpp).
struct MappingsForm {
  struct Options {
    int64_t iters = 0;
    double eps = 0;
    std::string variant;
  };
  template <typename O>
  static auto tie(O& o) {
    return std::tie(o.iters, o.eps, o.variant);
  }
  static constexpr const char* kName = "MhcMappingsBackwardBackward";
  static constexpr size_t kDiff = 10;
  static variable_list form(const variable_list& x, const Options& o) {
    variable_list in;
    for (size_t i = 3; i < 10; ++i) in.push_back(tracked(x[i]));
    const variable_list w(in.begin() + 1, in.end());
    const auto g = forms::gradients(forms::mappings(in[0], w, o.iters, o.eps, o.variant), in,
                                    {x[0], x[1], x[2]}, forms::recorded(x));
    return {g[0], at::cat(slice(g, 1, 6, true))};
  }
};

// (grad_pre, grad_post, grad_res, x, phi_pre, phi_post, phi_res, the six weights)
// -> (dx, d[phi_pre | phi_post | phi_res], the weights' gradients flattened), each an empty
// tensor unless the call asked for it. The form recomputes from x: the forward's proj and norm
// are not among its arguments.
struct CoefficientsForm {
  struct Options {
    double norm_eps = 0;
    int64_t iters = 0;
    double eps = 0;
    std::string variant;
    bool grad_x = true, grad_phi = true, grad_weights = true;
  };
  template <typename O>
  static auto tie(O& o) {
    return std::tie(o.norm_eps, o.iters, o.eps, o.variant, o.grad_x, o.grad_phi, o.grad_weights);
  }
  static constexpr const char* kName = "MhcCoefficientsBackwardBackward";
  static constexpr size_t kDiff = 13;
  static variable_list form(const variable_list& x, const Options& o) {
    variable_list in;
    for (size_t i = 3; i < 13; ++i) in.push_back(tracked(x[i]));
    const variable_list phi(in.begin() + 1, in.begin() + 4), w(in.begin() + 4, in.end());
    const auto g = forms::gradients(
        forms::coefficients(in[0], phi, w, o.norm_eps, o.iters, o.eps, o.variant), in,
        {x[0], x[1], x[2]}, forms::recorded(x));
    const auto none = x[3].new_empty({0});
    return {o.grad_x ? g[0] : none, o.grad_phi ? at::cat(slice(g, 1, 3, false), 1) : none,
            o.grad_weights ? at::cat(slice(g, 4, 6, true)) : none};
  }
};

}  // namespace mhc
}  // namespace autograd
}  // namespace sinkhorn_ops
