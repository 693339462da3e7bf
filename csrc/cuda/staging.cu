// Host side of the kernels' shared-memory budgets (kernel_common.cuh): how many bytes an n x m
// problem staged by the block kernels takes, within the current device's opt-in limit (also
// asked by the large forward's fused pass), whether a block of a thread-per-problem backward
// keeps its histories in shared memory, and the device attributes behind both.
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

namespace {
// One attribute of the current device, or 0 if a query fails (the callers' uses are
// optimisations, not requirements). Attribute queries do not synchronise with the device.
int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&value, attr, device) != cudaSuccess) {
    cudaGetLastError();  // clear it
    return 0;
  }
  return value;
}
}  // namespace

int shared_memory_optin() { return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin); }

int multiprocessors() { return device_attribute(cudaDevAttrMultiProcessorCount); }

bool cooperative_launch() { return device_attribute(cudaDevAttrCooperativeLaunch) != 0; }

}  // namespace dev
}  // namespace sinkhorn
