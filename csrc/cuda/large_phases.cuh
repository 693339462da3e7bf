// The phases of one step of the large-problem forward (large_forward.cu), as device functions
// that two launchers share: the host loop launches each phase as a kernel of its own (a work
// block per CUDA block), and the device loop (large_loop.cuh) runs every phase of every step in
// one cooperative kernel whose co-resident blocks stride over the work blocks, with a grid
// barrier between phases.
//
// Rules that make a phase safe to call repeatedly in one block: a work block's early returns are
// block-uniform (every thread returns to the caller's loop, which is block-uniform too), and a
// phase that uses shared memory is followed by a barrier in the caller's loop before the next work
// block writes it (the grid-stride phases use none).
#pragma once

#include <cstdint>

#include "kernel_common.cuh"
#include "large_work.cuh"

namespace sinkhorn {
namespace large {

using dev::block_sum;
using dev::Inputs;
using dev::lane_id;
using dev::load_then_update;
using dev::lse_strided;
using dev::to_acc;
using dev::warp_id;
using dev::warp_lse;
using math::Lse;

// A finished LSE: into w.lse, or, when the step needs no stopping check (direct, the host loop's
// fixed-step solves), straight into the potential update_block would write from it, so that the
// step needs no update launch.
template <typename acc_t>
__device__ __forceinline__ void put_lse(const FwdParams& p, const Work<acc_t>& w, bool row,
                                        acc_t* direct, int64_t b, int64_t x, acc_t lse) {
  if (direct == nullptr) {
    w.lse[b * w.L + x] = lse;
  } else {
    const int64_t len = row ? p.n : p.m;
    direct[b * len + x] = math::potential(w.log_marginal(p, row, b)[x], lse);
  }
}

// Row LSEs LSE_j(S_ij + g_j) of every problem that has not stopped (g == nullptr: g = 0), a warp
// per (row, chunk of w.chunk_cols columns), the grid's warps striding over them: into w.lse (or
// f: put_lse) when a row is one chunk, else into the chunk partials (row_merge_phase merges them).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_lse_phase(const FwdParams& p, const Work<acc_t>& w,
                                              const acc_t* g, acc_t* direct = nullptr) {
  const int64_t segments = p.B * p.n * w.chunks;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp_id(); t < segments;
       t += warps) {  // warp-uniform: the merge needs every lane
    const int64_t r = t / w.chunks, c = t % w.chunks, b = r / p.n, i = r % p.n;
    if (w.done[b] != acc_t(0)) continue;
    const scalar_t* row = static_cast<const scalar_t*>(p.scores) + (b * p.n + i) * p.m;
    const acc_t* gb = g ? g + b * p.m : nullptr;
    const int64_t j0 = c * w.chunk_cols, j1 = j0 + w.chunk_cols < p.m ? j0 + w.chunk_cols : p.m;
    Lse<acc_t> s = lse_strided<acc_t>(j0 + lane_id(), j1, 32, [&](int64_t j) {
      return to_acc(row[j]) + (gb ? gb[j] : acc_t(0));
    });
    s = warp_lse(s);
    if (lane_id() != 0) continue;
    if (w.chunks == 1) {
      put_lse(p, w, true, direct, b, i, math::lse_value(s));
    } else {
      w.row_max[t] = s.max;  // t = (b * n + i) * chunks + c
      w.row_sum[t] = s.sum;
    }
  }
}

// Merges a row's chunk partials (row_lse_phase: consecutive) into w.lse (or f: put_lse), a thread
// per (problem, row), the grid's threads striding over them. Rows are split into chunks only when
// there are few of them (row_chunks_of).
template <typename acc_t>
__device__ __forceinline__ void row_merge_phase(const FwdParams& p, const Work<acc_t>& w,
                                                acc_t* direct = nullptr) {
  const int64_t len = p.n, parts = w.chunks;
  const int64_t total = p.B * len;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; t < total;
       t += stride) {
    const int64_t b = t / len, x = t % len;
    if (w.done[b] != acc_t(0)) continue;
    const int64_t first = t * parts;
    Lse<acc_t> s = math::lse_empty<acc_t>();
    for (int64_t k = 0; k < parts; ++k)
      s = math::lse_merge(s, Lse<acc_t>{w.row_max[first + k], w.row_sum[first + k]});
    put_lse(p, w, true, direct, b, x, math::lse_value(s));
  }
}

// The column pass's work blocks: (column block, strip, problem), column blocks fastest.
inline __host__ __device__ int64_t col_blocks_of(int64_t m) {
  return (m + cols_per_block(m) - 1) / cols_per_block(m);
}

// Column partial LSEs over one strip of rows, LSE_{i in strip}(S_ij + f_i) (f == nullptr: 0), of
// work block (column block bx, strip, problem b): cols_per_block(m) columns. Thread t takes
// column t % cols and every (kThreads / cols)-th row of the strip from row t / cols, so a warp
// reads consecutive addresses; the threads of a column merge in shared memory (the caller's
// barrier must follow before the next work block).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void col_partial_block(const FwdParams& p, const Work<acc_t>& w,
                                                  const acc_t* f, int64_t bx, int64_t strip,
                                                  int64_t b) {
  __shared__ acc_t smax[kThreads], ssum[kThreads];
  if (w.done[b] != acc_t(0)) return;  // block-uniform
  const int64_t cols = cols_per_block(p.m), subs = kThreads / cols;
  const int64_t c = threadIdx.x % cols, sub = threadIdx.x / cols;
  const int64_t j = bx * cols + c;
  const int64_t i0 = strip * w.strip_rows;
  const int64_t i1 = i0 + w.strip_rows < p.n ? i0 + w.strip_rows : p.n;
  const scalar_t* S = static_cast<const scalar_t*>(p.scores) + b * p.n * p.m;
  const acc_t* fb = f ? f + b * p.n : nullptr;
  Lse<acc_t> s = math::lse_empty<acc_t>();
  if (j < p.m)
    s = lse_strided<acc_t>(i0 + sub, i1, subs, [&](int64_t i) {
      return to_acc(S[i * p.m + j]) + (fb ? fb[i] : acc_t(0));
    });
  if (subs > 1) {  // block-uniform
    smax[threadIdx.x] = s.max;
    ssum[threadIdx.x] = s.sum;
    __syncthreads();
    if (sub != 0) return;
    for (int64_t k = 1; k < subs; ++k)
      s = math::lse_merge(s, Lse<acc_t>{smax[k * cols + c], ssum[k * cols + c]});
  }
  if (j >= p.m) return;
  const int64_t k = (b * w.strips + strip) * p.m + j;
  w.part_max[k] = s.max;
  w.part_sum[k] = s.sum;
}

// Merges the column strips' partial LSEs (col_partial_block, or the fused pass) into w.lse (or g:
// put_lse), work block (group bx of 32 columns, problem b). Lane l takes column 32 * bx + l, so
// a warp reads 32 consecutive partials of a strip; warp v takes strips v, v + kRowWarps, ... in
// four independent chains (dev::fold_strided); the warps' results meet in shared memory (the
// caller's barrier must follow before the next work block). The H200 run found the merge that
// gave a thread a whole column (a serial chain over up to 256 strips, with m threads in all: 32
// blocks at m = 8192) at 0.115 ms a call, nearly a pass over S.
template <typename acc_t>
__device__ __forceinline__ void col_merge_block(const FwdParams& p, const Work<acc_t>& w,
                                                int64_t bx, int64_t b, acc_t* direct = nullptr) {
  __shared__ Lse<acc_t> warps[kThreads];  // warp v's result for lane l at v * 32 + l
  const int64_t x = bx * 32 + lane_id();
  if (w.done[b] != acc_t(0)) return;  // block-uniform
  Lse<acc_t> part = math::lse_empty<acc_t>();
  if (x < p.m) {
    const acc_t* mx = w.part_max + b * w.strips * p.m + x;
    const acc_t* sum = w.part_sum + b * w.strips * p.m + x;
    auto merge = [](Lse<acc_t> a, Lse<acc_t> c) { return math::lse_merge(a, c); };
    part = dev::fold_strided(
        int64_t(warp_id()), w.strips, int64_t(kRowWarps), math::lse_empty<acc_t>(),
        [&](int64_t k) { return Lse<acc_t>{mx[k * p.m], sum[k * p.m]}; },
        [&](Lse<acc_t>& s, Lse<acc_t> v) { s = merge(s, v); }, merge);
  }
  warps[threadIdx.x] = part;
  __syncthreads();
  if (warp_id() == 0 && x < p.m) {
    Lse<acc_t> total = warps[lane_id()];
    for (int v = 1; v < kRowWarps; ++v) total = math::lse_merge(total, warps[v * 32 + lane_id()]);
    put_lse(p, w, false, direct, b, x, math::lse_value(total));
  }
}

// Step k's stopping check and potential update of problem b, one work block (MATH.md section 1:
// before a step k >= 1, the L1 error of the marginal it fixes, under the current potentials,
// decides whether it runs). final: after the last step, record the steps and the error of the
// marginal the last step did not fix for the problems that did not stop. Its reductions end in
// barriers, so the next work block may follow at once.
template <typename acc_t>
__device__ __forceinline__ void update_block(const FwdParams& p, const Work<acc_t>& w, bool row,
                                             int64_t k, bool check, bool final, int64_t b) {
  if (w.done[b] != acc_t(0)) return;  // block-uniform
  const int64_t len = row ? p.n : p.m;
  acc_t* pot = static_cast<acc_t*>(row ? p.f : p.g) + b * len;
  const acc_t* lm = w.log_marginal(p, row, b);
  const acc_t* lse = w.lse + b * w.L;
  if (check || final) {
    acc_t err = 0;
    for (int64_t t = threadIdx.x; t < len; t += kThreads)
      err += math::marginal_error(lm[t], lse[t], pot[t]);
    err = block_sum<kThreads>(err);  // also a barrier: every thread has read pot
    if (final || err <= w.threshold[b]) {
      if (threadIdx.x == 0) {
        p.steps_used[b] = k;
        static_cast<acc_t*>(p.error)[b] = err;
        if (!final) w.done[b] = acc_t(1);
      }
      return;
    }
  }
  load_then_update<acc_t>(  // the store to pot could alias the next loads: loads first
      threadIdx.x, len, kThreads, [&](int64_t t) { return Inputs<acc_t>{{lm[t], lse[t], 0, 0}}; },
      [&](int64_t t, const Inputs<acc_t>& in) { pot[t] = math::potential(in.v[0], in.v[1]); });
}

}  // namespace large
}  // namespace sinkhorn
