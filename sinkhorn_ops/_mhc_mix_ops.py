"""Fake kernels of the fused mHC stream-mixing ops
(``torch.ops.sinkhorn_ops.mhc_pre_mix``, ``mhc_post_mix`` and their backwards,
csrc/mhc_mix_math.h)."""
from __future__ import annotations

import torch

from ._ops import _accumulation_dtype

# The fused kernels' largest stream count (csrc/mhc_mix_math.h: kMaxStreams).
MAX_STREAMS = 8
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check(op, x, **named):
    """The front door's checks (csrc/ops/mhc_mix.cpp): named maps an argument to (tensor,
    expected shape, expected dtype)."""
    torch._check_type(x.dtype in DTYPES, lambda: (
        f"{op}: expected x of dtype float32, float64, float16 or bfloat16, got {x.dtype}"))
    torch._check_value(x.dim() >= 2, lambda: f"{op}: expected x of shape (..., n, C), got {tuple(x.shape)}")
    torch._check_value(1 <= x.shape[-2] <= MAX_STREAMS, lambda: (
        f"{op}: expected 1 <= n <= {MAX_STREAMS} streams, got x of shape {tuple(x.shape)}"))
    for name, (t, shape, dtype) in named.items():
        torch._check_type(t.dtype == dtype, lambda: f"{op}: expected {name} of dtype {dtype}, got {t.dtype}")
        torch._check_value(tuple(t.shape) == tuple(shape), lambda: (
            f"{op}: expected {name} of shape {tuple(shape)}, got {tuple(t.shape)}"))


def _shapes(x):
    *batch, n, c = x.shape
    return tuple(batch), n, c, _accumulation_dtype(x.dtype)


@torch.library.register_fake("sinkhorn_ops::mhc_pre_mix")
def _pre_fake(x, h_pre):
    batch, n, c, acc = _shapes(x)
    _check("mhc_pre_mix", x, h_pre=(h_pre, (*batch, n), acc))
    return x.new_empty((*batch, c))


@torch.library.register_fake("sinkhorn_ops::mhc_pre_mix_backward")
def _pre_backward_fake(grad, x, h_pre):
    batch, n, c, acc = _shapes(x)
    _check("mhc_pre_mix_backward", x, h_pre=(h_pre, (*batch, n), acc),
           grad=(grad, (*batch, c), x.dtype))
    return x.new_empty(x.shape), x.new_empty((*batch, n), dtype=acc)


@torch.library.register_fake("sinkhorn_ops::mhc_post_mix")
def _post_fake(x, y, h_post, h_res):
    batch, n, c, acc = _shapes(x)
    _check("mhc_post_mix", x, y=(y, (*batch, c), x.dtype), h_post=(h_post, (*batch, n), acc),
           h_res=(h_res, (*batch, n, n), acc))
    return x.new_empty(x.shape)


@torch.library.register_fake("sinkhorn_ops::mhc_post_mix_backward")
def _post_backward_fake(grad, x, y, h_post, h_res):
    batch, n, c, acc = _shapes(x)
    _check("mhc_post_mix_backward", x, y=(y, (*batch, c), x.dtype),
           h_post=(h_post, (*batch, n), acc), h_res=(h_res, (*batch, n, n), acc),
           grad=(grad, x.shape, x.dtype))
    return (x.new_empty(x.shape), x.new_empty((*batch, c)), x.new_empty((*batch, n), dtype=acc),
            x.new_empty((*batch, n, n), dtype=acc))


# The autograd of both ops and of their backwards is registered in C++
# (csrc/ops/mhc_autograd.cpp).


def fused(x: torch.Tensor) -> bool:
    """Whether the fused kernels take streams x of shape (..., n, C)."""
    return (x.dtype in DTYPES and x.device.type in ("cpu", "cuda") and x.dim() >= 2
            and 1 <= x.shape[-2] <= MAX_STREAMS)
