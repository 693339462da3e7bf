// The operators' schemas, one definition for the library (sinkhorn_op.cpp) and for the
// emulated CUDA build of the tests (tests/emu), which registers the same operators under its own
// namespace.
#pragma once

#include <torch/library.h>

namespace sinkhorn_ops {
namespace detail {

inline void define_ops(torch::Library& m) {
  // grad, cg_tol, cg_max_iter choose the backward (MATH.md section 2) and do not change the
  // forward; they are arguments so that the autograd formula registered in Python sees them.
  m.def(
      "sinkhorn(Tensor scores, Tensor? a, Tensor? b, Tensor? mask, int steps, str start, "
      "float tol, str grad=\"unrolled\", float cg_tol=1e-6, int cg_max_iter=100) -> "
      "(Tensor plan, Tensor f, Tensor g, Tensor steps, Tensor error)",
      {at::Tag::pt2_compliant_tag});
  // The operator's run from the potentials (f0, g0) instead of zeros (a warm start), made of the
  // operator and ATen ops (sinkhorn_warm.cpp).
  m.def(
      "sinkhorn_warm(Tensor scores, Tensor? a, Tensor? b, Tensor? mask, Tensor? f0, Tensor? g0, "
      "int steps, str start, float tol, str grad=\"unrolled\", float cg_tol=1e-6, "
      "int cg_max_iter=100) -> (Tensor plan, Tensor f, Tensor g, Tensor steps, Tensor error)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "sinkhorn_backward_unrolled(Tensor grad_plan, Tensor? grad_f, Tensor? grad_g, "
      "Tensor scores, Tensor? a, Tensor? b, Tensor? mask, Tensor steps_used, int steps, "
      "str start) -> (Tensor grad_scores, Tensor grad_a, Tensor grad_b)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "sinkhorn_backward_implicit(Tensor grad_plan, Tensor? grad_f, Tensor? grad_g, "
      "Tensor plan, str solver, float cg_tol, int cg_max_iter) -> "
      "(Tensor grad_scores, Tensor grad_a, Tensor grad_b)",
      {at::Tag::pt2_compliant_tag});
  // The mHC paper's Sinkhorn (MATH.md section 1 table; column step first, iters column and row
  // steps) and its unrolled backward, fused for n <= 8: DeepSeek-V4's kernel on the transpose
  // with eps = 0, in the log domain for the problems the linear domain cannot take.
  m.def("mhc_sinkhorn(Tensor logits, int iters) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("mhc_sinkhorn_backward(Tensor grad, Tensor logits, int iters) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // DeepSeek-V4's linear-domain mHC Sinkhorn (MATH.md section 1 table) and its unrolled
  // backward (mhc_v4_math.h).
  m.def("mhc_v4_sinkhorn(Tensor logits, int iters, float eps) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("mhc_v4_sinkhorn_backward(Tensor grad, Tensor logits, int iters, float eps) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // mHC's stream mixings (MATH.md section 4, mhc_mix_math.h): the branch input H_pre x and
  // x_{l+1} = H_res x + H_post^T y, with their backwards.
  m.def("mhc_pre_mix(Tensor x, Tensor h_pre) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("mhc_pre_mix_backward(Tensor grad, Tensor x, Tensor h_pre) -> "
        "(Tensor grad_x, Tensor grad_h_pre)",
        {at::Tag::pt2_compliant_tag});
  m.def("mhc_post_mix(Tensor x, Tensor y, Tensor h_post, Tensor h_res) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("mhc_post_mix_backward(Tensor grad, Tensor x, Tensor y, Tensor h_post, Tensor h_res) -> "
        "(Tensor grad_x, Tensor grad_y, Tensor grad_h_post, Tensor grad_h_res)",
        {at::Tag::pt2_compliant_tag});
  // RMSNorm(x) phi without the norm's weight (mHC's coefficient projection, rms_projection.cpp).
  m.def("rms_projection(Tensor x, Tensor phi, float eps) -> Tensor", {at::Tag::pt2_compliant_tag});
  // mHC's per-token mappings (MATH.md section 4, mhc_mappings_math.h) from the normalised
  // projections proj = RMSNorm(x) phi, (..., 2n + n^2): H_pre, H_post and H_res (the paper's
  // Sinkhorn, or DeepSeek-V4's comb^T), and their backward.
  m.def("mhc_mappings(Tensor proj, Tensor alpha_pre, Tensor alpha_post, Tensor alpha_res, "
        "Tensor b_pre, Tensor b_post, Tensor b_res, int iters, float eps, str variant) -> "
        "(Tensor pre, Tensor post, Tensor res)",
        {at::Tag::pt2_compliant_tag});
  // The backward's grad_weights (3 + 2n + n^2): the gradients of alpha_pre, alpha_post,
  // alpha_res, b_pre, b_post and b_res, flattened in that order (one sum over the tokens for
  // all six; the C++ API's mhc_mappings_backward splits it).
  m.def("mhc_mappings_backward(Tensor? grad_pre, Tensor? grad_post, Tensor? grad_res, "
        "Tensor proj, Tensor alpha_pre, Tensor alpha_post, Tensor alpha_res, Tensor b_pre, "
        "Tensor b_post, Tensor b_res, int iters, float eps, str variant) -> "
        "(Tensor grad_proj, Tensor grad_weights)",
        {at::Tag::pt2_compliant_tag});
  // mHC's coefficients from the streams x (..., D = nC): RMSNorm(x) [phi_pre | phi_post |
  // phi_res] and the mappings, with the norm's statistic folded into the mappings kernel
  // (mhc_coefficients.h). proj (..., 2n + n^2) and norm (...) are the raw projections x phi and
  // the norms ||x||, outputs that the backward takes back. The backward's grad_phi is
  // (D, 2n + n^2), the three phi's gradients side by side (the C++ API splits it), and
  // grad_weights as mhc_mappings_backward's. grad_x, grad_phi, grad_weights False: that output is
  // not computed (an empty tensor), e.g. for frozen phi, or for x that needs no gradient.
  m.def("mhc_coefficients(Tensor x, Tensor phi_pre, Tensor phi_post, Tensor phi_res, "
        "Tensor alpha_pre, Tensor alpha_post, Tensor alpha_res, Tensor b_pre, Tensor b_post, "
        "Tensor b_res, float norm_eps, int iters, float eps, str variant) -> "
        "(Tensor pre, Tensor post, Tensor res, Tensor proj, Tensor norm)",
        {at::Tag::pt2_compliant_tag});
  m.def("mhc_coefficients_backward(Tensor? grad_pre, Tensor? grad_post, Tensor? grad_res, "
        "Tensor x, Tensor phi_pre, Tensor phi_post, Tensor phi_res, Tensor proj, Tensor norm, "
        "Tensor alpha_pre, Tensor alpha_post, Tensor alpha_res, Tensor b_pre, Tensor b_post, "
        "Tensor b_res, float norm_eps, int iters, float eps, str variant, bool grad_x=True, "
        "bool grad_phi=True, bool grad_weights=True) -> "
        "(Tensor grad_x, Tensor grad_phi, Tensor grad_weights)",
        {at::Tag::pt2_compliant_tag});
}

}  // namespace detail
}  // namespace sinkhorn_ops
