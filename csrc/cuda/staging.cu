// Host side of the kernels' shared-memory budgets (kernel_common.cuh): how many bytes an n x m
// problem staged by the block kernels takes, within the current device's opt-in limit (also
// asked by the large forward's fused pass), whether a block of a thread-per-problem backward
// keeps its histories in shared memory, and the device attributes behind both.
#include <map>
#include <mutex>
#include <utility>

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

void raise_dynamic_shared(const void* kernel, size_t bytes) {
  // The attribute belongs to the kernel on a device, not to a thread or a stream: set to each
  // launch's own size, a thread's 64 KiB could land between another's 96 KiB and its launch,
  // which would then fail. Under the lock the limit only grows.
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> limits;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return;  // the launch reports the failure
  }
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& limit = limits[{device, kernel}];
  if (bytes <= limit) return;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes)) == cudaSuccess) {
    limit = bytes;
  } else {
    cudaGetLastError();  // as before: the launch reports what it cannot do
  }
}

int shared_memory_optin() { return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin); }

int multiprocessors() { return device_attribute(cudaDevAttrMultiProcessorCount); }

bool cooperative_launch() { return device_attribute(cudaDevAttrCooperativeLaunch) != 0; }

}  // namespace dev
}  // namespace sinkhorn
