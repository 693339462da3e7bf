// The CPU forward and backward solvers built for AVX2 + FMA + F16C (8 float lanes).
#include "isa_prelude.h"
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#define SK_VEC_BYTES 32
#define SK_F16C 1
#define SK_ISA_BUILT 1
#endif
#define SK_ISA avx2
#include "isa_entry.h"
