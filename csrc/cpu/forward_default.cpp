// The CPU forward and backward solvers built for the baseline ISA of the build (SSE2 on x86-64).
#include "isa_prelude.h"
#define SK_ISA_BUILT 1
#define SK_ISA default
#include "isa_entry.h"
