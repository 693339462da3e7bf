// Pieces of the thread-per-problem mHC kernels (mhc_v4.cu, mhc_mappings.cu): a row of values
// loaded and stored in 16-byte words where it fills whole words, and one n x n Sinkhorn problem
// (v4::Problem) run forward or differentiated in the thread.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../mhc_v4_math.h"
#include "kernel_common.cuh"
#include "reciprocal.cuh"

namespace sinkhorn {
namespace mhc {

template <typename T>
struct DeviceOps {
  using E = T;
  static SK_HD T exp(T x) { return math::exp_(x); }
  static SK_HD T log(T x) { return math::log_(x); }
  static SK_HD T max(T a, T b) { return a > b ? a : b; }
  template <int K>
  static __device__ __forceinline__ void reciprocals(const T* d, T* inv) {
    dev::reciprocals<K>(d, inv);
  }
  template <int K>
  static __device__ __forceinline__ void forward_reciprocals(const T* d, T* inv) {
    dev::reciprocals<K>(d, inv);
  }
};

// 16-byte words of float and double values.
__device__ __forceinline__ void unpack(const float4& v, float* x) {
  x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
}
__device__ __forceinline__ void unpack(const double2& v, double* x) { x[0] = v.x, x[1] = v.y; }
__device__ __forceinline__ float4 pack(const float* x) { return float4{x[0], x[1], x[2], x[3]}; }
__device__ __forceinline__ double2 pack(const double* x) { return double2{x[0], x[1]}; }
template <typename T>
using Word = typename std::conditional<sizeof(T) == 4, float4, double2>::type;

// Row b of NV values of src (rows back to back) into x, in 16-byte words when `words` (the
// caller checked the alignment; NV values fill whole words).
template <int NV, typename T>
__device__ __forceinline__ void load_row(const T* src, int64_t b, T* x, bool words) {
  constexpr int L = 16 / sizeof(T);
  if (NV % L == 0 && words) {  // a compile-time false where words cannot hold the row
    const Word<T>* w = reinterpret_cast<const Word<T>*>(src + b * NV);
#pragma unroll
    for (int q = 0; q < NV / L; ++q) unpack(w[q], x + q * L);
  } else {
#pragma unroll
    for (int k = 0; k < NV; ++k) x[k] = src[b * NV + k];
  }
}

// x into row b of dst, the inverse of load_row.
template <int NV, typename T>
__device__ __forceinline__ void store_row(T* dst, int64_t b, const T* x, bool words) {
  constexpr int L = 16 / sizeof(T);
  if (NV % L == 0 && words) {
    Word<T>* w = reinterpret_cast<Word<T>*>(dst + b * NV);
#pragma unroll
    for (int q = 0; q < NV / L; ++q) w[q] = pack(x + q * L);
  } else {
#pragma unroll
    for (int k = 0; k < NV; ++k) dst[b * NV + k] = x[k];
  }
}

// One problem in the thread: g <- comb(x) (the forward; g's input is unused) or, when BACKWARD,
// g <- dL/dx given g = dL/dcomb, the divisors in dynamic shared memory (SHARED_HISTORY: entry k
// of consecutive threads in consecutive words, math::History) or a local array. With paper set,
// eps is 0 and a problem the linear domain cannot take runs the log-domain twin
// (V4Params::paper). x and g are in the iterated orientation (the paper's problems transposed).
template <int N, typename T, bool BACKWARD, bool SHARED_HISTORY>
__device__ __forceinline__ void run_problem(const T* x, T* g, int iters, T eps, bool paper) {
  using Problem = v4::Problem<N, T, DeviceOps<T>>;
  const bool in_log = paper && Problem::needs_log_domain(x);
  if constexpr (BACKWARD) {
    auto differentiate = [&](auto hist) {
      if (in_log) {
        Problem::log_backward(x, g, iters, hist);
      } else {
        Problem::backward(x, g, iters, eps, hist);
      }
    };
    if constexpr (SHARED_HISTORY) {
      extern __shared__ __align__(16) unsigned char mhc_history[];
      differentiate(math::History<T>{reinterpret_cast<T*>(mhc_history) + threadIdx.x,
                                     static_cast<int>(blockDim.x)});
    } else {
      T hist[(2 * v4::kMaxIters - 1) * N];
      differentiate(hist);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N * N; ++k) g[k] = x[k];
    if (in_log) {
      Problem::log_forward(g, iters);
    } else {
      Problem::forward(g, iters, eps, nullptr);
    }
  }
}

}  // namespace mhc
}  // namespace sinkhorn
