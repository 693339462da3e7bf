// CUDA kernel of the DeepSeek-V4 mHC Sinkhorn and of the paper's (V4 on the transpose with
// eps = 0), forward and backward: a thread per problem, the n x n problem in registers, the
// per-problem math of mhc_v4_math.h (the CPU kernel runs the same functions on SIMD lanes, so
// the CPU tests check this math). One read of the logits (and of dL/dcomb) and one write per
// problem, in 16-byte words where n * n values fill whole words and the tensors are aligned. The
// float32 forward keeps everything in registers (ptxas, sm_90: no stack at any n; float64 from
// n = 3 on still has some).
//
// The backward recomputes the forward in the thread and keeps each normalisation's divisors,
// (2 iters - 1) x n values, for the walk back. The second GPU run (H200) measured that history in
// local memory at 0.48 ms for 1M problems of 4 x 4 against 0.152 ms for the forward: about 2 GB of
// local-memory traffic. It now lives in dynamic shared memory, entry k of consecutive threads in
// consecutive words (math::History), where a block's 128 histories fit (dev::history_bytes: fp32
// n = 4 up to 24 iterations); elsewhere, and under SINKHORN_CUDA_HISTORY=local, in a local array
// as before.
#include <cstdint>

#include "../mhc_v4_math.h"
#include "../n_switch.h"
#include "kernel_common.cuh"
#include "reciprocal.cuh"
#include "sinkhorn_kernel.h"

namespace sinkhorn {
namespace {

using dev::aligned16;
using dev::blocks_for;

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
};

constexpr int kThreads = 128;

// 16-byte words of float and double values.
__device__ __forceinline__ void unpack(const float4& v, float* x) {
  x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
}
__device__ __forceinline__ void unpack(const double2& v, double* x) { x[0] = v.x, x[1] = v.y; }
__device__ __forceinline__ float4 pack(const float* x) { return float4{x[0], x[1], x[2], x[3]}; }
__device__ __forceinline__ double2 pack(const double* x) { return double2{x[0], x[1]}; }
template <typename T>
using Word = typename std::conditional<sizeof(T) == 4, float4, double2>::type;

// Problem b's NN values from src into x, in 16-byte words when `words` (the caller checked the
// alignment; NN values fill whole words), each transposed for the paper's variant (a
// compile-time permutation of registers).
template <int N, typename T>
__device__ __forceinline__ void load_problem(const T* src, int64_t b, T* x, bool words,
                                             bool transpose) {
  constexpr int NN = N * N, L = 16 / sizeof(T);
  T raw[NN];
  if (NN % L == 0 && words) {  // a compile-time false where words cannot hold the problem
    const Word<T>* w = reinterpret_cast<const Word<T>*>(src + b * NN);
#pragma unroll
    for (int q = 0; q < NN / L; ++q) unpack(w[q], raw + q * L);
  } else {
#pragma unroll
    for (int k = 0; k < NN; ++k) raw[k] = src[b * NN + k];
  }
#pragma unroll
  for (int k = 0; k < NN; ++k) x[k] = transpose ? raw[v4::transposed(k, N)] : raw[k];
}

// x into problem b of dst, the inverse of load_problem.
template <int N, typename T>
__device__ __forceinline__ void store_problem(T* dst, int64_t b, const T* x, bool words,
                                              bool transpose) {
  constexpr int NN = N * N, L = 16 / sizeof(T);
  T raw[NN];
#pragma unroll
  for (int k = 0; k < NN; ++k) raw[transpose ? v4::transposed(k, N) : k] = x[k];
  if (NN % L == 0 && words) {
    Word<T>* w = reinterpret_cast<Word<T>*>(dst + b * NN);
#pragma unroll
    for (int q = 0; q < NN / L; ++q) w[q] = pack(raw + q * L);
  } else {
#pragma unroll
    for (int k = 0; k < NN; ++k) dst[b * NN + k] = raw[k];
  }
}

// Problems [blockIdx.x * blockDim.x, ...) one per thread, in a grid-stride loop. With paper
// set, each problem is loaded and stored transposed, eps is 0, and a problem the linear domain
// cannot take runs the log-domain twin (V4Params::paper). BACKWARD: out = dL/dlogits from
// grad = dL/dcomb, the divisors in shared memory (SHARED_HISTORY) or a local array; the forward
// keeps no history at all.
template <int N, typename T, bool BACKWARD, bool SHARED_HISTORY>
__global__ void __launch_bounds__(kThreads)
    mhc_v4_kernel(const T* __restrict__ logits, const T* __restrict__ grad, T* __restrict__ out,
                  int64_t B, int iters, T eps, bool paper, bool words) {
  using Problem = v4::Problem<N, T, DeviceOps<T>>;
  constexpr int NN = N * N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += stride) {
    T x[NN], g[NN];
    load_problem<N>(logits, b, x, words, paper);
    const bool in_log = paper && Problem::needs_log_domain(x);
    if constexpr (BACKWARD) {
      load_problem<N>(grad, b, g, words, paper);
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
      for (int k = 0; k < NN; ++k) g[k] = x[k];
      if (in_log) {
        Problem::log_forward(g, iters);
      } else {
        Problem::forward(g, iters, eps, nullptr);
      }
    }
    store_problem<N>(out, b, g, words, paper);
  }
}

template <typename T>
void launch_typed(const V4Params& p, cudaStream_t stream) {
  const bool words = aligned16(p.logits) && aligned16(p.out) &&
                     (p.grad == nullptr || aligned16(p.grad));
  n_switch<v4::kMaxN>(p.n, [&](auto n) {  // the front door admits n <= kMaxN only
    constexpr int N = decltype(n)::value;
    const T* logits = static_cast<const T*>(p.logits);
    const T* grad = static_cast<const T*>(p.grad);
    T* out = static_cast<T*>(p.out);
    const T eps = static_cast<T>(p.eps);
    if (grad == nullptr) {
      mhc_v4_kernel<N, T, false, false><<<blocks_for(p.B, kThreads), kThreads, 0, stream>>>(
          logits, grad, out, p.B, p.iters, eps, p.paper, words);
      return;
    }
    const size_t per_thread = static_cast<size_t>(v4::normalisations(p.iters)) * N * sizeof(T);
    dev::launch_with_history(&mhc_v4_kernel<N, T, true, false>, &mhc_v4_kernel<N, T, true, true>,
                             blocks_for(p.B, kThreads), kThreads, per_thread, stream, logits,
                             grad, out, p.B, p.iters, eps, p.paper, words);
  });
}

}  // namespace

void launch_mhc_v4(const V4Params& p, cudaStream_t stream) {
  if (p.B == 0) return;
  if (p.dtype == DType::Float64) {
    launch_typed<double>(p, stream);
  } else {
    launch_typed<float>(p, stream);
  }
}

}  // namespace sinkhorn
