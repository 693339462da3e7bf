// Front door of the mHC stream-mixing operators.
#include "mhc_mix.h"

#include <string>

#include "../mhc_mix_math.h"
#include "arg_checks.h"
#include "sinkhorn_forward.h"  // kernel_dtype, accumulation_type

namespace sinkhorn_ops {
namespace detail {

MixCall prepare_mhc_mix(bool post, const at::Tensor& x, const at::Tensor& y,
                        const at::Tensor& h_pre, const at::Tensor& h_post,
                        const at::Tensor& h_res, const at::Tensor& grad) {
  const bool backward = grad.defined();
  const std::string op = std::string(post ? "mhc_post_mix" : "mhc_pre_mix") +
                         (backward ? "_backward" : "");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                       x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   op, ": expected x of dtype float32, float64, float16 or bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": expected x of shape (..., n, C), got ", x.sizes());
  const int64_t n = x.size(-2), C = x.size(-1);
  TORCH_CHECK_VALUE(n >= 1 && n <= sinkhorn::mix::kMaxStreams, op, ": expected 1 <= n <= ",
                    sinkhorn::mix::kMaxStreams, " streams, got x of shape ", x.sizes());
  const auto batch = x.sizes().slice(0, x.dim() - 2);
  const auto acc = accumulation_type(x.scalar_type());
  const auto dtype = x.scalar_type();
  MixCall c;
  c.x = x.contiguous();
  if (post) {
    c.y = checked(op, "y", y, with(batch, {C}), dtype, x);
    c.h_post = checked(op, "h_post", h_post, with(batch, {n}), acc, x);
    c.h_res = checked(op, "h_res", h_res, with(batch, {n, n}), acc, x);
  } else {
    c.h_pre = checked(op, "h_pre", h_pre, with(batch, {n}), acc, x);
  }
  if (backward) {
    c.grad = checked(op, "grad", grad, post ? with(batch, {n, C}) : with(batch, {C}), dtype, x);
    c.out = at::empty(x.sizes(), c.x.options());
    if (post) {
      c.grad_y = at::empty(with(batch, {C}), c.x.options());
      c.grad_h_post = at::empty(with(batch, {n}), c.x.options().dtype(acc));
      c.grad_h_res = at::empty(with(batch, {n, n}), c.x.options().dtype(acc));
    } else {
      c.grad_h_pre = at::empty(with(batch, {n}), c.x.options().dtype(acc));
    }
  } else {
    c.out = at::empty(post ? with(batch, {n, C}) : with(batch, {C}), c.x.options());
  }
  auto ptr = [](const at::Tensor& t) -> void* { return t.defined() ? t.data_ptr() : nullptr; };
  auto& p = c.params;
  p.post = post;
  p.backward = backward;
  p.x = ptr(c.x);
  p.y = ptr(c.y);
  p.h_pre = ptr(c.h_pre);
  p.h_post = ptr(c.h_post);
  p.h_res = ptr(c.h_res);
  p.grad = ptr(c.grad);
  p.out = ptr(c.out);
  p.grad_y = ptr(c.grad_y);
  p.grad_h_pre = ptr(c.grad_h_pre);
  p.grad_h_post = ptr(c.grad_h_post);
  p.grad_h_res = ptr(c.grad_h_res);
  p.T = c10::multiply_integers(batch);
  p.n = n;
  p.C = C;
  p.dtype = kernel_dtype(dtype);
  return c;
}

}  // namespace detail
}  // namespace sinkhorn_ops
