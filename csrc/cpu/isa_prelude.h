// Every header the per-ISA CPU code needs, included before any `#pragma GCC target`, so that
// library code (std, ATen) is compiled for the baseline ISA and only our loops for the target.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../sinkhorn_math.h"
#include "../sinkhorn_params.h"
#include "forward_isa.h"
