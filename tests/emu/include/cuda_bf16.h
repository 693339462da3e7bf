// Emulated cuda_bf16.h (tests/emu): __nv_bfloat16 is c10::BFloat16 (same bits, round to nearest
// even).
#pragma once

#include <c10/util/BFloat16.h>

#include "cuda_runtime.h"

using __nv_bfloat16 = c10::BFloat16;
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }
