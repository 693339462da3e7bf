"""Fake kernels of the fused mHC Sinkhorn ops (csrc/mhc_v4_math.h): DeepSeek-V4's
(``torch.ops.sinkhorn_ops.mhc_v4_sinkhorn``) and the paper's (``mhc_sinkhorn``, the same kernel
on the transpose with eps = 0), each with its backward."""
from __future__ import annotations

from typing import Optional

import torch

# The fused kernels' limits (csrc/mhc_v4_math.h: kMaxN, kMaxIters); larger problems run the
# PyTorch loop of sinkhorn_ops.mhc_v4_sinkhorn instead.
MAX_N = 8
MAX_ITERS = 32


def fused(x: torch.Tensor, iters: int) -> bool:
    """Whether the fused kernels take logits x (fp32/fp64, (..., n, n)) and iters."""
    return 1 <= x.shape[-1] <= MAX_N and iters <= MAX_ITERS and x.device.type in ("cpu", "cuda")


def _check(op: str, logits, iters: int, eps: Optional[float] = None) -> None:
    """The front door's checks (csrc/ops/mhc_v4.cpp); eps is None for the paper's op."""
    torch._check_type(logits.dtype in (torch.float32, torch.float64),
                      lambda: f"{op}: expected logits of dtype float32 or float64, got {logits.dtype}")
    torch._check_value(logits.dim() >= 2 and logits.shape[-1] == logits.shape[-2],
                       lambda: f"{op}: expected logits of shape (..., n, n), got {tuple(logits.shape)}")
    torch._check_value(1 <= logits.shape[-1] <= MAX_N,
                       lambda: f"{op}: expected 1 <= n <= {MAX_N}, got n = {logits.shape[-1]}")
    torch._check_value(1 <= iters <= MAX_ITERS,
                       lambda: f"{op}: expected 1 <= iters <= {MAX_ITERS}, got {iters}")
    if eps is not None:
        torch._check_value(eps > 0 and eps != float("inf"),
                           lambda: f"{op}: expected a finite eps > 0, got {eps}")


def _check_grad(op: str, grad, logits) -> None:
    torch._check_type(grad.dtype == logits.dtype, lambda: (
        f"{op}: expected grad of the logits' dtype {logits.dtype}, got {grad.dtype}"))
    torch._check_value(grad.shape == logits.shape, lambda: (
        f"{op}: expected grad of the logits' shape {tuple(logits.shape)}, got {tuple(grad.shape)}"))


@torch.library.register_fake("sinkhorn_ops::mhc_v4_sinkhorn")
def _forward_fake(logits, iters, eps):
    _check("mhc_v4_sinkhorn", logits, iters, eps)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("sinkhorn_ops::mhc_v4_sinkhorn_backward")
def _backward_fake(grad, logits, iters, eps):
    _check("mhc_v4_sinkhorn_backward", logits, iters, eps)
    _check_grad("mhc_v4_sinkhorn_backward", grad, logits)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("sinkhorn_ops::mhc_sinkhorn")
def _paper_forward_fake(logits, iters):
    _check("mhc_sinkhorn", logits, iters)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("sinkhorn_ops::mhc_sinkhorn_backward")
def _paper_backward_fake(grad, logits, iters):
    _check("mhc_sinkhorn_backward", logits, iters)
    _check_grad("mhc_sinkhorn_backward", grad, logits)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# The autograd of both ops and of their backwards is registered in C++ (csrc/ops/mhc_autograd.cpp).
