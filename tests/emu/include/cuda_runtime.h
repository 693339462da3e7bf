// Emulated CUDA runtime (tests/emu): the types, launch syntax support and the few host calls
// csrc/cuda uses. Shadows the real header when the kernels are built for emulation.
#pragma once

#include <cstdlib>
#include <cstring>

#include "../emu_runtime.h"

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorCooperativeLaunchTooLarge = 720
};
enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2
};
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
// The last error of a runtime call (only the emulated cooperative launch records one: other
// failures throw).
inline cudaError_t& emu_last_error() {
  static cudaError_t error = cudaSuccess;
  return error;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu_last_error();
  emu_last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu_last_error(); }
// The emulated stream is never captured.
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
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
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value > ::emu::kSharedOptin)
    return cudaErrorInvalidValue;
  ::emu::set_max_dynamic_shared(kernel, value);
  return cudaSuccess;
}
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
// Cooperative launches: the same number of resident blocks for every kernel and block size (the
// emulation's choice, emu::kCooperativeBlocksPerSM); the launch runs the grid's blocks together.
template <typename... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*)(P...), int,
                                                          size_t) {
  *blocks = ::emu::kCooperativeBlocksPerSM;
  return cudaSuccess;
}
// SINKHORN_EMU_COOPERATIVE=fail makes every cooperative launch fail as a GPU's may (too many
// blocks for the device, with other work resident): the callers' fallbacks then run.
template <typename... P>
cudaError_t cudaLaunchCooperativeKernel(void (*kernel)(P...), dim3 grid, dim3 block, void** args,
                                        size_t shared = 0, cudaStream_t = nullptr) {
  static const bool fail = [] {
    const char* v = std::getenv("SINKHORN_EMU_COOPERATIVE");
    return v != nullptr && std::strcmp(v, "fail") == 0;
  }();
  if (fail) return emu_last_error() = cudaErrorCooperativeLaunchTooLarge;
  ::emu::launch_cooperative(kernel, grid, block, shared, args, std::index_sequence_for<P...>{});
  return cudaSuccess;
}
