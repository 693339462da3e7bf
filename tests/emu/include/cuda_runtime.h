// Emulated CUDA runtime (tests/emu): the types, launch syntax support and the few host calls
// csrc/cuda uses. Shadows the real header when the kernels are built for emulation.
#pragma once

#include <cstring>

#include "../emu_runtime.h"

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrCooperativeLaunch = 95,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = ::emu::kMultiprocessors; return cudaSuccess;
    case cudaDevAttrCooperativeLaunch: *value = 1; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = ::emu::kSharedOptin; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
// The emulated stream runs everything at once, in order.
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice = 3 };
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
// A kernel's attributes: the emulation does not know the static shared memory a kernel
// declares (its variables are allocated per block at run time), so it reports none.
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
};
template <typename... P>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*)(P...)) {
  attr->sharedSizeBytes = 0;
  return cudaSuccess;
}
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value > ::emu::kSharedOptin)
    return cudaErrorInvalidValue;
  ::emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}
// Cooperative launches: the same number of resident blocks for every kernel and block size (the
// emulation's choice, emu::kCooperativeBlocksPerSM); the launch runs the grid's blocks together.
template <typename... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*)(P...), int,
                                                          size_t) {
  *blocks = ::emu::kCooperativeBlocksPerSM;
  return cudaSuccess;
}
template <typename... P>
cudaError_t cudaLaunchCooperativeKernel(void (*kernel)(P...), dim3 grid, dim3 block, void** args,
                                        size_t shared = 0, cudaStream_t = nullptr) {
  ::emu::launch_cooperative(kernel, grid, block, shared, args, std::index_sequence_for<P...>{});
  return cudaSuccess;
}
