// Reciprocals of a few independent divisors at once, without the branch that `1.0f / d` costs in
// every thread.
//
// nvcc compiles the IEEE reciprocal of a float into a range test, a branch to a slow subroutine
// (zero, subnormal, huge, inf or NaN divisors) and, on the fast side, MUFU.RCP followed by one
// Newton step (two FFMAs around an FADD). Each division thus sits in its own branch region (BSSY
// / BSYNC in the SASS), and the mHC kernel's four divisions of a normalisation ran one after the
// other. Here one test covers all N divisors: when each lies in [2^-126, 2^126), where the fast
// side is exact, the N fast sequences run branch-free and interleaved; otherwise every divisor
// takes `1 / d`. The fast sequence is the compiler's own (the same MUFU.RCP, the Newton step's
// residual 1 - d r rounded once, which is the negation of the compiler's d r - 1), so the bits
// are those of `1.0f / d` on both sides.
#pragma once

namespace sinkhorn {
namespace dev {

// 1 / d for d in [2^-126, 2^126): the approximate reciprocal and one Newton step. Host
// compilation (the emulated kernels) takes the division, which it equals there.
__device__ __forceinline__ float reciprocal_in_range(float d) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  const float residual = __fmaf_rn(-d, r, 1.0f);
  return __fmaf_rn(r, residual, r);
#else
  return 1.0f / d;
#endif
}

// inv[a] = 1 / d[a] for a < N, bit for bit.
template <int N>
__device__ __forceinline__ void reciprocals(const float* d, float* inv) {
  bool in_range = true;
#pragma unroll
  for (int a = 0; a < N; ++a) in_range &= (d[a] >= 0x1p-126f) & (d[a] < 0x1p126f);  // NaN: false
  if (in_range) {
#pragma unroll
    for (int a = 0; a < N; ++a) inv[a] = reciprocal_in_range(d[a]);
  } else {
#pragma unroll
    for (int a = 0; a < N; ++a) inv[a] = 1.0f / d[a];
  }
}

// Double divisions keep the compiler's form.
template <int N>
__device__ __forceinline__ void reciprocals(const double* d, double* inv) {
#pragma unroll
  for (int a = 0; a < N; ++a) inv[a] = 1.0 / d[a];
}

}  // namespace dev
}  // namespace sinkhorn
