"""RMSNorm(x) φ with the norm's statistic folded into the projection's outputs (mHC's
coefficients, MATH.md section 4): ``torch.ops.sinkhorn_ops.rms_projection``, whose backward is
written out and recorded as one C++ autograd node (csrc/ops/rms_projection.cpp): no x² or
normalised copy of x in either pass, and none kept for the backward. x in a lower precision than
φ is converted in each pass (a transient copy) and saved as it came (the mHC layer's bf16 streams,
which its mixings save anyway, rather than an fp32 copy twice their size)."""
from __future__ import annotations

import torch
from torch import Tensor


def rms_projection(x: Tensor, phi: Tensor, eps: float) -> Tensor:
    """RMSNorm(x) φ without the norm's weight: (x φ) / sqrt(mean(x²) + eps).

    The backward is dφ = xᵀ dR and dx = dR φᵀ − c x with dR = dy · r, r = (mean(x²) + eps)^(-1/2)
    and c = (Σ_k dy_k y_k) · r² / D; it is made of ATen ops, so it differentiates again.

    Args:
        x: (..., D) floating tensor in phi's dtype or a lower precision; the mean is over its
            last dimension. Computed in phi's dtype, saved for the backward in its own (no
            converted copy is kept).
        phi: (D, K) projection, in the dtype the norm and both passes compute in.
        eps: added to mean(x²) under the square root.

    Returns:
        (..., K) in the matmul's dtype (phi's, or the autocast dtype's promotion with the fp32
        norm).
    """
    if x.shape[-1:] != phi.shape[:1] or phi.dim() != 2:
        raise ValueError(f"rms_projection: expected phi of shape ({x.shape[-1]}, K) for x of "
                         f"shape {tuple(x.shape)}, got {tuple(phi.shape)}")
    return torch.ops.sinkhorn_ops.rms_projection.default(x, phi, float(eps))
