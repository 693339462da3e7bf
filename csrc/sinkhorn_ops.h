// Public C++ API of sinkhorn_ops: at::Tensor in, at::Tensor out, the same semantics as the
// Python entry points sinkhorn_ops.sinkhorn (MATH.md section 1) and the mHC pieces (section 4).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <tuple>

namespace sinkhorn_ops {

struct SinkhornOptions {
  c10::optional<at::Tensor> a;     // (..., n) row marginals, broadcast; default: see MATH.md
  c10::optional<at::Tensor> b;     // (..., m) column marginals, broadcast
  c10::optional<at::Tensor> mask;  // bool, broadcast to scores, true = keep
  int64_t steps = 100;             // normalisations (half-iterations)
  std::string start = "row";       // "row" or "col": the axis of the first step
  double tol = 0.0;                // > 0: per-problem early stop on the unfixed marginal
  // Backward (MATH.md section 2): "unrolled" (the exact gradient of the steps run), "implicit"
  // (fixed point; dense solve for min(n, m) <= 256, else conjugate gradients), "implicit_dense"
  // or "implicit_cg" to force a solver; cg_tol and cg_max_iter bound the CG iteration.
  std::string grad = "unrolled";
  double cg_tol = 1e-6;
  int64_t cg_max_iter = 100;
  // A warm start (MATH.md section 1): the potentials to start from instead of zeros, f0
  // broadcastable to (..., n), g0 to (..., m), in sinkhorn()'s convention P = exp(S + f + g);
  // differentiable through autograd (sinkhorn_warm.cpp).
  c10::optional<at::Tensor> f0, g0;
};

struct SinkhornResult {
  at::Tensor plan;   // (..., n, m), the scores' dtype
  at::Tensor f;      // (..., n), accumulation dtype (float64 for float64, else float32)
  at::Tensor g;      // (..., m), accumulation dtype
  at::Tensor steps;  // (...), int64: steps run per problem
  at::Tensor error;  // (...), L1 error of the marginal the last step did not fix
};

struct SinkhornGrads {
  at::Tensor scores;  // dL/dS, the scores' shape and dtype
  at::Tensor a;       // dL/da, (..., n) broadcast shape, accumulation dtype
  at::Tensor b;       // dL/db, (..., m)
};

// Solves every problem in the batch of scores (..., n, m) through the dispatcher (CPU or CUDA).
// The operator carries its autograd (csrc/ops/sinkhorn_autograd.cpp): with scores, a or b
// requiring grad, plan, f and g differentiate by options.grad's backward (steps and error do
// not), as in Python; differentiating that gradient again raises c10::NotImplementedError.
SinkhornResult sinkhorn(const at::Tensor& scores, const SinkhornOptions& options = {});

// The backward of that call (options.grad chooses the mode) given dL/dP and optionally dL/df,
// dL/dg. dL/da and dL/db are meaningful only along changes with sum(da) = sum(db).
SinkhornGrads sinkhorn_backward(const at::Tensor& scores, const SinkhornOptions& options,
                                const SinkhornResult& forward, const at::Tensor& grad_plan,
                                const c10::optional<at::Tensor>& grad_f = c10::nullopt,
                                const c10::optional<at::Tensor>& grad_g = c10::nullopt);

// mHC (MATH.md section 4). Each operator below carries its autograd (csrc/ops/mhc_autograd.cpp):
// called on tensors that require grad, its result differentiates through the backward declared
// next to it, and differentiating that gradient again raises c10::NotImplementedError. The
// backwards can also be called directly, as sinkhorn_backward can.

// The mHC paper's Sinkhorn-Knopp (MATH.md section 1 table) of logits (..., n, n), float32 or
// float64, n <= 8, 1 <= iters <= 32: iters column and row normalisations of exp(logits), the
// same as sinkhorn() with steps = 2 iters, start = "col", in one fused kernel.
at::Tensor mhc_sinkhorn(const at::Tensor& logits, int64_t iters = 20);
// dL/dlogits given dL/dH_res (the unrolled gradient of the iterations).
at::Tensor mhc_sinkhorn_backward(const at::Tensor& grad, const at::Tensor& logits,
                                 int64_t iters = 20);

// DeepSeek-V4's Sinkhorn (MATH.md section 1 table) of logits (..., n, n), float32 or float64,
// n <= 8, 1 <= iters <= 32, eps > 0: comb, not transposed.
at::Tensor mhc_v4_sinkhorn(const at::Tensor& logits, int64_t iters = 20, double eps = 1e-6);
// dL/dlogits given dL/dcomb (the unrolled gradient of the iterations).
at::Tensor mhc_v4_sinkhorn_backward(const at::Tensor& grad, const at::Tensor& logits,
                                    int64_t iters = 20, double eps = 1e-6);

// The stream mixings, x (..., n, C) in any floating dtype, n <= 8, the mappings in the
// accumulation dtype with x's leading dimensions: the branch input H_pre x, (..., C), and
// x_{l+1} = H_res x + H_post^T y, (..., n, C), for the branch output y (..., C).
at::Tensor mhc_pre_mix(const at::Tensor& x, const at::Tensor& h_pre);
at::Tensor mhc_post_mix(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h_post,
                        const at::Tensor& h_res);

struct PreMixGrads {
  at::Tensor x, h_pre;
};
struct PostMixGrads {
  at::Tensor x, y, h_post, h_res;
};
// Their backwards given dL/d(output).
PreMixGrads mhc_pre_mix_backward(const at::Tensor& grad, const at::Tensor& x,
                                 const at::Tensor& h_pre);
PostMixGrads mhc_post_mix_backward(const at::Tensor& grad, const at::Tensor& x,
                                   const at::Tensor& y, const at::Tensor& h_post,
                                   const at::Tensor& h_res);

// RMSNorm(x) phi without the norm's weight, (x phi) / sqrt(mean(x^2) + eps) over x's last
// dimension: x (..., D), phi (D, K), computed in phi's dtype; x is saved for the backward as it
// came. Differentiable (twice).
at::Tensor rms_projection(const at::Tensor& x, const at::Tensor& phi, double eps = 1e-6);

// mHC's per-token mappings from the normalised projections proj = RMSNorm(x) phi, (..., 2n + n^2)
// laid out [pre (n) | post (n) | res (n x n)], float32 or float64, n <= 8, 1 <= iters <= 32:
//   H_pre = sigmoid(alpha_pre proj_pre + b_pre) (+ eps for "v4"), (..., n);
//   H_post = 2 sigmoid(alpha_post proj_post + b_post), (..., n);
//   H_res = Sinkhorn(alpha_res mat(proj_res) + b_res), (..., n, n): mhc_sinkhorn's for
//   variant "paper", DeepSeek-V4's comb^T (mhc_v4_sinkhorn, eps) for "v4".
// The weights (gates of one value each, b_pre (n), b_post (n), b_res (n, n)) are in proj's
// dtype, on its device.
struct MHCWeights {
  at::Tensor alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res;
};
struct MHCMappings {
  at::Tensor pre, post, res;
};
MHCMappings mhc_mappings(const at::Tensor& proj, const MHCWeights& weights, int64_t iters = 20,
                         double eps = 1e-6, c10::string_view variant = "paper");

struct MHCMappingsGrads {
  at::Tensor proj, alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res;
};
// Its backward given dL/dH_pre, dL/dH_post, dL/dH_res (nullopt: zeros). The six weights'
// gradients are views of one tensor (the operator's grad_weights), as cuDNN's RNN weight
// gradients are views of one buffer: one storage and one version counter, so an in-place change
// to one of them also bumps the others' versions.
MHCMappingsGrads mhc_mappings_backward(const c10::optional<at::Tensor>& grad_pre,
                                       const c10::optional<at::Tensor>& grad_post,
                                       const c10::optional<at::Tensor>& grad_res,
                                       const at::Tensor& proj, const MHCWeights& weights,
                                       int64_t iters = 20, double eps = 1e-6,
                                       c10::string_view variant = "paper");

// mHC's coefficients from the streams x (..., D), D = nC, of any floating dtype no wider than
// phi's: mhc_mappings of proj = RMSNorm(x) [phi_pre | phi_post | phi_res] (no norm weight;
// rms_projection's), with the norm's statistic folded into the mappings kernel (two ATen ops and
// one kernel; the backward a kernel, a reduction and two matmuls). phi_pre (D, n),
// phi_post (D, n), phi_res (D, n^2) and the weights in float32 or float64, the dtype everything
// computes in (x is converted, a transient copy); norm_eps > 0. Also returns the raw projections
// x phi (..., 2n + n^2) and the norms ||x|| (...), which the backward takes back.
struct MHCProjections {
  at::Tensor pre, post, res;
};
struct MHCCoefficients {
  at::Tensor pre, post, res, proj, norm;
};
MHCCoefficients mhc_coefficients(const at::Tensor& x, const MHCProjections& phi,
                                 const MHCWeights& weights, double norm_eps = 1e-6,
                                 int64_t iters = 20, double eps = 1e-6,
                                 c10::string_view variant = "paper");

struct MHCCoefficientsGrads {
  at::Tensor x, phi_pre, phi_post, phi_res, alpha_pre, alpha_post, alpha_res, b_pre, b_post,
      b_res;
};
// Its backward given dL/dH_pre, dL/dH_post, dL/dH_res (nullopt: zeros) and the forward's proj and
// norm. dL/dx comes in x's shape and dtype; the three phi's gradients are column views of one
// (D, 2n + n^2) tensor, and the six weights' gradients views of another, as
// mhc_mappings_backward's are.
MHCCoefficientsGrads mhc_coefficients_backward(
    const c10::optional<at::Tensor>& grad_pre, const c10::optional<at::Tensor>& grad_post,
    const c10::optional<at::Tensor>& grad_res, const at::Tensor& x, const MHCProjections& phi,
    const at::Tensor& proj, const at::Tensor& norm, const MHCWeights& weights,
    double norm_eps = 1e-6, int64_t iters = 20, double eps = 1e-6,
    c10::string_view variant = "paper");

namespace detail {
// The backward operators' own results: dL/dproj (dL/dx and dL/d[phi_pre | phi_post | phi_res])
// and the six weights' gradients flattened in the weights' order (3 + 2n + n^2 values).
std::tuple<at::Tensor, at::Tensor> mhc_mappings_backward_flat(
    const c10::optional<at::Tensor>& grad_pre, const c10::optional<at::Tensor>& grad_post,
    const c10::optional<at::Tensor>& grad_res, const at::Tensor& proj, const MHCWeights& weights,
    int64_t iters, double eps, c10::string_view variant);
// (grad_x, grad_phi, grad_weights false: that result is not computed, an empty tensor.)
std::tuple<at::Tensor, at::Tensor, at::Tensor> mhc_coefficients_backward_flat(
    const c10::optional<at::Tensor>& grad_pre, const c10::optional<at::Tensor>& grad_post,
    const c10::optional<at::Tensor>& grad_res, const at::Tensor& x, const MHCProjections& phi,
    const at::Tensor& proj, const at::Tensor& norm, const MHCWeights& weights, double norm_eps,
    int64_t iters, double eps, c10::string_view variant, bool grad_x = true,
    bool grad_phi = true, bool grad_weights = true);
// The three phi's gradients as column views of their (D, 2n + n^2) matmul.
std::array<at::Tensor, 3> split_phi_grads(const at::Tensor& dphi, const MHCProjections& phi);
// The six weights' gradients as views of their flat sum, in the weights' shapes (symbolic sizes,
// for dynamic-shape compilation).
std::array<at::Tensor, 6> split_weight_grads(const at::Tensor& flat, const MHCWeights& weights);
}  // namespace detail

}  // namespace sinkhorn_ops
