// The CPU forward and backward solvers built for AVX2 + FMA (8 float lanes).
#include "forward_isa.h"
#include "isa_prelude.h"
#if defined(__x86_64__)
#pragma GCC target("avx2,fma")
#define SK_VEC_BYTES 32
#include "backward_solver.h"
#include "solver.h"

namespace sinkhorn_ops {
namespace cpu {
void forward_avx2(const sinkhorn::FwdParams& p, at::ScalarType dtype) {
  forward_any(p, dtype);
}
void backward_avx2(const sinkhorn::BwdParams& q, at::ScalarType dtype) {
  backward_any(q, dtype);
}
}  // namespace cpu
}  // namespace sinkhorn_ops
#else
namespace sinkhorn_ops {
namespace cpu {
void forward_avx2(const sinkhorn::FwdParams& p, at::ScalarType dtype) {
  forward_default(p, dtype);
}
void backward_avx2(const sinkhorn::BwdParams& q, at::ScalarType dtype) {
  backward_default(q, dtype);
}
}  // namespace cpu
}  // namespace sinkhorn_ops
#endif
