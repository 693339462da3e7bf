// The CPU forward and backward solvers built for the baseline ISA of the build (SSE2 on x86-64).
#include "forward_isa.h"
#include "isa_prelude.h"
#include "backward_solver.h"
#include "solver.h"

namespace sinkhorn_ops {
namespace cpu {
void forward_default(const sinkhorn::FwdParams& p, at::ScalarType dtype) {
  forward_any(p, dtype);
}
void backward_default(const sinkhorn::BwdParams& q, at::ScalarType dtype) {
  backward_any(q, dtype);
}
}  // namespace cpu
}  // namespace sinkhorn_ops
