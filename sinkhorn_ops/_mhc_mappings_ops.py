"""Fake kernels of mHC's fused mappings ops (``torch.ops.sinkhorn_ops.mhc_mappings`` and its
backward, csrc/mhc_mappings_math.h), and the test of whether they apply."""
from __future__ import annotations

import torch

from ._mhc_v4_ops import MAX_ITERS, MAX_N

VARIANTS = ("paper", "v4")
_WEIGHTS = ("alpha_pre", "alpha_post", "alpha_res", "b_pre", "b_post", "b_res")


def fused(n: int, iters: int, device: torch.device) -> bool:
    """Whether the fused kernels take n streams, iters and the device."""
    return 1 <= n <= MAX_N and 1 <= iters <= MAX_ITERS and device.type in ("cpu", "cuda")


def check_b_res(op, b_res):
    """b_res (n, n) with n within the fused kernels' limit; returns n."""
    torch._check_value(b_res.dim() == 2 and b_res.shape[0] == b_res.shape[1]
                       and 1 <= b_res.shape[0] <= MAX_N, lambda: (
                           f"{op}: expected b_res of shape (n, n) with 1 <= n <= {MAX_N} (the "
                           f"fused kernel's largest n), got {tuple(b_res.shape)}"))
    return b_res.shape[0]


def _check(op, proj, weights, iters, eps, variant):
    """The front door's checks (csrc/ops/mhc_mappings.cpp); returns n."""
    torch._check_type(proj.dtype in (torch.float32, torch.float64), lambda: (
        f"{op}: expected proj of dtype float32 or float64 (mHC computes its mappings in fp32), "
        f"got {proj.dtype}"))
    torch._check_value(variant in VARIANTS,
                       lambda: f'{op}: expected variant "paper" or "v4", got "{variant}"')
    n = check_b_res(op, weights[5])
    k = 2 * n + n * n
    torch._check_value(proj.dim() >= 1 and proj.shape[-1] == k, lambda: (
        f"{op}: expected proj of shape (..., 2n + n^2) = (..., {k}) for n = {n}, "
        f"got {tuple(proj.shape)}"))
    torch._check_value(1 <= iters <= MAX_ITERS,
                       lambda: f"{op}: expected 1 <= iters <= {MAX_ITERS}, got {iters}")
    torch._check_value(variant != "v4" or (0 < eps < float("inf")), lambda: (
        f'{op}: expected a finite eps > 0 for variant "v4", got {eps}'))
    for w, (name, t) in enumerate(zip(_WEIGHTS, weights)):
        shape = tuple(t.shape) if w < 3 else ((n,) if w < 5 else (n, n))
        if w < 3:
            torch._check_value(t.numel() == 1, lambda: (
                f"{op}: expected {name} to hold one value (a scalar gate), got shape "
                f"{tuple(t.shape)}"))
        torch._check_type(t.dtype == proj.dtype,
                          lambda: f"{op}: expected {name} of dtype {proj.dtype}, got {t.dtype}")
        torch._check_value(t.device == proj.device, lambda: (
            f"{op}: expected {name} on proj's device {proj.device}, got {t.device}"))
        torch._check_value(tuple(t.shape) == shape,
                           lambda: f"{op}: expected {name} of shape {shape}, got {tuple(t.shape)}")
    return n


@torch.library.register_fake("sinkhorn_ops::mhc_mappings")
def _forward_fake(proj, alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res, iters, eps,
                  variant):
    weights = (alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)
    n = _check("mhc_mappings", proj, weights, iters, eps, variant)
    batch = tuple(proj.shape[:-1])
    return (proj.new_empty((*batch, n)), proj.new_empty((*batch, n)),
            proj.new_empty((*batch, n, n)))


@torch.library.register_fake("sinkhorn_ops::mhc_mappings_backward")
def _backward_fake(grad_pre, grad_post, grad_res, proj, alpha_pre, alpha_post, alpha_res, b_pre,
                   b_post, b_res, iters, eps, variant):
    weights = (alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)
    n = _check("mhc_mappings_backward", proj, weights, iters, eps, variant)
    batch = tuple(proj.shape[:-1])
    for name, g, shape in (("grad_pre", grad_pre, (*batch, n)), ("grad_post", grad_post, (*batch, n)),
                           ("grad_res", grad_res, (*batch, n, n))):
        if g is not None:
            torch._check_type(g.dtype == proj.dtype,
                              lambda: f"mhc_mappings_backward: expected {name} of dtype "
                                      f"{proj.dtype}, got {g.dtype}")
            torch._check_value(tuple(g.shape) == shape,
                               lambda: f"mhc_mappings_backward: expected {name} of shape "
                                       f"{shape}, got {tuple(g.shape)}")
            torch._check_value(g.device == proj.device,
                               lambda: f"mhc_mappings_backward: expected {name} on proj's "
                                       f"device {proj.device}, got {g.device}")
    # grad_weights: the six weights' gradients flattened in their order (csrc/ops/schema.h).
    return (torch.empty_like(proj, memory_format=torch.contiguous_format),
            proj.new_empty((3 + 2 * n + n * n,)))


# The autograd of the op and of its backward is registered in C++ (csrc/ops/mhc_autograd.cpp).
