"""SinkhornMultiheadAttention, a drop-in for torch.nn.MultiheadAttention, and the converter that
swaps it into an existing model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._ops import GRAD_MODES
from ..attention import _check_causal, _sinkhorn_attention_with_weights

__all__ = ["SinkhornMultiheadAttention", "convert_to_sinkhorn_attention"]


def _keep_python_forward(module: nn.Module, args: tuple) -> None:
    """A no-op forward pre-hook. nn.TransformerEncoderLayer, in eval mode without grad, skips
    ``self_attn.forward`` and runs the fused softmax kernel ``torch._transformer_encoder_layer_fwd``
    on the attention's weights: that silently computes softmax attention. It takes that fast
    path only when no module of the layer has hooks, so this hook keeps our forward in use."""


def _additive(mask: Tensor | None, dtype: torch.dtype, name: str) -> Tensor | None:
    """nn.MultiheadAttention's mask convention (bool: True = NOT allowed; float: added) as an
    additive float mask in ``dtype`` (-inf where masked)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"SinkhornMultiheadAttention: expected {name} of dtype bool or floating "
                        f"point, got {mask.dtype}")
    return mask.to(dtype)


class SinkhornMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention whose softmax is replaced by ``steps`` Sinkhorn normalisations.

    Same constructor arguments, parameters (``in_proj_weight`` or ``q/k/v_proj_weight``,
    ``in_proj_bias``, ``out_proj``, ``bias_k``, ``bias_v``), state_dict, forward signature and
    return values as :class:`torch.nn.MultiheadAttention`; ``steps=1`` gives exactly its output,
    except for a query whose every key is masked (zeros here, the uniform average of the values
    there when the mask is finite, NaN when it is -inf or bool). Float mask entries at or below
    -1e4 mask as -inf does (see :func:`sinkhorn_ops.sinkhorn_attention`).

    Args (beyond nn.MultiheadAttention's):
        steps: Sinkhorn normalisations starting with the rows (MATH.md section 3).
        grad: "unrolled" or "implicit", the backward of the Sinkhorn op.

    Shapes (N batch, L target, S source, E embed_dim): query (L, N, E), or (N, L, E) with
    ``batch_first``, or (L, E) unbatched; key (S, N, kdim), value (S, N, vdim) likewise.
    key_padding_mask (N, S) or (S,), attn_mask (L, S) or (N * num_heads, L, S); bool masks
    mark with True the positions NOT allowed to attend, float masks are added to the scores.

    Causal masks: with ``steps > 1``, ``is_causal=True`` raises ValueError (see
    :func:`sinkhorn_ops.sinkhorn_attention`: the column steps would make position i depend on
    later positions); nn.TransformerEncoder sets it by itself when it detects a causal mask. A
    causal attn_mask given without the hint is not detected and is normalised over all queries.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        steps: int = 3,
        grad: str = "unrolled",
    ) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias,
                         add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, kdim=kdim,
                         vdim=vdim, batch_first=batch_first, device=device, dtype=dtype)
        self._init_sinkhorn(steps, grad)

    def _init_sinkhorn(self, steps: int, grad: str) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"SinkhornMultiheadAttention: expected steps to be an int >= 1, "
                             f"got {steps!r}")
        if grad not in GRAD_MODES:
            raise ValueError(f"SinkhornMultiheadAttention: expected grad in {GRAD_MODES}, got "
                             f"{grad!r}")
        self.steps = steps
        self.grad = grad
        if _keep_python_forward not in self._forward_pre_hooks.values():
            self.register_forward_pre_hook(_keep_python_forward)

    def extra_repr(self) -> str:
        return f"steps={self.steps}, grad={self.grad!r}"

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Returns ``(attn_output, attn_weights)``: attn_output in the layout of ``query``
        ((L, N, E), (N, L, E) with batch_first, or (L, E)); attn_weights (N, L, S) averaged
        over heads, (N, num_heads, L, S) with ``average_attn_weights=False`` (no N when
        unbatched), after dropout as nn.MultiheadAttention, or None without need_weights."""
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("SinkhornMultiheadAttention: nested tensor inputs are not supported; "
                             "build nn.TransformerEncoder with enable_nested_tensor=False (or "
                             "use convert_to_sinkhorn_attention, which sets it)")
        if is_causal and attn_mask is None:  # as nn.MultiheadAttention
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use "
                               "the Transformer module method `generate_square_subsequent_mask` "
                               "to create this mask.")
        _check_causal(is_causal, self.steps)

        is_batched = query.dim() == 3
        if is_batched:
            if not self.batch_first:  # work batch-first: (N, L, E)
                query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        else:
            query, key, value = (x.unsqueeze(0) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        bsz, tgt_len, embed_dim = query.shape
        if embed_dim != self.embed_dim:
            raise ValueError(f"SinkhornMultiheadAttention: expected query with embed_dim "
                             f"{self.embed_dim} features, got {embed_dim}")
        heads, head_dim = self.num_heads, self.head_dim

        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q)
        k = F.linear(key, w_k, b_k)
        v = F.linear(value, w_v, b_v)

        dtype = q.dtype  # the autocast dtype under autocast
        attn_mask = _additive(attn_mask, dtype, "attn_mask")
        key_padding_mask = _additive(key_padding_mask, dtype, "key_padding_mask")
        src_len = key.shape[1]
        if attn_mask is not None and tuple(attn_mask.shape) not in (
                (tgt_len, src_len), (bsz * heads, tgt_len, src_len)):
            raise ValueError(f"SinkhornMultiheadAttention: expected attn_mask of shape (L, S) = "
                             f"{(tgt_len, src_len)} or (N * num_heads, L, S) = "
                             f"{(bsz * heads, tgt_len, src_len)}, got {tuple(attn_mask.shape)}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (bsz, src_len):
            raise ValueError(f"SinkhornMultiheadAttention: expected key_padding_mask of shape "
                             f"(N, S) = {(bsz, src_len)} (or (S,) unbatched), got "
                             f"{tuple(key_padding_mask.shape)}")

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.to(k.dtype).expand(bsz, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.to(v.dtype).expand(bsz, 1, -1)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))

        # (N, seq, E) -> (N, heads, seq, head_dim)
        q = q.view(bsz, tgt_len, heads, head_dim).transpose(1, 2)
        k = k.view(bsz, k.shape[1], heads, head_dim).transpose(1, 2)
        v = v.view(bsz, v.shape[1], heads, head_dim).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, heads, 1, head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(bsz, heads, 1, head_dim)], dim=2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[2]

        mask = None
        if attn_mask is not None:
            mask = (attn_mask.view(bsz, heads, tgt_len, src_len) if attn_mask.dim() == 3
                    else attn_mask)
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(bsz, 1, 1, src_len)
            mask = kpm if mask is None else mask + kpm

        dropout_p = self.dropout if self.training else 0.0
        out, weights = _sinkhorn_attention_with_weights(
            q, k, v, mask, dropout_p, False, None, self.steps, self.grad)
        out = out.transpose(1, 2).reshape(bsz, tgt_len, embed_dim)
        out = self.out_proj(out)

        if is_batched and not self.batch_first:
            out = out.transpose(0, 1)
        elif not is_batched:
            out = out.squeeze(0)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            weights = weights.squeeze(0)
        return out, weights


def convert_to_sinkhorn_attention(model: nn.Module, steps: int = 3,
                                  grad: str = "unrolled") -> nn.Module:
    """Turns every nn.MultiheadAttention inside ``model`` (``model`` itself included) into a
    :class:`SinkhornMultiheadAttention`, in place, and returns ``model``.

    The modules keep their identity and their Parameter objects (so an optimizer built before
    the conversion still trains them), their device, dtype, training mode and hooks; only their
    class changes. Modules that already are SinkhornMultiheadAttention get the new ``steps``
    and ``grad``. Every nn.TransformerEncoder inside gets ``use_nested_tensor = False``: its
    nested-tensor fast path would hand our attention nested inputs it cannot take.
    """
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            if not isinstance(module, SinkhornMultiheadAttention):
                module.__class__ = SinkhornMultiheadAttention
            module._init_sinkhorn(steps, grad)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
    return model
