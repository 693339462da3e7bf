// The CPU forward and backward solvers built for AVX-512 (16 float lanes).
#include "isa_prelude.h"
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,prefer-vector-width=512")
#define SK_VEC_BYTES 64
#define SK_F16C 1  // AVX-512F has the 16-lane half conversions
#define SK_ISA_BUILT 1
#endif
#define SK_ISA avx512
#include "isa_entry.h"
