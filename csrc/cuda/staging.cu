// Host side of the shared-memory staging of the block kernels (kernel_common.cuh): how many
// bytes an n x m problem takes, within the current device's opt-in limit (also asked by the
// large forward's fused pass).
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

}  // namespace dev
}  // namespace sinkhorn
