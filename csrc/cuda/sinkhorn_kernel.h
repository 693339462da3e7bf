// Entry points of the CUDA forward kernel (sinkhorn_kernel.cu). Plain params only, no ATen, so
// the kernel file compiles standalone with nvcc and the ATen glue stays in sinkhorn_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "../sinkhorn_params.h"

namespace sinkhorn {

// Bytes of device scratch that launch_forward(p) expects in p.workspace (may be 0).
size_t forward_workspace_bytes(const FwdParams& p);

// Enqueues the forward of all p.B problems on `stream`. Never synchronises; launch errors are
// left for the caller to collect (cudaGetLastError). Does nothing when p.B == 0.
void launch_forward(const FwdParams& p, cudaStream_t stream);

}  // namespace sinkhorn
