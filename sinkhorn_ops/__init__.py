"""sinkhorn_ops: fused batched log-domain Sinkhorn operators for PyTorch (CPU and CUDA)."""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers the torch.ops.sinkhorn_ops operators)
from . import nn
from ._ops import SinkhornResult, sinkhorn
from .attention import sinkhorn_attention

__all__ = ["sinkhorn", "SinkhornResult", "sinkhorn_attention", "nn"]
__version__ = "0.1.0"
