// Helpers shared by the GoogleTest files: the devices to run on, and the literal ATen formulas
// the tests compare against.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace test_util {

// CPU, and CUDA when one is present.
inline std::vector<at::Device> devices() {
  std::vector<at::Device> d{at::kCPU};
  if (at::hasCUDA()) d.emplace_back(at::kCUDA);
  return d;
}

// DeepSeek-V4's mHC Sinkhorn as MATH.md section 1 states it.
inline at::Tensor v4_formula(const at::Tensor& x, int64_t iters, double eps) {
  auto c = at::softmax(x, -1) + eps;
  c = c / (c.sum(-2, true) + eps);
  for (int64_t t = 1; t < iters; ++t) {
    c = c / (c.sum(-1, true) + eps);
    c = c / (c.sum(-2, true) + eps);
  }
  return c;
}

}  // namespace test_util
