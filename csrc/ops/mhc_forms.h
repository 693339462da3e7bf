// The mHC operators' differentiable ATen forms (mhc_forms.cpp): the formulas each fused kernel
// computes (MATH.md section 4, mhc.py's docstrings), in out-of-place ATen ops that autograd and
// forward-mode AD go through. The forward forms serve forward-mode AD; the backward forms (the
// gradients of a forward form, with create_graph) serve second order, through the backward
// operators' nodes (mhc_autograd.cpp). Each takes the operator's own arguments and returns its
// outputs in the operator's layout.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace sinkhorn_ops {
namespace forms {

using T = const at::Tensor&;
using TensorList = std::vector<at::Tensor>;

// H = Sinkhorn-Knopp of the paper: the log-domain operator with 2 iters steps from the columns.
at::Tensor paper_sinkhorn(T logits, int64_t iters);
// Its backward: the unrolled backward's ATen form.
at::Tensor paper_sinkhorn_backward(T grad, T logits, int64_t iters);

// comb of DeepSeek-V4 (mhc.py mhc_v4_sinkhorn's loop).
at::Tensor v4_sinkhorn(T logits, int64_t iters, double eps);
// H_pre x (mhc_pre_mix) and H_res x + H_post^T y (mhc_post_mix), accumulated in the Sinkhorn
// dtype and rounded once to x's.
at::Tensor pre_mix(T x, T h_pre);
at::Tensor post_mix(T x, T y, T h_post, T h_res);
// (H_pre, H_post, H_res) of the projections (mhc_mappings) and of the streams (mhc_coefficients:
// RMSNorm(x) [phi_pre | phi_post | phi_res], then the mappings); w: the six weights.
TensorList mappings(T proj, const TensorList& w, int64_t iters, double eps,
                    const std::string& variant);
TensorList coefficients(T x, const TensorList& phi, const TensorList& w, double norm_eps,
                        int64_t iters, double eps, const std::string& variant);

// The gradients of outs (given grads, undefined for none) with respect to ins: the backward
// forms, differentiable with create_graph. ins must come from tracked(); an input no output
// reaches gets zeros. A tangent on an input or a grad (forward mode) carries through.
TensorList gradients(const TensorList& outs, const TensorList& ins, const TensorList& grads,
                     bool create_graph);
// Whether a form's result on args is recorded (grad mode on and an argument requires grad): its
// gradients' create_graph.
bool recorded(const TensorList& args);
// A fresh handle on an input for gradients(): a view of it if it requires grad (the gradient
// then stays differentiable, and counts only the paths through this handle, not those through
// another input's history to the same tensor), else a leaf copy; with its forward-mode tangent,
// if any.
at::Tensor tracked(T t);

}  // namespace forms
}  // namespace sinkhorn_ops
