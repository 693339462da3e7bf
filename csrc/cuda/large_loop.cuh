// The large-problem forward's device loop (large_forward.cu): every step of the solve in one
// cooperative kernel, so that a solve with tol ends on the device when every problem has stopped.
// The host loop enqueues every step up to the cap, and its launches continue, doing nothing, after
// the problems have stopped: the H100's 2000 x 2000 case that stopped at step 40 of 2000 took
// 19.8 ms, nearly all of it launches. Here the blocks of one co-resident grid (cooperative launch)
// run the phases of large_phases.cuh, striding over each phase's work blocks, with a grid barrier
// between phases; after each step's update every block reads the stopped flags, and all leave
// the loop together once every problem has stopped. No host synchronisation: the kernel is one
// launch, which CUDA graphs capture as a cooperative kernel node.
//
// It takes a solve with tol > 0 that records no history and is not fused (SINKHORN_CUDA_LOOP=host
// keeps the host loop, SINKHORN_CUDA_LOOP=device takes this one also without tol, and reports a
// failed launch instead of falling back), on a device that supports cooperative launches; if the
// launch fails, the host loop runs instead (dev::launch_cooperative).
#pragma once

#include <cooperative_groups.h>

#include <cstdint>

#include "../env_flag.h"
#include "cooperative.cuh"
#include "kernel_common.cuh"
#include "large_phases.cuh"
#include "large_work.cuh"

namespace sinkhorn {
namespace large {

// Steps 0 .. p.steps - 1 of every problem (the host loop's work between the marginals and the
// final pass). Each work-block loop is block-uniform and ends every work block in a barrier.
// 61 registers a thread (sm_90, fp32): 4 blocks of 256 threads per SM, where the host loop's
// kernels (30-40) fit 6 to 8; asking for 5 (__launch_bounds__'s second argument) spills about 60
// bytes a thread. Neither was tried on a GPU.
template <typename scalar_t, typename acc_t = typename dev::AccOf<scalar_t>::type>
__global__ void __launch_bounds__(kThreads) loop_kernel(const FwdParams p, Work<acc_t> w) {
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  const acc_t* f = static_cast<const acc_t*>(p.f);
  const acc_t* g = static_cast<const acc_t*>(p.g);
  const int64_t col_blocks = col_blocks_of(p.m), merge_blocks = (p.m + 31) / 32;
  for (int64_t k = 0; k < p.steps; ++k) {
    const bool row = dev::is_row_step(k, p.start_row);
    if (row) {
      row_lse_phase<scalar_t>(p, w, g);
      if (w.chunks > 1) {
        grid.sync();
        row_merge_phase(p, w);
      }
    } else {
      const int64_t partials = col_blocks * w.strips * p.B;
      for (int64_t v = blockIdx.x; v < partials; v += gridDim.x) {
        col_partial_block<scalar_t>(p, w, f, v % col_blocks, (v / col_blocks) % w.strips,
                                    v / (col_blocks * w.strips));
        __syncthreads();
      }
      grid.sync();
      for (int64_t v = blockIdx.x; v < merge_blocks * p.B; v += gridDim.x) {
        col_merge_block(p, w, v % merge_blocks, v / merge_blocks);
        __syncthreads();
      }
    }
    grid.sync();
    for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x)
      update_block(p, w, row, k, p.tol > 0 && k >= 1, false, b);
    grid.sync();
    if (dev::all_set<kThreads>(w.done, p.B)) break;  // every problem has stopped
  }
}

// The most work blocks any phase has: the grid need not be larger.
inline int64_t loop_work_blocks(const FwdParams& p, int64_t chunks, int64_t strips) {
  const int64_t phases[] = {(p.B * p.n * chunks + kRowWarps - 1) / kRowWarps,
                            (p.B * p.n + kThreads - 1) / kThreads,
                            col_blocks_of(p.m) * strips * p.B, (p.m + 31) / 32 * p.B, p.B};
  int64_t most = 1;
  for (int64_t x : phases) most = x > most ? x : most;
  return most;
}

// Whether p's steps take the device loop (see the top).
inline bool device_loop_applies(const FwdParams& p, bool history, bool fused) {
  static const bool host = env_is("SINKHORN_CUDA_LOOP", "host");
  static const bool device = env_is("SINKHORN_CUDA_LOOP", "device");
  return !host && !history && !fused && p.steps > 0 && (p.tol > 0 || device);
}

// Launches the device loop (dev::launch_cooperative: false when it did not launch and the host
// loop should run; SINKHORN_CUDA_LOOP=device keeps a failed launch's error instead).
template <typename scalar_t, typename acc_t>
bool launch_device_loop(const FwdParams& p, const Work<acc_t>& w, cudaStream_t stream) {
  static const bool forced = env_is("SINKHORN_CUDA_LOOP", "device");
  FwdParams params = p;
  Work<acc_t> work = w;
  void* args[] = {&params, &work};
  return dev::launch_cooperative(loop_kernel<scalar_t, acc_t>, kThreads,
                                 loop_work_blocks(p, w.chunks, w.strips), args, stream, forced);
}

}  // namespace large
}  // namespace sinkhorn
