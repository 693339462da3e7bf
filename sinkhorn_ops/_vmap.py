"""Batching rules for ``torch.func.vmap`` (and ``vmap`` of ``grad``: per-sample gradients).

Every operator here treats the leading dimensions of its per-problem arguments as batch
dimensions, so a vmapped call is one call with the vmapped dimension moved to the front of each
per-problem argument (expanded where it is not vmapped, with singleton dimensions inserted
where an argument broadcasts over fewer batch dimensions), instead of PyTorch's fallback of one
call per sample. Arguments shared by all problems (the mHC weights and projections) must not be
vmapped for that; when they are, the rule runs one call per sample itself.

The backward operators that sum over the tokens (the mHC mappings' and coefficients' weight
gradients) have their own rules (_vmap_mhc_weights.py): folding the vmapped dimension into the
tokens would sum the samples together.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

# op -> (problem_dims, out_dims): problem_dims has one entry per argument: the number of
# trailing per-problem dimensions of a per-problem tensor argument, "shared" for a tensor
# argument common to all problems, or None for a non-tensor argument. out_dims(args) gives the
# outputs' vmapped dimension (0, or None for an output without batch dimensions).
_SPECS: dict[str, tuple[tuple[Any, ...], Any]] = {}


def _all_batched(count: int):
    return lambda args: (0,) * count if count > 1 else 0


def _spec(name: str, problem_dims: tuple[Any, ...], out_dims) -> None:
    _SPECS[name] = (problem_dims, out_dims)


_spec("sinkhorn", (2, 1, 1, 2, None, None, None, None, None, None), _all_batched(5))
# grad_a, grad_b come back as (0,) when the marginals were the defaults.
_spec("sinkhorn_backward_unrolled", (2, 1, 1, 2, 1, 1, 2, 0, None, None),
      lambda args: (0, 0 if args[4] is not None else None, 0 if args[5] is not None else None))
_spec("sinkhorn_backward_implicit", (2, 1, 1, 2, None, None, None), _all_batched(3))
_spec("mhc_sinkhorn", (2, None), _all_batched(1))
_spec("mhc_sinkhorn_backward", (2, 2, None), _all_batched(1))
_spec("mhc_v4_sinkhorn", (2, None, None), _all_batched(1))
_spec("mhc_v4_sinkhorn_backward", (2, 2, None, None), _all_batched(1))
_spec("mhc_pre_mix", (2, 1), _all_batched(1))
_spec("mhc_pre_mix_backward", (1, 2, 1), _all_batched(2))
_spec("mhc_post_mix", (2, 1, 1, 2), _all_batched(1))
_spec("mhc_post_mix_backward", (2, 2, 1, 1, 2), _all_batched(4))
_spec("rms_projection", (1, "shared", None), _all_batched(1))
_spec("mhc_mappings", (1,) + ("shared",) * 6 + (None, None, None), _all_batched(3))
_spec("mhc_coefficients", (1,) + ("shared",) * 9 + (None,) * 4, _all_batched(5))


def _batch_first(a: Optional[torch.Tensor], d: Optional[int], size: int):
    """a with its vmapped dimension first (expanded to the batch when it has none)."""
    if a is None:
        return None
    return a.movedim(d, 0) if d is not None else a.expand(size, *a.shape)


def _one_call_per_sample(op, info, in_dims: Sequence[Optional[int]], args, out_dims):
    outs = []
    for v in range(info.batch_size):
        sample = [a.select(d, v) if d is not None else a for a, d in zip(args, in_dims)]
        outs.append(op(*sample))
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), out_dims
    stacked = tuple(torch.stack(list(o)) if d is not None else o[0]
                    for o, d in zip(zip(*outs), out_dims))
    return stacked, out_dims


def _rule(name: str):
    op = getattr(torch.ops.sinkhorn_ops, name).default
    problem_dims, out_dims_of = _SPECS[name]

    def rule(info, in_dims, *args):
        out_dims = out_dims_of(args)
        if any(d is not None and p == "shared" for d, p in zip(in_dims, problem_dims)):
            return _one_call_per_sample(op, info, in_dims, args, out_dims)
        # The number of batch dimensions of a sample's call: its first per-problem argument's
        # (the scores, the logits, the streams or their gradient); the others broadcast against
        # it. One with more is what the op refuses for one sample: calling it per sample raises
        # that error with the sample's shapes (or, for an op that takes it, gives its result).
        dims = [a.dim() - (d is not None) - p for a, d, p in zip(args, in_dims, problem_dims)
                if isinstance(p, int) and a is not None]
        batch = dims[0]
        if max(dims) > batch:
            return _one_call_per_sample(op, info, in_dims, args, out_dims)
        new = list(args)
        for i, (a, d, p) in enumerate(zip(args, in_dims, problem_dims)):
            if not isinstance(p, int) or a is None:
                continue
            x = _batch_first(a, d, info.batch_size)
            missing = batch - (x.dim() - 1 - p)
            new[i] = x.reshape(x.shape[0], *([1] * missing), *x.shape[1:]) if missing else x
        return op(*new), out_dims

    return rule


for _name in _SPECS:
    torch.library.register_vmap(f"sinkhorn_ops::{_name}", _rule(_name))

from . import _vmap_mhc_weights  # noqa: E402, F401  (the mHC weight gradients' rules)
