"""nn modules built on the Sinkhorn operator."""
from .attention import SinkhornMultiheadAttention, convert_to_sinkhorn_attention

__all__ = ["SinkhornMultiheadAttention", "convert_to_sinkhorn_attention"]

from .mhc import (  # noqa: E402
    ManifoldConstrainedHyperConnections,
    MHCMappings,
    expand_streams,
    reduce_streams,
)

__all__ += ["ManifoldConstrainedHyperConnections", "MHCMappings", "expand_streams",
            "reduce_streams"]
from .optvq import SinkhornVectorQuantizer, codebook_stats  # noqa: E402

__all__ += ["SinkhornVectorQuantizer", "codebook_stats"]
