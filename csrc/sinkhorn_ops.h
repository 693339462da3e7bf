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
};

struct SinkhornResult {
  at::Tensor plan;   // (..., n, m), the scores' dtype
  at::Tensor f;      // (..., n), accumulation dtype (float64 for float64, else float32)
  at::Tensor g;      // (..., m), accumulation dtype
  at::Tensor steps;  // (...), int64: steps run per problem
  at::Tensor error;  // (...), L1 error of the marginal the last step did not fix
};

// Solves every problem in the batch of scores (..., n, m) through the dispatcher (CPU or CUDA).
SinkhornResult sinkhorn(const at::Tensor& scores, const SinkhornOptions& options = {});

}  // namespace sinkhorn_ops
