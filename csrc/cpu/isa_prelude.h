// Every header the per-ISA CPU code needs, included before any `#pragma GCC target`, so that
// library code (std, ATen) is compiled for the baseline ISA and only our loops for the target.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>  // the F16C conversions of vec_math.h (used under a target pragma only)
#endif

#include "../sinkhorn_math.h"
#include "../sinkhorn_params.h"
#include "forward_isa.h"
