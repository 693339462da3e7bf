// Cooperative launches of the kernels that loop on the device until their problems stop (the
// large forward's device loop, large_loop.cuh; the implicit backward's conjugate gradients,
// implicit_cg.cu): every block of the grid resident at once, so that a grid barrier
// (cooperative_groups::this_grid().sync()) can separate the phases of one iteration.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_common.cuh"

namespace sinkhorn {
namespace dev {

// Whether every one of `count` flags is set (nonzero), the same answer in every thread of the
// block, and in every block when all read them after a grid barrier: the loops' exit test. The
// loads are volatile: every block must take the same decision, or the next grid barrier waits
// forever, so none may read a flag from an SM-local cache (the phases read the flags too).
template <int BLOCK, typename T>
__device__ __forceinline__ bool all_set(const T* flags, int64_t count) {
  const volatile T* f = flags;
  long long unset = 0;
  for (int64_t k = threadIdx.x; k < count; k += BLOCK) unset += f[k] == T(0) ? 1 : 0;
  return block_sum<BLOCK>(unset) == 0;
}

// Launches kernel(args) on as many co-resident blocks of `threads` as the device holds, at most
// work_blocks (the most any phase can use). Returns whether the work is taken care of: false
// when it did not launch and the caller should run its fallback. It clears only the errors of
// its own calls (an earlier one stays for the caller's launch check), and it keeps its launch's
// error, returning true, where the fallback cannot stand in: when `strict` (an environment switch
// forcing the kernel: tests and benchmarks must know that it ran) and during a CUDA graph
// capture (which a failed launch has ruined).
template <typename... P>
bool launch_cooperative(void (*kernel)(P...), int threads, int64_t work_blocks, void** args,
                        cudaStream_t stream, bool strict) {
  if (!cooperative_launch() || cudaPeekAtLastError() != cudaSuccess) return false;
  int per_sm = 0;
  const int sms = multiprocessors();
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0) != cudaSuccess ||
      per_sm <= 0 || sms <= 0) {
    cudaGetLastError();  // clear it
    return false;
  }
  const int64_t resident = static_cast<int64_t>(per_sm) * sms;
  const int64_t blocks = work_blocks < resident ? (work_blocks > 0 ? work_blocks : 1) : resident;
  if (cudaLaunchCooperativeKernel(kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), args,
                                  0, stream) == cudaSuccess)
    return true;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  const bool capturing = cudaStreamIsCapturing(stream, &capture) != cudaSuccess ||
                         capture != cudaStreamCaptureStatusNone;
  if (strict || capturing) return true;  // the error stays for the caller's launch check
  cudaGetLastError();  // clear it: the fallback runs instead
  return false;
}

}  // namespace dev
}  // namespace sinkhorn
