"""Sinkhorn attention (MATH.md section 3): a drop-in for scaled_dot_product_attention whose
attention matrix is made (close to) doubly stochastic by a few Sinkhorn steps."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._ops import sinkhorn

__all__ = ["sinkhorn_attention"]

_CAUSAL_ERROR = (
    "sinkhorn_attention: causal attention needs steps=1 (plain causal softmax attention), got "
    "steps={steps}. Sinkhorn steps beyond the first cannot respect a causal mask: (1) the default "
    "column marginals are infeasible under it, since a lower-triangular matrix whose rows and "
    "columns all sum to 1 is the identity (MATH.md section 3), so the steps would not converge; "
    "(2) whatever the column marginals, a column step normalises key j over all queries, later "
    "ones included, so the output at position i would depend on positions after i (a leak in "
    "autoregressive training). There is no published causal Sinkhorn attention to match; use "
    "steps=1 for causal layers."
)


# Float mask entries at or below this count as masked, as -inf does (see _masked_scores).
MASKED_AT = -1e4


def _check_causal(is_causal: bool, steps: int) -> None:
    """Raises the ValueError above for causal attention with more than one step."""
    if is_causal and steps > 1:
        raise ValueError(_CAUSAL_ERROR.format(steps=steps))


def _sinkhorn_attention_with_weights(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    steps: int,
    grad: str,
) -> tuple[Tensor, Tensor]:
    """The computation behind :func:`sinkhorn_attention`; also returns the attention matrix
    P of shape (..., L, S) after dropout (what nn.MultiheadAttention returns as weights)."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, Tensor):
            raise TypeError(f"sinkhorn_attention: expected {name} to be a torch.Tensor, "
                            f"got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"sinkhorn_attention: expected {name} with at least 2 dimensions "
                             f"(..., seq, features), got shape {tuple(x.shape)}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"sinkhorn_attention: expected query and key with the same last "
                         f"dimension E, got {query.shape[-1]} and {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"sinkhorn_attention: expected key and value with the same sequence "
                         f"length S, got {key.shape[-2]} and {value.shape[-2]}")
    if query.dtype != key.dtype and not torch.is_autocast_enabled(query.device.type):
        raise TypeError(f"sinkhorn_attention: expected query and key of the same dtype, got "
                        f"{query.dtype} and {key.dtype}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"sinkhorn_attention: expected 0 <= dropout_p <= 1, got {dropout_p}")
    _check_causal(is_causal, steps)
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    # The query scaled before the product, as scaled_dot_product_attention scales its inputs:
    # in fp16, Q Kᵀ itself can overflow (1e5) where the scaled scores fit (1.4e4).
    scores = torch.matmul(query * scale, key.transpose(-2, -1))  # (..., L, S)

    mask: Tensor | None = None  # bool, True = keep, for the operator's exact masking
    if is_causal:
        if attn_mask is not None:  # as scaled_dot_product_attention
            raise ValueError("sinkhorn_attention: expected attn_mask=None with is_causal=True "
                             "(as scaled_dot_product_attention)")
        # Top-left aligned, as scaled_dot_product_attention for L != S.
        mask = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
    elif attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"sinkhorn_attention: expected attn_mask to be a torch.Tensor or "
                            f"None, got {type(attn_mask).__name__}")
        try:
            full = torch.broadcast_shapes(scores.shape, attn_mask.shape)
            if full[-2:] != scores.shape[-2:]:  # it may add batch dimensions, not queries or keys
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"sinkhorn_attention: expected attn_mask broadcastable to the "
                             f"scores' shape (..., L, S) = {tuple(scores.shape)}, got shape "
                             f"{tuple(attn_mask.shape)}") from None
        if attn_mask.dtype == torch.bool:
            mask = attn_mask
            if full != scores.shape:  # the mask carries batch dimensions the scores lack
                scores = scores.expand(full)
        elif torch.is_floating_point(attn_mask):
            scores = _masked_scores(scores, attn_mask)
        else:  # a 0/1 integer mask added to the scores would attend to the padding
            raise TypeError(f"sinkhorn_attention: expected attn_mask of dtype bool or floating "
                            f"point, got {attn_mask.dtype}")

    plan = sinkhorn(scores, mask=mask, steps=steps, start="row", grad=grad)
    if dropout_p > 0.0:
        # After normalisation, as scaled_dot_product_attention (which ignores training mode).
        plan = F.dropout(plan, p=dropout_p, training=True)
    out = torch.matmul(plan, value)
    return out, plan


def _masked_scores(scores: Tensor, attn_mask: Tensor) -> Tensor:
    """scores + attn_mask, with the mask's entries at or below MASKED_AT set to -inf, which the
    operator masks exactly (P = 0). A finite "large negative" mask does not mask under Sinkhorn:
    the normalisation is invariant to a constant added to a whole column, so a key-padding
    column of -1e9 (or torch.finfo(dtype).min, BERT's -10000) would get its full column mass
    back at the first column step, and in fp32 such scores keep no precision (-1e9 + s rounds
    s to a multiple of 64). Softmax maps these entries to 0 already (any bias below about -104
    in fp32), so softmax attention (steps=1) is unchanged, except in a row whose every key is
    masked: the softmax of finite entries spreads it uniformly, the operator gives zeros."""
    bias = attn_mask.to(scores.dtype)
    return scores + bias.masked_fill(bias <= MASKED_AT, float("-inf"))


def sinkhorn_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    steps: int = 3,
    grad: str = "unrolled",
) -> Tensor:
    """Doubly-stochastic attention with the interface of ``F.scaled_dot_product_attention``.

    Computes ``O = P V`` with ``P = sinkhorn(Q Kᵀ · scale (+ mask), steps, start="row")``
    (MATH.md section 3): the first step is the row softmax, so ``steps=1`` is exactly softmax
    attention; each further step alternately normalises the columns (every key receives the
    same mass L/S) and the rows (every query's weights sum to 1). With ``steps=3`` (default)
    this is the Sinkformers attention (Sander et al. 2022) with ``n_it=3``, which it equals
    exactly when L = S.

    Args:
        query: (..., L, E).
        key: (..., S, E); its batch dimensions broadcast against the query's.
        value: (..., S, Ev).
        attn_mask: broadcastable to (..., L, S). Bool: True keeps an entry (attends), False
            masks it. Float: added to the scores; -inf masks an entry, and so does any
            entry at or below -1e4 (-1e9, ``torch.finfo(dtype).min``, BERT's -10000): unlike
            softmax, Sinkhorn undoes a finite bias that is constant on a key's column, so a
            finite "large negative" padding mask would not mask. Integer masks raise
            TypeError, as in ``scaled_dot_product_attention``. Masked entries get
            P = 0 and the default marginals are restricted to the allowed rows and columns
            (MATH.md section 1): exact for key padding, and a query row with no allowed key
            gives an all-zero output row (never NaN).
        dropout_p: dropout probability applied to P after normalisation. As in
            ``scaled_dot_product_attention`` it is applied whenever > 0 (pass 0.0 in eval).
        is_causal: top-left causal mask (query i attends to keys j <= i), as SDPA; not with
            ``attn_mask``. Only with ``steps=1`` (causal softmax); ValueError otherwise, because
            more steps can neither meet the column marginals under a causal mask (MATH.md
            section 3) nor keep position i independent of later positions (a column step
            normalises each key over all queries). A causal pattern passed as ``attn_mask``
            is not detected: it gets the same non-causal column normalisation.
        scale: score scale; default ``1 / sqrt(E)``.
        steps: Sinkhorn normalisations (half-iterations), starting with the rows.
        grad: backward of the Sinkhorn op, "unrolled" (exact gradient of the steps run, as
            Sinkformers train) or "implicit" (see ``sinkhorn_ops.sinkhorn``).

    Returns:
        (..., L, Ev) in the matmul's dtype: the query's dtype, or the autocast dtype under
        autocast, as ``scaled_dot_product_attention``. The Sinkhorn runs in the scores' dtype
        and accumulates in fp32 (fp64 for fp64).
    """
    out, _ = _sinkhorn_attention_with_weights(query, key, value, attn_mask, dropout_p,
                                              is_causal, scale, steps, grad)
    return out
