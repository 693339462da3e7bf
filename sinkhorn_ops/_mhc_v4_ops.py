"""Fake kernels and autograd of the fused DeepSeek-V4 mHC Sinkhorn ops
(``torch.ops.sinkhorn_ops.mhc_v4_sinkhorn`` and its backward, csrc/mhc_v4_math.h)."""
from __future__ import annotations

import torch

from ._ops import _no_context, _no_double_backward

# The fused kernels' limits (csrc/mhc_v4_math.h: kMaxN, kMaxIters); larger problems run the
# PyTorch loop of sinkhorn_ops.mhc_v4_sinkhorn instead.
MAX_N = 8
MAX_ITERS = 32


def _check(op: str, logits, iters: int, eps: float) -> None:
    torch._check_type(logits.dtype in (torch.float32, torch.float64),
                      lambda: f"{op}: expected logits of dtype float32 or float64, got {logits.dtype}")
    torch._check_value(logits.dim() >= 2 and logits.shape[-1] == logits.shape[-2],
                       lambda: f"{op}: expected logits of shape (..., n, n), got {tuple(logits.shape)}")
    torch._check_value(1 <= logits.shape[-1] <= MAX_N,
                       lambda: f"{op}: expected 1 <= n <= {MAX_N}, got n = {logits.shape[-1]}")
    torch._check_value(1 <= iters <= MAX_ITERS,
                       lambda: f"{op}: expected 1 <= iters <= {MAX_ITERS}, got {iters}")
    torch._check_value(eps > 0 and eps != float("inf"),
                       lambda: f"{op}: expected a finite eps > 0, got {eps}")


@torch.library.register_fake("sinkhorn_ops::mhc_v4_sinkhorn")
def _forward_fake(logits, iters, eps):
    _check("mhc_v4_sinkhorn", logits, iters, eps)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("sinkhorn_ops::mhc_v4_sinkhorn_backward")
def _backward_fake(grad, logits, iters, eps):
    _check("mhc_v4_sinkhorn_backward", logits, iters, eps)
    torch._check_type(grad.dtype == logits.dtype, lambda: (
        f"mhc_v4_sinkhorn_backward: expected grad of the logits' dtype {logits.dtype}, got {grad.dtype}"))
    torch._check_value(grad.shape == logits.shape, lambda: (
        f"mhc_v4_sinkhorn_backward: expected grad of the logits' shape {tuple(logits.shape)}, "
        f"got {tuple(grad.shape)}"))
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, iters, eps = inputs
    ctx.save_for_backward(logits)
    ctx.options = (iters, eps)


def _backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    iters, eps = ctx.options
    return torch.ops.sinkhorn_ops.mhc_v4_sinkhorn_backward.default(grad, logits, iters, eps), \
        None, None


torch.library.register_autograd("sinkhorn_ops::mhc_v4_sinkhorn", _backward,
                                setup_context=_setup_context)
torch.library.register_autograd("sinkhorn_ops::mhc_v4_sinkhorn_backward",
                                _no_double_backward("mhc_v4_sinkhorn"), setup_context=_no_context)
