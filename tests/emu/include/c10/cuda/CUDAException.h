// Emulated c10/cuda/CUDAException.h (tests/emu): emulated launches throw on error themselves;
// the check reports an error a runtime call recorded (the emulated cooperative launch's).
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_KERNEL_LAUNCH_CHECK()                                                  \
  do {                                                                                  \
    const cudaError_t emu_error = cudaGetLastError();                                   \
    TORCH_CHECK(emu_error == cudaSuccess, "CUDA error (emulated): code ", int(emu_error)); \
  } while (0)
