// Defines forward_<SK_ISA>, backward_<SK_ISA>, mhc_v4_<SK_ISA>, mhc_mix_<SK_ISA> and
// mhc_mappings_<SK_ISA>, the entry
// points of one per-ISA build of the CPU kernels (forward_*.cpp). Where SK_ISA_BUILT is not
// set (an ISA this architecture lacks), they forward to the baseline build instead. Include once, after the #pragma GCC target.
#include "isa_prelude.h"
#if SK_ISA_BUILT
#include "backward_solver.h"
#include "mhc_mappings.h"
#include "mhc_mix.h"
#include "mhc_v4.h"
#include "solver.h"
#endif

#define SK_PASTE2(a, b) a##b
#define SK_PASTE(a, b) SK_PASTE2(a, b)

namespace sinkhorn_ops {
namespace cpu {

void SK_PASTE(forward_, SK_ISA)(const sinkhorn::FwdParams& p, at::ScalarType dtype) {
#if SK_ISA_BUILT
  forward_any(p, dtype);
#else
  forward_default(p, dtype);
#endif
}

void SK_PASTE(backward_, SK_ISA)(const sinkhorn::BwdParams& q, at::ScalarType dtype) {
#if SK_ISA_BUILT
  backward_any(q, dtype);
#else
  backward_default(q, dtype);
#endif
}

void SK_PASTE(mhc_v4_, SK_ISA)(const sinkhorn::V4Params& p) {
#if SK_ISA_BUILT
  mhc_v4_any(p);
#else
  mhc_v4_default(p);
#endif
}

void SK_PASTE(mhc_mix_, SK_ISA)(const sinkhorn::MixParams& p, at::ScalarType dtype) {
#if SK_ISA_BUILT
  mhc_mix_any(p, dtype);
#else
  mhc_mix_default(p, dtype);
#endif
}

void SK_PASTE(mhc_mappings_, SK_ISA)(const sinkhorn::MappingsParams& p) {
#if SK_ISA_BUILT
  mhc_mappings_any(p);
#else
  mhc_mappings_default(p);
#endif
}

}  // namespace cpu
}  // namespace sinkhorn_ops
