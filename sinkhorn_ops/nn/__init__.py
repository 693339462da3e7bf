"""nn modules built on the Sinkhorn operator."""
from .attention import SinkhornMultiheadAttention, convert_to_sinkhorn_attention
from .mhc import ManifoldConstrainedHyperConnections, MHCMappings, expand_streams, reduce_streams
from .optvq import SinkhornVectorQuantizer, codebook_stats

__all__ = [
    "MHCMappings",
    "ManifoldConstrainedHyperConnections",
    "SinkhornMultiheadAttention",
    "SinkhornVectorQuantizer",
    "codebook_stats",
    "convert_to_sinkhorn_attention",
    "expand_streams",
    "reduce_streams",
]
