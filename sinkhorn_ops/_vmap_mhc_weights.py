"""Batching rules for the mHC backward operators that sum over the tokens (the mappings' and the
coefficients' weight gradients), so that ``vmap`` of them (per-sample gradients of an mHC layer)
is one fused call, not one call per sample.

Folding the vmapped dimension into the tokens would sum the samples' weight gradients together.
Instead the rule asks the fused backward for the gradients of the gates' pre-activations
z = alpha * y + b: called with the projections scaled by their gates and gates of 1, it computes
the same z, and its dL/dproj is then dL/dz (csrc/mhc_mappings_math.h). Per sample, with the sums
over that sample's tokens,

    dL/dy = alpha dL/dz,   dL/dalpha = sum dL/dz * y,   dL/db = sum dL/dz,

and for the coefficients, whose y = (x phi) r with r = (|x|^2 / D + norm_eps)^(-1/2) (MATH.md
section 4), dL/d(x phi) = r dL/dy, dL/dphi = x^T dL/d(x phi), and
dL/dx = dL/d(x phi) phi^T - (sum_k dL/dy_k y_k) r^2 / D * x, with y recomputed from x and phi
(one more matmul) so that transforms around the vmap differentiate it (the operator's proj and
norm, the forward's outputs by its contract, are not read).

A vmapped weight or projection matrix (an ensemble) runs one call per sample.
"""
from __future__ import annotations

import torch

from ._vmap import _batch_first, _one_call_per_sample

_ops = torch.ops.sinkhorn_ops


def _mappings_grads(grads, y, weights, iters, eps, variant):
    """(dL/dy, the weights' gradients flattened per sample (V, 3 + 2n + n^2), the live gates)
    for the normalised projections y (V, ..., 2n + n^2), every tensor with the vmapped dimension
    first (the weights shared). A gate without upstream gradient gets exact zeros, whatever its
    projections hold (as the kernel gives them)."""
    n = weights[5].shape[-1]
    widths = (n, n, n * n)
    live = [g is not None for g in grads]
    gates = [w.reshape(()) for w in weights[:3]]
    parts = y.split(widths, -1)
    scaled = torch.cat([g * p for g, p in zip(gates, parts)], -1)
    ones = [torch.ones_like(w) for w in weights[:3]]
    dz, _ = _ops.mhc_mappings_backward.default(*grads, scaled, *ones, *weights[3:], iters, eps,
                                               variant)
    dzs = dz.split(widths, -1)
    tokens = tuple(range(1, y.dim() - 1))
    dy = torch.cat([g * d if on else torch.zeros_like(d)
                    for g, d, on in zip(gates, dzs, live)], -1)
    dalpha = [(d * p).sum((*tokens, -1)).unsqueeze(-1) if on else y.new_zeros(y.shape[0], 1)
              for d, p, on in zip(dzs, parts, live)]
    db = [(d.sum(tokens) if tokens else d) if on else
          y.new_zeros(y.shape[0], w) for d, on, w in zip(dzs, live, widths)]
    return dy, torch.cat(dalpha + db, -1), live


def _mappings_backward_rule(info, in_dims, g_pre, g_post, g_res, proj, *rest):
    weights, (iters, eps, variant) = rest[:6], rest[6:]
    op = _ops.mhc_mappings_backward.default
    args = (g_pre, g_post, g_res, proj, *rest)
    if any(d is not None for d in in_dims[4:10]):
        return _one_call_per_sample(op, info, in_dims, args, (0, 0))
    V = info.batch_size
    grads = [_batch_first(g, d, V) for g, d in zip((g_pre, g_post, g_res), in_dims[:3])]
    dy, flat, _ = _mappings_grads(grads, _batch_first(proj, in_dims[3], V), weights, iters, eps,
                                  variant)
    return (dy, flat), (0, 0)


def _coefficients_backward_rule(info, in_dims, g_pre, g_post, g_res, x, p0, p1, p2, proj, norm,
                                *rest, grad_x=True, grad_phi=True, grad_weights=True):
    # (The flags, arguments with defaults, come positionally up to the last one that differs
    # from its default, the rest as keywords.)
    weights = rest[:6]
    norm_eps, iters, eps, variant = rest[6:10]
    flags = tuple(rest[10:]) + (grad_x, grad_phi, grad_weights)[len(rest) - 10:]
    grad_x, grad_phi, grad_weights = flags
    out_dims = tuple(0 if want else None for want in flags)
    if any(d is not None for d in (*in_dims[4:7], *in_dims[9:15])):
        op = lambda *a: _ops.mhc_coefficients_backward.default(*a[:19], *flags)  # noqa: E731
        args = (g_pre, g_post, g_res, x, p0, p1, p2, proj, norm, *rest[:10])
        return _one_call_per_sample(op, info, in_dims[:19], args, out_dims)
    V = info.batch_size
    grads = [_batch_first(g, d, V) for g, d in zip((g_pre, g_post, g_res), in_dims[:3])]
    x = _batch_first(x, in_dims[3], V)
    D = x.shape[-1]
    # y recomputed from x and phi, not read from the forward's proj and norm: those carry no
    # history, and a transform around this vmap (grad of per-sample gradients, hessian)
    # differentiates y through x and phi, as the operator's own second order does.
    phi = torch.cat([p0, p1, p2], 1)
    xs = x.to(phi.dtype)
    r = torch.rsqrt(xs.square().mean(-1, keepdim=True) + norm_eps)
    y = (xs @ phi) * r
    dy, flat, live = _mappings_grads(grads, y, weights, iters, eps, variant)
    draw = dy * r
    n = weights[5].shape[-1]
    # An output not asked for: an empty tensor, as the operator gives it.
    dx, dphi, dw = x.new_empty((0,)), phi.new_empty((0,)), proj.new_empty((0,))
    if grad_x:
        # The live gates' terms only, as the kernel's c (a dead gate's y may be anything).
        dots = [(d * p).sum(-1, keepdim=True) for d, p, on in
                zip(dy.split((n, n, n * n), -1), y.split((n, n, n * n), -1), live) if on]
        coef = sum(dots, torch.zeros_like(r)) * r.square() / D
        dx = (draw @ phi.t() - coef * xs).to(x.dtype)
    if grad_phi:
        dphi = xs.reshape(V, -1, D).transpose(1, 2) @ draw.reshape(V, -1, draw.shape[-1])
    return (dx, dphi, flat if grad_weights else dw), out_dims


torch.library.register_vmap("sinkhorn_ops::mhc_mappings_backward", _mappings_backward_rule)
torch.library.register_vmap("sinkhorn_ops::mhc_coefficients_backward",
                            _coefficients_backward_rule)
