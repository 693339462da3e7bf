// A host emulation of the small part of CUDA that csrc/cuda uses, so that the CUDA kernels can run
// (slowly) on a machine without a GPU and be compared with the CPU operator. Test-only.
//
// Every CUDA thread of a block is a fiber (ucontext) with its own stack; the blocks of a grid run
// one after another (a cooperative launch's blocks all live at once and take turns between grid
// barriers, cooperative_groups::this_grid().sync()). A fiber runs until it reaches __syncthreads or a warp collective
// (__shfl_xor_sync, __any_sync), then the next fiber runs; a barrier is released once every
// thread of the block that has not exited reached it, a warp collective once all 32 lanes did.
// Between two barriers the threads run in index order, or in reverse order when the environment
// sets SINKHORN_EMU_ORDER=reverse, so a missing barrier shows as a difference between the orders.
//
// Blocks run in index order (reverse order too under SINKHORN_EMU_ORDER=reverse). A race that
// no thread order reveals, such as several threads adding to one location without atomics, goes
// unseen.
//
// What it checks that a GPU would also reject: a barrier or collective some threads never reach
// (reported as a deadlock), a warp collective with exited or diverged lanes, a partial mask, more
// than 48 KiB of dynamic shared memory without cudaFuncSetAttribute or more than the device's
// opt-in limit, block sizes over 1024 or over the kernel's __launch_bounds__, and grid sizes over
// the limits. What it does not: data races inside a barrier interval (beyond the two orders),
// out-of-bounds accesses, timing. Shared memory, dynamic and static, starts each block filled
// with 0xff bytes (NaN floats), so a read before a write shows. One launch runs at a time; an
// exception thrown inside a thread ends the launch and reaches its caller.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

struct uint3 {
  unsigned x, y, z;
};
// The 16-byte vector types the kernels load and store through (CUDA's vector_types.h).
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace emu {

// The H100 values the kernels may query (cudaDeviceGetAttribute).
constexpr int kSharedOptin = 232448;  // bytes of shared memory per block, opt-in
constexpr int kDefaultDynamicShared = 48 * 1024;
constexpr int kMultiprocessors = 132;
// Blocks per multiprocessor a cooperative launch may have (cudaOccupancyMaxActiveBlocksPerMultiprocessor
// reports it for every kernel): one, which keeps the emulated cooperative grids, whose threads all
// live at once, to 132 blocks.
constexpr int kCooperativeBlocksPerSM = 1;

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
unsigned char* dynamic_shared();

void syncthreads();
// cooperative_groups::this_grid().sync(): waits until every thread of the grid reached it; only in
// a cooperative launch.
void grid_sync();
// Called where a block's thread meets the declaration of a static shared variable (build.py adds
// the calls): the first thread of each block to meet it fills it with 0xff bytes, as the dynamic
// shared memory is, so a read before a write shows.
void shared_variable(void* address, size_t bytes);
// The warp collectives: every lane of the calling thread's warp passes `in` (at most 8 bytes);
// returns the lane's result. kind: 0 shuffle xor (arg: the lane mask), 1 any.
uint64_t warp_collective(int kind, unsigned mask, uint64_t in, int arg);

void set_max_dynamic_shared(const void* kernel, int bytes);
// Called at the start of a kernel declared with __launch_bounds__(bound) (build.py adds the
// call): a block of more threads would not launch on a GPU.
void check_launch_bounds(long long bound);
// Runs body once per thread of every block of the grid (the blocks in order; a cooperative grid's
// blocks take turns between its grid barriers).
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t shared,
              const std::function<void()>& body, bool cooperative = false);

struct Config {
  dim3 grid, block;
  size_t shared;
  Config(dim3 g, dim3 b, size_t s = 0, const void* /*stream*/ = nullptr)
      : grid(g), block(b), shared(s) {}
};

// kernel<<<config>>>(args...) is rewritten to emu::launch(kernel, emu::Config(config))(args...):
// the arguments are copied once, as CUDA copies them to the device, and every thread gets them.
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  Config config;
  template <typename... A>
  void operator()(A&&... args) const {
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto k = kernel;
    run_grid(reinterpret_cast<const void*>(k), config.grid, config.block, config.shared,
             [&] { std::apply(k, params); });
  }
};
template <typename... P>
Launch<P...> launch(void (*kernel)(P...), Config config) {
  return {kernel, config};
}

// cudaLaunchCooperativeKernel: args[i] points to parameter i, which is copied once.
template <typename... P, size_t... I>
void launch_cooperative(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared, void** args,
                        std::index_sequence<I...>) {
  std::tuple<std::decay_t<P>...> params(*static_cast<std::decay_t<P>*>(args[I])...);
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, shared,
           [&] { std::apply(kernel, params); }, true);
}

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a wide type");
  uint64_t in = 0;
  std::memcpy(&in, &v, sizeof(T));
  const uint64_t out = warp_collective(0, mask, in, lane_mask);
  T r;
  std::memcpy(&r, &out, sizeof(T));
  return r;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Shared variables are function statics: one instance, which the blocks (run one at a time) reuse.
#define __shared__ static

inline void __syncthreads() { ::emu::syncthreads(); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return ::emu::shfl_xor(mask, v, lane_mask);
}
inline bool __any_sync(unsigned mask, bool pred) {
  return ::emu::warp_collective(1, mask, pred ? 1 : 0, 0) != 0;
}
