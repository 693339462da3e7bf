// CUDA kernels of mHC's per-token mappings (mhc_mappings_math.h), forward and backward, from the
// normalised projections or from the raw ones and the norms (the RMSNorm folded in): a thread
// per token, its 2n + n^2 projections and its n x n Sinkhorn problem in registers, the math
// shared with the CPU kernel. One read of the projections and one write of H_pre, H_post and
// H_res per token (forward); one read of the projections and of the three upstream gradients,
// and one write of dL/dproj and of the token's partials row (its gate sums and dz; backward,
// which recomputes the forward and keeps the Sinkhorn's divisors as mhc_v4.cu does).
#include <cstdint>

#include "../mhc_mappings_math.h"
#include "../n_switch.h"
#include "kernel_common.cuh"
#include "mhc_problem.cuh"
#include "sinkhorn_kernel.h"

namespace sinkhorn {
namespace {

using dev::aligned16;
using dev::blocks_for;

constexpr int kThreads = 128;

template <typename T>
struct Args {
  const T* proj;
  const T* alpha[3];
  const T* bias[3];
  const T* grad_pre;   // backward: nullptr reads as zeros, as do the next two
  const T* grad_post;
  const T* grad_res;
  T* pre;               // forward outputs
  T* post;
  T* res;
  T* grad_proj;         // backward outputs
  T* partials;
  const T* norm;        // the RMSNorm folded in (MappingsParams::norm): per-token ||x||, or null
  T* rms_coef;          // backward with norm: the coefficient c of x in dL/dx
  T inv_dim;            // 1 / D
  T norm_eps;
  int64_t tokens;
  int iters;
  T eps;                // DeepSeek-V4's eps, 0 for the paper's variant
  bool v4;
  bool words;           // every row pointer on a 16-byte boundary
};

// Token b's normalised projections into y (its inverse RMS r, 1 without a norm) and its logits z.
template <int N, typename T>
__device__ __forceinline__ void token_logits(const Args<T>& a, int64_t b, T* y, T* z, T& r) {
  using Token = mappings::Token<N, T, mhc::DeviceOps<T>>;
  mhc::load_row<Token::K>(a.proj, b, y, a.words);
  r = T{1};
  if (a.norm != nullptr) {
    r = mappings::inverse_rms(a.norm[b], a.inv_dim, a.norm_eps);
    Token::normalise(y, r);
  }
  const T alpha[3] = {*a.alpha[0], *a.alpha[1], *a.alpha[2]};
  T bias[Token::K];
#pragma unroll
  for (int k = 0; k < Token::K; ++k)
    bias[k] = a.bias[mappings::gate(k, N)][mappings::bias_index(k, N)];
  Token::logits(y, alpha, bias, z);
}

// A row of V values of src, or zeros for a null src.
template <int V, typename T>
__device__ __forceinline__ void load_or_zero(const T* src, int64_t b, T* x, bool words) {
  if (src == nullptr) {
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = T{};
  } else {
    mhc::load_row<V>(src, b, x, words);
  }
}

template <int N, typename T>
__global__ void __launch_bounds__(kThreads) mhc_mappings_forward_kernel(const Args<T> a) {
  using Token = mappings::Token<N, T, mhc::DeviceOps<T>>;
  constexpr int NN = N * N;
  const bool paper = !a.v4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < a.tokens;
       b += stride) {
    T y[Token::K], z[Token::K], r;
    token_logits<N>(a, b, y, z, r);
    T pre[N], post[N];
    Token::gates(z, a.eps, pre, post);
    mhc::store_row<N>(a.pre, b, pre, a.words);
    mhc::store_row<N>(a.post, b, post, a.words);
    T x[NN], c[NN], h[NN];
    Token::res_logits(z, paper, x);
    mhc::run_problem<N, T, false, false>(x, c, a.iters, a.eps, paper);
    // H_res is the iterated matrix transposed in both variants: the paper's problem was loaded
    // transposed, and DeepSeek-V4 applies comb^T.
#pragma unroll
    for (int k = 0; k < NN; ++k) h[v4::transposed(k, N)] = c[k];
    mhc::store_row<NN>(a.res, b, h, a.words);
  }
}

template <int N, typename T, bool SHARED_HISTORY>
__global__ void __launch_bounds__(kThreads) mhc_mappings_backward_kernel(const Args<T> a) {
  using Token = mappings::Token<N, T, mhc::DeviceOps<T>>;
  constexpr int NN = N * N, K = Token::K, P = Token::P;
  const bool paper = !a.v4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < a.tokens;
       b += stride) {
    T part[P], x[NN], g[NN], r;  // part: [dots | dz | zeros] (mhc_mappings_math.h)
    T* const dots = part;
    T* const dz = part + 3;
    {
      T y[K], z[K], gp[N], gq[N], graw[NN];
      token_logits<N>(a, b, y, z, r);
      load_or_zero<N>(a.grad_pre, b, gp, a.words);
      load_or_zero<N>(a.grad_post, b, gq, a.words);
      Token::gates_backward(z, gp, gq, dz);
      load_or_zero<NN>(a.grad_res, b, graw, a.words);
      Token::res_logits(z, paper, x);
#pragma unroll
      for (int k = 0; k < NN; ++k)
        g[k] = graw[v4::transposed(k, N)];  // dL/d(iterated matrix), as H_res is its transpose
    }
    // A zero upstream gradient of H_res has a zero gradient of its logits.
    if (a.grad_res != nullptr)
      mhc::run_problem<N, T, true, SHARED_HISTORY>(x, g, a.iters, a.eps, paper);
    Token::res_gradient(g, paper, dz);
    T y[K], grad_y[K];
    mhc::load_row<K>(a.proj, b, y, a.words);  // again, rather than live across the Sinkhorn
    if (a.norm != nullptr) Token::normalise(y, r);
    const T alpha[3] = {*a.alpha[0], *a.alpha[1], *a.alpha[2]};
    const bool live[3] = {a.grad_pre != nullptr, a.grad_post != nullptr, a.grad_res != nullptr};
    Token::finish(y, alpha, live, dz, grad_y, dots);
    if (a.norm != nullptr) a.rms_coef[b] = Token::rms_backward(y, live, r, a.inv_dim, grad_y);
    mhc::store_row<K>(a.grad_proj, b, grad_y, a.words);
    Token::pad_partials(part);
    mhc::store_row<P>(a.partials, b, part, a.words);
  }
}

template <typename T>
void launch_typed(const MappingsParams& p, cudaStream_t stream) {
  Args<T> a;
  a.proj = static_cast<const T*>(p.proj);
  for (int g = 0; g < 3; ++g) {
    a.alpha[g] = static_cast<const T*>(p.alpha[g]);
    a.bias[g] = static_cast<const T*>(p.bias[g]);
  }
  a.grad_pre = static_cast<const T*>(p.grad_pre);
  a.grad_post = static_cast<const T*>(p.grad_post);
  a.grad_res = static_cast<const T*>(p.grad_res);
  a.pre = static_cast<T*>(p.pre);
  a.post = static_cast<T*>(p.post);
  a.res = static_cast<T*>(p.res);
  a.grad_proj = static_cast<T*>(p.grad_proj);
  a.partials = static_cast<T*>(p.partials);
  a.norm = static_cast<const T*>(p.norm);
  a.rms_coef = static_cast<T*>(p.rms_coef);
  a.inv_dim = static_cast<T>(p.inv_dim);
  a.norm_eps = static_cast<T>(p.norm_eps);
  a.tokens = p.T;
  a.iters = p.iters;
  a.eps = static_cast<T>(p.eps);  // 0 for the paper's variant (the front door)
  a.v4 = p.v4;
  a.words = aligned16(p.proj) && aligned16(p.grad_pre) && aligned16(p.grad_post) &&
            aligned16(p.grad_res) && aligned16(p.pre) && aligned16(p.post) && aligned16(p.res) &&
            aligned16(p.grad_proj) && aligned16(p.partials);
  n_switch<v4::kMaxN>(p.n, [&](auto n) {  // the front door admits n <= kMaxN only
    constexpr int N = decltype(n)::value;
    const unsigned grid = blocks_for(p.T, kThreads);
    if (!p.backward) {
      mhc_mappings_forward_kernel<N, T><<<grid, kThreads, 0, stream>>>(a);
      return;
    }
    const size_t per_thread = static_cast<size_t>(v4::normalisations(p.iters)) * N * sizeof(T);
    dev::launch_with_history(&mhc_mappings_backward_kernel<N, T, false>,
                             &mhc_mappings_backward_kernel<N, T, true>, grid, kThreads,
                             per_thread, stream, a);
  });
}

}  // namespace

void launch_mhc_mappings(const MappingsParams& p, cudaStream_t stream) {
  if (p.T == 0) return;
  if (p.dtype == DType::Float64) {
    launch_typed<double>(p, stream);
  } else {
    launch_typed<float>(p, stream);
  }
}

}  // namespace sinkhorn
