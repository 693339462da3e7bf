// Emulated cooperative groups (tests/emu): the grid group's barrier, for kernels launched with
// cudaLaunchCooperativeKernel. Shadows the real header when the kernels are built for emulation.
#pragma once

#include "../emu_runtime.h"

namespace cooperative_groups {
struct grid_group {
  void sync() const { ::emu::grid_sync(); }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups
