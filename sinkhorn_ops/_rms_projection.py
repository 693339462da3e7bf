"""RMSNorm(x) φ with the norm's statistic folded into the projection's outputs, and its backward
written out, so that neither pass builds a temporary the size of x (mHC's coefficients, MATH.md
section 4), nor does autograd keep one: x in a lower precision than φ is converted in each pass
and saved as it came (the mHC layer's bf16 streams, which its mixings save anyway, rather than
an fp32 copy twice their size)."""
from __future__ import annotations

import torch
from torch import Tensor


class _RMSProjection(torch.autograd.Function):
    """y = (x φ) · r with r = (mean(x²) + eps)^(-1/2) over the last dimension.

    Autograd through the plain formula saves x² and makes four passes over x in the backward;
    here the forward reads x once for the norm (a reduction, no x² tensor) and once in the matmul,
    and the backward is two matmuls and one pass:

        dR = dy · r,  dφ = xᵀ dR,  dx = dR φᵀ − c · x  with  c = (Σ_k dy_k y_k) · r² / D,

    since y = R r with R = x φ and dr/dx = −r³ x / D (so Σ_k dy_k R_k · dr/dx = −c x).
    """

    @staticmethod
    def forward(ctx, x: Tensor, phi: Tensor, eps: float) -> Tensor:
        saved, x = x, x.to(phi.dtype)
        d = x.shape[-1]
        inv_rms = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / d + eps)
        y = (x @ phi) * inv_rms
        ctx.save_for_backward(saved, phi, y, inv_rms)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        saved, phi, y, inv_rms = ctx.saved_tensors
        x = saved.to(phi.dtype)
        d = x.shape[-1]
        dr = dy * inv_rms
        dx = dphi = None
        if ctx.needs_input_grad[0]:
            c = (dy * y).sum(-1, keepdim=True) * inv_rms.square() / d
            dx = (dr @ phi.mT).addcmul_(x, c, value=-1).to(saved.dtype)
        if ctx.needs_input_grad[1]:
            dphi = x.reshape(-1, d).mT @ dr.reshape(-1, dr.shape[-1])
        return dx, dphi, None


def rms_projection(x: Tensor, phi: Tensor, eps: float) -> Tensor:
    """RMSNorm(x) φ without the norm's weight: (x φ) / sqrt(mean(x²) + eps).

    Args:
        x: (..., D) floating tensor; the mean is over its last dimension. Computed in phi's
            dtype, saved for the backward in its own (no converted copy is kept).
        phi: (D, K) projection, in the dtype the norm and both passes compute in.
        eps: added to mean(x²) under the square root.

    Returns:
        (..., K) in the matmul's dtype (phi's, or the autocast dtype's promotion with the fp32
        norm).
    """
    if x.shape[-1:] != phi.shape[:1] or phi.dim() != 2:
        raise ValueError(f"rms_projection: expected phi of shape ({x.shape[-1]}, K) for x of "
                         f"shape {tuple(x.shape)}, got {tuple(phi.shape)}")
    return _RMSProjection.apply(x, phi, float(eps))
