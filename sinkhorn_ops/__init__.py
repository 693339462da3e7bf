"""sinkhorn_ops: fused batched log-domain Sinkhorn operators for PyTorch (CPU and CUDA)."""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers the torch.ops.sinkhorn_ops operators)
from . import nn
from ._ops import SinkhornResult, sinkhorn
from .attention import sinkhorn_attention

__all__ = ["sinkhorn", "SinkhornResult", "sinkhorn_attention", "nn"]
__version__ = "0.1.0"

from .mhc import mhc_branch_input, mhc_combine, mhc_sinkhorn, mhc_v4_sinkhorn  # noqa: E402

__all__ += ["mhc_sinkhorn", "mhc_v4_sinkhorn", "mhc_branch_input", "mhc_combine"]
from .optvq import SinkhornAssignment, balanced_assignment, sinkhorn_assign  # noqa: E402

__all__ += ["sinkhorn_assign", "balanced_assignment", "SinkhornAssignment"]
