// Argument checks shared by the mHC front doors (mhc_mix.cpp, mhc_mappings.cpp).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <string>
#include <vector>

namespace sinkhorn_ops {
namespace detail {

// batch's sizes followed by tail's.
inline std::vector<int64_t> with(at::IntArrayRef batch, std::initializer_list<int64_t> tail) {
  std::vector<int64_t> s(batch.begin(), batch.end());
  s.insert(s.end(), tail);
  return s;
}

// `t`, contiguous, which must have exactly `shape`, `dtype` and the device of `like` (named
// like_name in the error).
inline at::Tensor checked(const std::string& op, const char* name, const at::Tensor& t,
                          const std::vector<int64_t>& shape, at::ScalarType dtype,
                          const at::Tensor& like, const char* like_name = "x") {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": expected ", name, " of dtype ", dtype,
                   ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), op, ": expected ", name, " of shape ",
                    at::IntArrayRef(shape), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": expected ", name, " on ", like_name,
                    "'s device ", like.device(), ", got ", t.device());
  return t.contiguous();
}

}  // namespace detail
}  // namespace sinkhorn_ops
