// Calls fn with std::integral_constant<int, n> for a runtime n in [1, MAX], so that kernels
// can take the problem size as a template argument (larger n gets MAX: callers check the bound
// at the front door). Plain C++, shared by the CPU and CUDA launchers.
#pragma once

#include <cstdint>
#include <type_traits>

namespace sinkhorn {

template <int MAX, int N = 1, typename F>
void n_switch(int64_t n, F&& fn) {
  if constexpr (N < MAX) {
    if (n == N) return fn(std::integral_constant<int, N>{});
    return n_switch<MAX, N + 1>(n, fn);
  } else {
    return fn(std::integral_constant<int, MAX>{});
  }
}

}  // namespace sinkhorn
