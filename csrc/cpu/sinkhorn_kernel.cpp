// CPU registration of the Sinkhorn forward and unrolled backward operators and of the mHC ones
// (V4 Sinkhorn, stream mixings): checks at the front door, then the build for the best instruction set this processor
// has (forward_*.cpp).
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../ops/mhc_ops.h"
#include "../ops/sinkhorn_backward.h"
#include "forward_isa.h"

namespace sinkhorn_ops {
namespace cpu {
namespace {

using ForwardFn = void (*)(const sinkhorn::FwdParams&, at::ScalarType);
using BackwardFn = void (*)(const sinkhorn::BwdParams&, at::ScalarType);
using V4Fn = void (*)(const sinkhorn::V4Params&);
using MixFn = void (*)(const sinkhorn::MixParams&, at::ScalarType);
using MappingsFn = void (*)(const sinkhorn::MappingsParams&);

struct Kernels {
  ForwardFn forward;
  BackwardFn backward;
  V4Fn mhc_v4;
  MixFn mhc_mix;
  MappingsFn mhc_mappings;
};

bool cpu_has(const std::string& isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#endif
  return isa == "default";
}

// The best build this processor runs; SINKHORN_CPU_ISA=default|avx2|avx512 forces one (tests
// run every build that the machine supports).
Kernels best_kernels() {
  const char* forced = std::getenv("SINKHORN_CPU_ISA");
  const std::string isa = forced ? forced : "";
  TORCH_CHECK_VALUE(isa.empty() || isa == "default" || isa == "avx2" || isa == "avx512",
                    "sinkhorn: expected SINKHORN_CPU_ISA to be default, avx2 or avx512, got \"",
                    isa, "\"");
  TORCH_CHECK_VALUE(isa.empty() || cpu_has(isa), "sinkhorn: SINKHORN_CPU_ISA=", isa,
                    " asks for instructions this processor lacks");
  const Kernels fallback{&forward_default, &backward_default, &mhc_v4_default, &mhc_mix_default,
                         &mhc_mappings_default};
  if (isa == "default") return fallback;
  if (isa == "avx512" || (isa.empty() && cpu_has("avx512")))
    return {&forward_avx512, &backward_avx512, &mhc_v4_avx512, &mhc_mix_avx512,
            &mhc_mappings_avx512};
  if (isa == "avx2" || (isa.empty() && cpu_has("avx2")))
    return {&forward_avx2, &backward_avx2, &mhc_v4_avx2, &mhc_mix_avx2, &mhc_mappings_avx2};
  return fallback;
}

detail::ForwardResult sinkhorn_cpu(const at::Tensor& scores, const c10::optional<at::Tensor>& a,
                                   const c10::optional<at::Tensor>& b,
                                   const c10::optional<at::Tensor>& mask, int64_t steps,
                                   c10::string_view start, double tol, c10::string_view grad,
                                   double cg_tol, int64_t cg_max_iter) {
  detail::check_grad_options(grad, cg_tol, cg_max_iter);
  static const Kernels kernels = best_kernels();
  const auto problem = detail::prepare_forward(scores, a, b, mask, steps, start, tol);
  return detail::run_forward(problem, [&](const sinkhorn::FwdParams& params) {
    kernels.forward(params, problem.scores.scalar_type());
  });
}

detail::BackwardResult sinkhorn_backward_unrolled_cpu(
    const at::Tensor& grad_plan, const c10::optional<at::Tensor>& grad_f,
    const c10::optional<at::Tensor>& grad_g, const at::Tensor& scores,
    const c10::optional<at::Tensor>& a, const c10::optional<at::Tensor>& b,
    const c10::optional<at::Tensor>& mask, const at::Tensor& steps_used, int64_t steps,
    c10::string_view start) {
  static const Kernels kernels = best_kernels();
  const auto problem =
      detail::prepare_backward(grad_plan, grad_f, grad_g, scores, a, b, mask, steps_used, steps, start);
  if (detail::composite_backward_applies(problem, /*cpu=*/true))
    return detail::unrolled_backward_composite(problem);
  return detail::run_backward(problem, [&](const sinkhorn::BwdParams& params) {
    kernels.backward(params, problem.fwd.scores.scalar_type());
  });
}

// The mHC operators' kernels (detail::register_mhc_ops).
struct Cpu {
  static void run(const detail::V4Call& call) {
    static const Kernels kernels = best_kernels();
    kernels.mhc_v4(call.params);
  }
  static void run(const detail::MixCall& call) {
    static const Kernels kernels = best_kernels();
    kernels.mhc_mix(call.params, call.x.scalar_type());
  }
  static void run(const detail::MappingsCall& call) {
    static const Kernels kernels = best_kernels();
    kernels.mhc_mappings(call.params);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(sinkhorn_ops, CPU, m) {
  m.impl("sinkhorn", &sinkhorn_cpu);
  m.impl("sinkhorn_backward_unrolled", &sinkhorn_backward_unrolled_cpu);
  detail::register_mhc_ops<Cpu>(m);
}

}  // namespace cpu
}  // namespace sinkhorn_ops
