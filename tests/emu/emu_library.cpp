// The operator library of the emulated CUDA build (tests/emu): sinkhorn_ops' schemas under the
// namespace sinkhorn_emu. csrc/cuda/sinkhorn_cuda.cpp, rewritten by build.py, registers the CUDA
// glue and kernels for them, on the CPU dispatch key.
#include <ATen/ATen.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <stdexcept>

#include "ops/schema.h"

TORCH_LIBRARY(sinkhorn_emu, m) { sinkhorn_ops::detail::define_ops(m); }

// Self-checks of the emulation (test_cuda_emulated.py): small kernels that must give a known
// result, or an error that a GPU would also give.
namespace {

__global__ void shuffle_kernel(float* out) {
  const int t = threadIdx.x;
  float v = static_cast<float>(t);
  v = __shfl_xor_sync(0xffffffffu, v, 1);        // the neighbour's index
  const bool odd = __any_sync(0xffffffffu, t == 37);  // true in warp 1 only
  out[blockIdx.x * blockDim.x + t] = v + (odd ? 1000.0f : 0.0f);
}

__global__ void barrier_kernel(float* out) {
  __shared__ float slot[64];
  slot[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = slot[63 - threadIdx.x];
}

__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  }
}

__global__ void partial_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffu, 1.0f, 1);
}

__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Cooperative: 4 blocks of 32 threads. Each block's static shared memory must survive the grid
// barriers (the blocks take turns between them), and every block must see the others' writes.
__global__ void grid_kernel(float* out) {
  __shared__ float mine[32];
  ::emu::shared_variable(&mine, sizeof(mine));  // what build.py adds in csrc/cuda
  const int b = blockIdx.x, t = threadIdx.x;
  mine[t] = static_cast<float>(100 * b + t);
  out[32 * b + t] = static_cast<float>(t);
  cooperative_groups::this_grid().sync();
  const float next = out[32 * ((b + 1) % 4) + t];
  cooperative_groups::this_grid().sync();
  out[32 * b + t] = next + mine[t];
}

__global__ void grid_exited_kernel(float* out) {
  if (blockIdx.x == 0) return;
  cooperative_groups::this_grid().sync();
  out[threadIdx.x] = 1.0f;
}

__global__ void throwing_kernel(float* out) {
  if (threadIdx.x == 3) throw std::runtime_error("thrown by thread 3");
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

at::Tensor selftest(c10::string_view what) {
  at::Tensor out = at::zeros({128}, at::kFloat);
  float* p = out.data_ptr<float>();
  if (what == "shuffle") {
    ::emu::launch(shuffle_kernel, ::emu::Config(2, 64))(p);
  } else if (what == "barrier") {
    ::emu::launch(barrier_kernel, ::emu::Config(1, 64))(p);
  } else if (what == "deadlock") {
    ::emu::launch(deadlock_kernel, ::emu::Config(1, 32))(p);
  } else if (what == "partial_mask") {
    ::emu::launch(partial_mask_kernel, ::emu::Config(1, 32))(p);
  } else if (what == "exited_lane") {
    ::emu::launch(exited_lane_kernel, ::emu::Config(1, 32))(p);
  } else if (what == "throw") {
    ::emu::launch(throwing_kernel, ::emu::Config(1, 32))(p);
  } else if (what == "shared_limit") {
    ::emu::launch(barrier_kernel, ::emu::Config(1, 64, 64 * 1024))(p);
  } else if (what == "grid") {
    void* args[] = {&p};
    cudaLaunchCooperativeKernel(grid_kernel, dim3(4), dim3(32), args);
  } else if (what == "grid_not_cooperative") {
    ::emu::launch(grid_kernel, ::emu::Config(4, 32))(p);
  } else if (what == "grid_exited") {
    void* args[] = {&p};
    cudaLaunchCooperativeKernel(grid_exited_kernel, dim3(2), dim3(32), args);
  } else if (what == "grid_limit") {
    void* args[] = {&p};
    cudaLaunchCooperativeKernel(grid_kernel, dim3(1000), dim3(32), args);
  } else if (what == "block_limit") {
    ::emu::launch(barrier_kernel, ::emu::Config(1, 2048))(p);
  } else {
    TORCH_CHECK_VALUE(false, "emu_selftest: unknown check ", what);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sinkhorn_emu, m) { m.def("emu_selftest(str what) -> Tensor", &selftest); }
