// CUDA kernels of the mHC stream mixings (mhc_mix_math.h), forward and backward: a warp per
// token, its lanes striding over the channels (coalesced loads and stores of every stream), the
// mappings' gradients summed over the channels by a warp reduction. Never run on a GPU yet; the
// per-channel math is the CPU kernel's, which the tests check.
#include <cstdint>

#include "../mhc_mix_math.h"
#include "../n_switch.h"
#include "kernel_common.cuh"
#include "sinkhorn_kernel.h"

namespace sinkhorn {
namespace {

using namespace dev;

constexpr int kMixThreads = 256;
constexpr int kMixWarps = kMixThreads / 32;

template <int N, typename scalar_t>
__global__ void __launch_bounds__(kMixThreads) mix_kernel(const MixParams p) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int K = N * N + N;  // gradient terms (post; pre uses the first N)
  const int64_t C = p.C;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kMixWarps;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kMixWarps + warp_id(); t < p.T;
       t += warps) {  // warp-uniform: the reduction below needs every lane
    acc_t h[N * N], q[N], dh[K];  // h: H_res (post) or H_pre in its first N (pre)
    if (p.post) {
#pragma unroll
      for (int k = 0; k < N * N; ++k) h[k] = static_cast<const acc_t*>(p.h_res)[t * N * N + k];
#pragma unroll
      for (int i = 0; i < N; ++i) q[i] = static_cast<const acc_t*>(p.h_post)[t * N + i];
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) h[j] = static_cast<const acc_t*>(p.h_pre)[t * N + j];
    }
#pragma unroll
    for (int k = 0; k < K; ++k) dh[k] = acc_t(0);
    const scalar_t* x = static_cast<const scalar_t*>(p.x) + t * N * C;
    for (int64_t c = lane_id(); c < C; c += 32) {
      acc_t xs[N];
#pragma unroll
      for (int j = 0; j < N; ++j) xs[j] = to_acc(x[j * C + c]);
      if (!p.post) {
        if (!p.backward) {
          store(static_cast<scalar_t*>(p.out) + t * C + c, mix::pre<N>(h, xs));
          continue;
        }
        const acc_t g = to_acc(static_cast<const scalar_t*>(p.grad)[t * C + c]);
        scalar_t* dx = static_cast<scalar_t*>(p.out) + t * N * C + c;
#pragma unroll
        for (int j = 0; j < N; ++j) {
          store(dx + j * C, h[j] * g);
          dh[j] += g * xs[j];
        }
        continue;
      }
      const acc_t y = to_acc(static_cast<const scalar_t*>(p.y)[t * C + c]);
      if (!p.backward) {
        acc_t o[N];
        mix::post<N>(h, q, xs, y, o);
        scalar_t* out = static_cast<scalar_t*>(p.out) + t * N * C + c;
#pragma unroll
        for (int i = 0; i < N; ++i) store(out + i * C, o[i]);
        continue;
      }
      acc_t g[N], dx[N];
      const scalar_t* G = static_cast<const scalar_t*>(p.grad) + t * N * C + c;
#pragma unroll
      for (int i = 0; i < N; ++i) g[i] = to_acc(G[i * C]);
      store(static_cast<scalar_t*>(p.grad_y) + t * C + c, mix::post_backward<N>(h, q, g, dx));
      scalar_t* DX = static_cast<scalar_t*>(p.out) + t * N * C + c;
#pragma unroll
      for (int j = 0; j < N; ++j) store(DX + j * C, dx[j]);
      mix::post_accumulate<N>(g, xs, y, dh, dh + N * N);
    }
    if (!p.backward) continue;
#pragma unroll
    for (int k = 0; k < K; ++k) dh[k] = warp_sum(dh[k]);
    if (lane_id() != 0) continue;
    if (!p.post) {
#pragma unroll
      for (int j = 0; j < N; ++j) static_cast<acc_t*>(p.grad_h_pre)[t * N + j] = dh[j];
      continue;
    }
#pragma unroll
    for (int k = 0; k < N * N; ++k) static_cast<acc_t*>(p.grad_h_res)[t * N * N + k] = dh[k];
#pragma unroll
    for (int i = 0; i < N; ++i) static_cast<acc_t*>(p.grad_h_post)[t * N + i] = dh[N * N + i];
  }
}

template <typename scalar_t>
void launch_typed(const MixParams& p, cudaStream_t stream) {
  n_switch<mix::kMaxStreams>(p.n, [&](auto n) {  // the front door admits n <= kMaxStreams only
    mix_kernel<decltype(n)::value, scalar_t>
        <<<blocks_for(p.T, kMixWarps), kMixThreads, 0, stream>>>(p);
  });
}

}  // namespace

void launch_mhc_mix(const MixParams& p, cudaStream_t stream) {
  if (p.T == 0) return;  // C == 0 still writes the (zero) mapping gradients
  dtype_switch(p.dtype,
               [&](auto tag) { launch_typed<typename decltype(tag)::type>(p, stream); });
}

}  // namespace sinkhorn
