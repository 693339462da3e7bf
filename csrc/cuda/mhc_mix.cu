// CUDA kernels of the mHC stream mixings (mhc_mix_math.h), forward and backward: a warp per
// token, its lanes striding over the channels (coalesced loads and stores of every stream), the
// mappings' gradients summed over the channels by a warp reduction. Never run on a GPU yet; the
// per-channel math is the CPU kernel's, which the tests check.
//
// A lane takes VEC consecutive channels of every stream at once, one 16-byte load or store each
// (8 bytes beyond 4 streams, which hold more registers), when every row starts on a 16-byte
// boundary: all of a chunk's loads are in flight together, where one channel a lane kept only
// n + 1 four-byte loads in flight (two-byte ones in bf16). Each mode (pre or post, forward or
// backward) is its own kernel, so the light forward ones are not held to the post backward's
// registers.
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

// VEC consecutive channels of one stream, moved as one word.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Chunk {
  scalar_t v[VEC];
};

template <int VEC, typename scalar_t>
__device__ __forceinline__ Chunk<scalar_t, VEC> load_chunk(const void* base, int64_t offset) {
  return *reinterpret_cast<const Chunk<scalar_t, VEC>*>(static_cast<const scalar_t*>(base) +
                                                         offset);
}
template <int VEC, typename scalar_t>
__device__ __forceinline__ void store_chunk(void* base, int64_t offset,
                                            const Chunk<scalar_t, VEC>& c) {
  *reinterpret_cast<Chunk<scalar_t, VEC>*>(static_cast<scalar_t*>(base) + offset) = c;
}

// Channel v of the N stream chunks xs, in the accumulation type.
template <int N, int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void channel(const Chunk<scalar_t, VEC>* xs, int v, acc_t* out) {
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_acc(xs[j].v[v]);
}

// One token's channels [c, c + VEC) in mode POST / BACKWARD: the loads of the chunk first, then
// the channels one by one, then the stores. h: H_res (post) or H_pre in its first N (pre); q:
// H_post; dh: the mappings' gradient terms (post: dH_res then dH_post; pre: dH_pre).
template <int N, int VEC, bool POST, bool BACKWARD, typename scalar_t, typename acc_t>
__device__ __forceinline__ void mix_chunk(const MixParams& p, int64_t t, int64_t c,
                                          const acc_t* h, const acc_t* q, acc_t* dh) {
  using Ch = Chunk<scalar_t, VEC>;
  const int64_t C = p.C;
  Ch xs[N];
#pragma unroll
  for (int j = 0; j < N; ++j) xs[j] = load_chunk<VEC, scalar_t>(p.x, (t * N + j) * C + c);
  if constexpr (!POST) {
    if constexpr (!BACKWARD) {
      Ch o;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        acc_t xv[N];
        channel<N>(xs, v, xv);
        store(&o.v[v], mix::pre<N>(h, xv));
      }
      store_chunk<VEC>(p.out, t * C + c, o);
    } else {
      const Ch gk = load_chunk<VEC, scalar_t>(p.grad, t * C + c);
      Ch dx[N];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const acc_t g = to_acc(gk.v[v]);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          store(&dx[j].v[v], h[j] * g);
          dh[j] += g * to_acc(xs[j].v[v]);
        }
      }
#pragma unroll
      for (int j = 0; j < N; ++j) store_chunk<VEC>(p.out, (t * N + j) * C + c, dx[j]);
    }
  } else {
    const Ch yk = load_chunk<VEC, scalar_t>(p.y, t * C + c);
    if constexpr (!BACKWARD) {
      Ch o[N];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        acc_t xv[N], ov[N];
        channel<N>(xs, v, xv);
        mix::post<N>(h, q, xv, to_acc(yk.v[v]), ov);
#pragma unroll
        for (int i = 0; i < N; ++i) store(&o[i].v[v], ov[i]);
      }
#pragma unroll
      for (int i = 0; i < N; ++i) store_chunk<VEC>(p.out, (t * N + i) * C + c, o[i]);
    } else {
      Ch gk[N], dx[N], dy;
#pragma unroll
      for (int i = 0; i < N; ++i) gk[i] = load_chunk<VEC, scalar_t>(p.grad, (t * N + i) * C + c);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        acc_t xv[N], gv[N], dxv[N];
        channel<N>(xs, v, xv);
        channel<N>(gk, v, gv);
        const acc_t yv = to_acc(yk.v[v]);
        store(&dy.v[v], mix::post_backward<N>(h, q, gv, dxv));
#pragma unroll
        for (int j = 0; j < N; ++j) store(&dx[j].v[v], dxv[j]);
        mix::post_accumulate<N>(gv, xv, yv, dh, dh + N * N);
      }
      store_chunk<VEC>(p.grad_y, t * C + c, dy);
#pragma unroll
      for (int j = 0; j < N; ++j) store_chunk<VEC>(p.out, (t * N + j) * C + c, dx[j]);
    }
  }
}

// A warp per token (grid-stride), VEC channels a lane when `chunked` (every row 16-byte
// aligned and C a multiple of VEC: a launch-wide fact), one otherwise.
template <int N, typename scalar_t, bool POST, bool BACKWARD, int VEC>
__global__ void __launch_bounds__(kMixThreads) mix_kernel(const MixParams p, bool chunked) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int H = POST ? N * N : N;          // the mapping the mix applies
  constexpr int K = BACKWARD ? (POST ? N * N + N : N) : 1;  // gradient terms
  const int64_t C = p.C;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kMixWarps;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kMixWarps + warp_id(); t < p.T;
       t += warps) {  // warp-uniform: the reduction below needs every lane
    acc_t h[H], q[POST ? N : 1], dh[K];
    const acc_t* src = static_cast<const acc_t*>(POST ? p.h_res : p.h_pre) + t * H;
#pragma unroll
    for (int k = 0; k < H; ++k) h[k] = src[k];
    if constexpr (POST) {
#pragma unroll
      for (int i = 0; i < N; ++i) q[i] = static_cast<const acc_t*>(p.h_post)[t * N + i];
    }
#pragma unroll
    for (int k = 0; k < K; ++k) dh[k] = acc_t(0);
    if (chunked) {
#pragma unroll 1  // unrolled, nvcc split some 16-byte stores into four
      for (int64_t c = static_cast<int64_t>(lane_id()) * VEC; c < C; c += 32 * VEC)
        mix_chunk<N, VEC, POST, BACKWARD, scalar_t>(p, t, c, h, q, dh);
    } else {
      for (int64_t c = lane_id(); c < C; c += 32)
        mix_chunk<N, 1, POST, BACKWARD, scalar_t>(p, t, c, h, q, dh);
    }
    if constexpr (BACKWARD) {
#pragma unroll
      for (int k = 0; k < K; ++k) dh[k] = warp_sum(dh[k]);
      if (lane_id() == 0) {
        if constexpr (POST) {
#pragma unroll
          for (int k = 0; k < N * N; ++k) static_cast<acc_t*>(p.grad_h_res)[t * N * N + k] = dh[k];
#pragma unroll
          for (int i = 0; i < N; ++i)
            static_cast<acc_t*>(p.grad_h_post)[t * N + i] = dh[N * N + i];
        } else {
#pragma unroll
          for (int j = 0; j < N; ++j) static_cast<acc_t*>(p.grad_h_pre)[t * N + j] = dh[j];
        }
      }
    }
  }
}

template <typename scalar_t>
void launch_typed(const MixParams& p, cudaStream_t stream) {
  n_switch<mix::kMaxStreams>(p.n, [&](auto n) {  // the front door admits n <= kMaxStreams only
    constexpr int N = decltype(n)::value;
    constexpr int kBytes = N <= 4 ? 16 : 8;  // more streams hold more registers a channel
    constexpr int VEC = kBytes > static_cast<int>(sizeof(scalar_t))
                            ? kBytes / static_cast<int>(sizeof(scalar_t)) : 1;
    // Chunks need every row of every (T, [n,] C) tensor on a 16-byte boundary (nullptr is);
    // then C is a multiple of VEC too.
    const bool chunked = (p.C * sizeof(scalar_t)) % 16 == 0 &&
                         aligned16(p.x) && aligned16(p.y) && aligned16(p.grad) &&
                         aligned16(p.out) && aligned16(p.grad_y);
    const unsigned grid = blocks_for(p.T, kMixWarps);
    auto launch = [&](auto kernel) { kernel<<<grid, kMixThreads, 0, stream>>>(p, chunked); };
    if (p.post) {
      if (p.backward) {
        launch(mix_kernel<N, scalar_t, true, true, VEC>);
      } else {
        launch(mix_kernel<N, scalar_t, true, false, VEC>);
      }
    } else if (p.backward) {
      launch(mix_kernel<N, scalar_t, false, true, VEC>);
    } else {
      launch(mix_kernel<N, scalar_t, false, false, VEC>);
    }
  });
}

}  // namespace

void launch_mhc_mix(const MixParams& p, cudaStream_t stream) {
  if (p.T == 0) return;  // C == 0 still writes the (zero) mapping gradients
  dtype_switch(p.dtype,
               [&](auto tag) { launch_typed<typename decltype(tag)::type>(p, stream); });
}

}  // namespace sinkhorn
