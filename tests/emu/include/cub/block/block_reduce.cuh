// Emulated cub::BlockReduce (tests/emu): Sum through shared storage and a barrier. As in CUB, the
// total is defined in thread 0 only; the other threads get NaN (or the type's max), so a caller
// that reads it elsewhere fails the comparison with the CPU operator.
#pragma once

#include <limits>

#include "../../cuda_runtime.h"

namespace cub {

template <typename T, int BLOCK>
class BlockReduce {
 public:
  struct TempStorage {
    T values[BLOCK];
  };
  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}
  T Sum(T v) {
    storage_.values[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x != 0)
      return std::numeric_limits<T>::has_quiet_NaN ? std::numeric_limits<T>::quiet_NaN()
                                                   : std::numeric_limits<T>::max();
    T total = storage_.values[0];
    for (int t = 1; t < BLOCK; ++t) total += storage_.values[t];
    return total;
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
