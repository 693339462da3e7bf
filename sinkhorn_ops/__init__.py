"""sinkhorn_ops: fused batched log-domain Sinkhorn operators for PyTorch (CPU and CUDA)."""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers the torch.ops.sinkhorn_ops operators)
from . import _vmap  # noqa: F401  (their batching rules for torch.func.vmap)
from . import nn
from ._ops import SinkhornResult, sinkhorn
from .attention import sinkhorn_attention
from .mhc import (mhc_branch_input, mhc_coefficients, mhc_combine, mhc_mappings, mhc_sinkhorn,
                  mhc_v4_sinkhorn, mhc_v4_sinkhorn_loop)
from .optvq import SinkhornAssignment, balanced_assignment, sinkhorn_assign

__all__ = [
    "SinkhornAssignment",
    "SinkhornResult",
    "balanced_assignment",
    "mhc_branch_input",
    "mhc_coefficients",
    "mhc_combine",
    "mhc_mappings",
    "mhc_sinkhorn",
    "mhc_v4_sinkhorn",
    "mhc_v4_sinkhorn_loop",
    "nn",
    "sinkhorn",
    "sinkhorn_assign",
    "sinkhorn_attention",
]
__version__ = "0.1.0"
