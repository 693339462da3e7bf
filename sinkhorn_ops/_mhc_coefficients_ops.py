"""Fake kernels of mHC's fused coefficients ops (``torch.ops.sinkhorn_ops.mhc_coefficients`` and
its backward, csrc/ops/mhc_coefficients.h): RMSNorm(x) φ and the mappings, the norm's statistic
folded into the mappings kernel."""
from __future__ import annotations

import torch

from ._mhc_mappings_ops import _check as _check_mappings
from ._mhc_mappings_ops import check_b_res

_PHIS = ("phi_pre", "phi_post", "phi_res")
_WEIGHTS = ("alpha_pre", "alpha_post", "alpha_res", "b_pre", "b_post", "b_res")


def _check(op, x, phis, weights, norm_eps, iters, eps, variant):
    """The front door's checks (csrc/ops/mhc_coefficients.cpp, then the mappings'); returns an
    empty tensor shaped and typed as the raw projections."""
    n = check_b_res(op, weights[5])
    dtype = phis[0].dtype
    torch._check_type(dtype in (torch.float32, torch.float64), lambda: (
        f"{op}: expected phi_pre of dtype float32 or float64 (mHC computes its mappings in fp32), "
        f"got {dtype}"))
    torch._check_type(x.dtype.is_floating_point and torch.promote_types(x.dtype, dtype) == dtype,
                      lambda: f"{op}: expected x floating, in phi's dtype ({dtype}) or a lower "
                              f"precision, got {x.dtype}")
    torch._check_value(x.dim() >= 1 and x.shape[-1] >= 1, lambda: (
        f"{op}: expected x of shape (..., D) with D >= 1, got {tuple(x.shape)}"))
    dim = x.shape[-1]
    for name, t, width in zip(_PHIS, phis, (n, n, n * n)):
        torch._check_type(t.dtype == dtype,
                          lambda: f"{op}: expected {name} of phi_pre's dtype {dtype}, got {t.dtype}")
        torch._check_value(tuple(t.shape) == (dim, width), lambda: (
            f"{op}: expected {name} of shape {(dim, width)} for x of shape {tuple(x.shape)} and "
            f"n = {n}, got {tuple(t.shape)}"))
        torch._check_value(t.device == x.device, lambda: (
            f"{op}: expected {name} on x's device {x.device}, got {t.device}"))
    for name, t in zip(_WEIGHTS, weights):
        torch._check_type(t.dtype == dtype,
                          lambda: f"{op}: expected {name} of phi's dtype {dtype}, got {t.dtype}")
        torch._check_value(t.device == x.device,
                           lambda: f"{op}: expected {name} on x's device {x.device}, got {t.device}")
    torch._check_value(0 < norm_eps < float("inf"),
                       lambda: f"{op}: expected a finite norm_eps > 0, got {norm_eps}")
    proj = x.new_empty((*x.shape[:-1], 2 * n + n * n), dtype=dtype)
    _check_mappings(op, proj, weights, iters, eps, variant)
    return proj


@torch.library.register_fake("sinkhorn_ops::mhc_coefficients")
def _forward_fake(x, phi_pre, phi_post, phi_res, alpha_pre, alpha_post, alpha_res, b_pre, b_post,
                  b_res, norm_eps, iters, eps, variant):
    weights = (alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)
    proj = _check("mhc_coefficients", x, (phi_pre, phi_post, phi_res), weights, norm_eps, iters,
                  eps, variant)
    n = b_res.shape[0]
    batch = tuple(x.shape[:-1])
    return (proj.new_empty((*batch, n)), proj.new_empty((*batch, n)),
            proj.new_empty((*batch, n, n)), proj, proj.new_empty(batch))


@torch.library.register_fake("sinkhorn_ops::mhc_coefficients_backward")
def _backward_fake(grad_pre, grad_post, grad_res, x, phi_pre, phi_post, phi_res, proj, norm,
                   alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res, norm_eps, iters, eps,
                   variant, grad_x=True, grad_phi=True, grad_weights=True):
    op = "mhc_coefficients_backward"
    weights = (alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)
    like = _check(op, x, (phi_pre, phi_post, phi_res), weights, norm_eps, iters, eps, variant)
    torch._check_type(proj.dtype == like.dtype, lambda: (
        f"{op}: expected proj (the forward's raw projections) of phi's dtype {like.dtype}, got "
        f"{proj.dtype}"))
    torch._check_value(proj.shape == like.shape, lambda: (
        f"{op}: expected proj (the forward's raw projections) of shape {tuple(like.shape)}, got "
        f"{tuple(proj.shape)}"))
    n = b_res.shape[0]
    batch = tuple(x.shape[:-1])
    for name, t, shape in (("norm", norm, batch), ("grad_pre", grad_pre, (*batch, n)),
                           ("grad_post", grad_post, (*batch, n)),
                           ("grad_res", grad_res, (*batch, n, n))):
        if t is not None:
            torch._check_type(t.dtype == like.dtype,
                              lambda: f"{op}: expected {name} of dtype {like.dtype}, got {t.dtype}")
            torch._check_value(tuple(t.shape) == shape,
                               lambda: f"{op}: expected {name} of shape {shape}, got "
                                       f"{tuple(t.shape)}")
            torch._check_value(t.device == x.device, lambda: (
                f"{op}: expected {name} on proj's device {proj.device}, got {t.device}"))
    # grad_phi: the three φ's gradients side by side; one not asked for is empty (schema.h).
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if grad_x
            else x.new_empty((0,)),
            like.new_empty((x.shape[-1], 2 * n + n * n) if grad_phi else (0,)),
            like.new_empty((3 + 2 * n + n * n,) if grad_weights else (0,)))

# The autograd of the op and of its backward is registered in C++ (csrc/ops/mhc_autograd.cpp).
