"""nn modules built on the Sinkhorn operator."""
from .attention import SinkhornMultiheadAttention, convert_to_sinkhorn_attention

__all__ = ["SinkhornMultiheadAttention", "convert_to_sinkhorn_attention"]
