// num / den, 0 where den is 0, and a derivative that is 0 there too (not inf or NaN), for the
// ATen forms that autograd and forward-mode AD differentiate.
#pragma once

#include <ATen/ATen.h>

namespace sinkhorn_ops {
namespace detail {

inline at::Tensor safe_div(const at::Tensor& num, const at::Tensor& den) {
  const auto zero = den == 0;
  return (num / den.masked_fill(zero, 1)).masked_fill(zero, 0);
}

}  // namespace detail
}  // namespace sinkhorn_ops
