// Front door of the forward operator: argument checks (done once, here), flattening of the
// batch dimensions, output allocation and the plain params handed to a device kernel.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "../sinkhorn_params.h"

namespace sinkhorn_ops {
namespace detail {

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// One validated call, flattened to B problems of size n x m.
struct ForwardProblem {
  std::vector<int64_t> batch_shape;  // the leading dimensions of scores
  at::Tensor scores;                 // (B, n, m), contiguous
  at::Tensor log_a, log_b;           // (B, n), (B, m) in the accumulation type; undefined = default
  int64_t B = 0, n = 0, m = 0;
  int64_t steps = 0;
  bool start_row = true;
  double tol = 0.0;
};

// Accumulation dtype of a scores dtype: double for double, float otherwise.
at::ScalarType accumulation_type(at::ScalarType t);

// TypeError unless a marginal x is in the scores dtype or its accumulation dtype.
void check_marginal_dtype(const at::Tensor& x, const char* name, at::ScalarType scores);

// The kernels' element type of a scores dtype; TypeError for any other dtype.
sinkhorn::DType kernel_dtype(at::ScalarType t);

// Checks every argument and raises ValueError/TypeError naming the op, the argument, what was
// expected and what came. Never synchronises with the device.
ForwardProblem prepare_forward(const at::Tensor& scores, const c10::optional<at::Tensor>& a,
                               const c10::optional<at::Tensor>& b,
                               const c10::optional<at::Tensor>& mask, int64_t steps,
                               c10::string_view start, double tol);

// Checks the backward options that the forward op carries for its autograd formula.
void check_grad_options(c10::string_view grad, double cg_tol, int64_t cg_max_iter);

// Runs `kernel(params)` on freshly allocated outputs (skipped when there is nothing to do) and
// returns (plan, f, g, steps_used, error) in the caller's batch shape.
template <typename Kernel>
ForwardResult run_forward(const ForwardProblem& p, Kernel&& kernel);

// Implementation details of run_forward, shared by every device.
struct ForwardOutputs {
  at::Tensor plan, f, g, steps_used, error;
};
ForwardOutputs allocate_forward(const ForwardProblem& p);
// The kernels' params of a call; an output left undefined is passed as nullptr (the composite
// backward's replay on CUDA has no plan; a routing decision needs no output at all).
sinkhorn::FwdParams forward_params(const ForwardProblem& p, ForwardOutputs& out);
ForwardResult finish_forward(const ForwardProblem& p, ForwardOutputs& out);

template <typename Kernel>
ForwardResult run_forward(const ForwardProblem& p, Kernel&& kernel) {
  ForwardOutputs out = allocate_forward(p);
  if (p.B > 0) kernel(forward_params(p, out));
  return finish_forward(p, out);
}

}  // namespace detail
}  // namespace sinkhorn_ops
