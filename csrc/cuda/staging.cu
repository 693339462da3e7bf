// Host side of the kernels' shared-memory budgets (kernel_common.cuh): how many bytes an n x m
// problem staged by the block kernels takes, within the current device's opt-in limit (also
// asked by the large forward's fused pass), and how many threads a block of a thread-per-problem
// backward can keep their histories in shared memory.
#include "../env_flag.h"
#include "kernel_common.cuh"

namespace sinkhorn {
namespace dev {

size_t staged_bytes(int64_t n, int64_t m, size_t elem) {
  static const bool disabled = env_is("SINKHORN_CUDA_SMEM", "0");
  const size_t bytes = static_cast<size_t>(n) * static_cast<size_t>(m) * elem;
  if (disabled || bytes == 0 || bytes > kMaxStagedBytes) return 0;
  // Room for the kernels' static shared memory (block reductions).
  return bytes + 4096 <= static_cast<size_t>(shared_memory_optin()) ? bytes : 0;
}

size_t history_bytes(size_t per_thread, int threads) {
  static const bool local = env_is("SINKHORN_CUDA_HISTORY", "local");
  const size_t bytes = per_thread * static_cast<size_t>(threads);
  if (local || bytes == 0 || bytes > kHistoryBytes ||
      bytes > static_cast<size_t>(shared_memory_optin()))
    return 0;
  return bytes;
}

int shared_memory_optin() {
  int device = 0, optin = 0;
  // Attribute queries: host calls that do not synchronise with the device.
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
          cudaSuccess) {
    cudaGetLastError();  // clear it: the callers' uses are optimisations, not requirements
    return 0;
  }
  return optin;
}

int multiprocessors() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

}  // namespace dev
}  // namespace sinkhorn
