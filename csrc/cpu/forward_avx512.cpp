// The CPU forward and backward solvers built for AVX-512 (16 float lanes).
#include "forward_isa.h"
#include "isa_prelude.h"
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,prefer-vector-width=512")
#define SK_VEC_BYTES 64
#include "backward_solver.h"
#include "solver.h"

namespace sinkhorn_ops {
namespace cpu {
void forward_avx512(const sinkhorn::FwdParams& p, at::ScalarType dtype) {
  forward_any(p, dtype);
}
void backward_avx512(const sinkhorn::BwdParams& q, at::ScalarType dtype) {
  backward_any(q, dtype);
}
}  // namespace cpu
}  // namespace sinkhorn_ops
#else
namespace sinkhorn_ops {
namespace cpu {
void forward_avx512(const sinkhorn::FwdParams& p, at::ScalarType dtype) {
  forward_default(p, dtype);
}
void backward_avx512(const sinkhorn::BwdParams& q, at::ScalarType dtype) {
  backward_default(q, dtype);
}
}  // namespace cpu
}  // namespace sinkhorn_ops
#endif
