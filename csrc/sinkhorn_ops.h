// Public C++ API of sinkhorn_ops: at::Tensor in, at::Tensor out, the same semantics as the
// Python entry point sinkhorn_ops.sinkhorn (MATH.md section 1).
#pragma once

#include <ATen/ATen.h>

#include <string>

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
SinkhornResult sinkhorn(const at::Tensor& scores, const SinkhornOptions& options = {});

// The backward of that call (options.grad chooses the mode) given dL/dP and optionally dL/df,
// dL/dg. dL/da and dL/db are meaningful only along changes with sum(da) = sum(db).
SinkhornGrads sinkhorn_backward(const at::Tensor& scores, const SinkhornOptions& options,
                                const SinkhornResult& forward, const at::Tensor& grad_plan,
                                const c10::optional<at::Tensor>& grad_f = c10::nullopt,
                                const c10::optional<at::Tensor>& grad_g = c10::nullopt);

}  // namespace sinkhorn_ops
