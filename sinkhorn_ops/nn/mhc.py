"""ManifoldConstrainedHyperConnections (mHC, MATH.md section 4), which wraps any sub-layer F in
n residual streams mixed by a per-token doubly-stochastic matrix, and the helpers that open the
streams from an embedding and close them at the end."""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .._rms_projection import rms_projection
from ..mhc import (_GRADS, _check_eps, _check_floating, _in, mappings_composite,
                   mhc_branch_input, mhc_coefficients, mhc_combine, mhc_sinkhorn,
                   mhc_v4_sinkhorn, no_autocast)

__all__ = [
    "MHCMappings",
    "ManifoldConstrainedHyperConnections",
    "expand_streams",
    "reduce_streams",
]

_VARIANTS = ("paper", "v4")
_REDUCTIONS = ("sum", "mean")
# log-domain bias of the diagonal of H̃_res at init: Sinkhorn(exp(4 I)) keeps e^4 / (e^4 + n - 1)
# on the diagonal (0.95 for n = 4), a near-identity residual map that still lets streams mix.
_RES_DIAGONAL_INIT = 4.0


def expand_streams(h: Tensor, num_streams: int) -> Tensor:
    """Opens the n residual streams: (..., C) -> (..., n, C), each stream a copy of ``h``.

    The result is a broadcast view (no copy); the first layer's mixing makes new tensors.
    """
    if isinstance(num_streams, bool) or not isinstance(num_streams, int) or num_streams < 1:
        raise ValueError(f"expand_streams: expected num_streams to be an int >= 1, got "
                         f"{num_streams!r}")
    if not isinstance(h, Tensor) or h.dim() < 1:
        raise ValueError(f"expand_streams: expected h of shape (..., C), got "
                         f"{tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__}")
    return h.unsqueeze(-2).expand(*h.shape[:-1], num_streams, h.shape[-1])


def reduce_streams(x: Tensor, reduce: str = "sum") -> Tensor:
    """Closes the streams: (..., n, C) -> (..., C) by their sum (as hyper-connections, Zhu et
    al. 2024, do before the final norm) or their mean (which, with copied streams, keeps the scale
    of a plain residual network)."""
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce_streams: expected reduce in {_REDUCTIONS}, got {reduce!r}")
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"reduce_streams: expected x of shape (..., n, C), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    return x.sum(-2) if reduce == "sum" else x.mean(-2)


class MHCMappings(NamedTuple):
    """The per-token mappings of one mHC layer, in fp32 (fp64 for fp64 streams)."""

    pre: Tensor  # (..., n) H_pre: the sub-layer reads Σ_j pre_j x_j
    post: Tensor  # (..., n) H_post: stream i receives post_i F(...)
    res: Tensor  # (..., n, n) H_res as applied: stream i becomes Σ_j res[i, j] x_j


class ManifoldConstrainedHyperConnections(nn.Module):
    """mHC (Xie et al. 2025; MATH.md section 4) around a sub-layer F:
    x_{l+1} = H_res x_l + H_postᵀ F(H_pre x_l), with per token

        x' = RMSNorm(vec(x_l))                       (no gain: it would fold into φ)
        H_pre  = σ(α_pre · x' φ_pre + b_pre)          (1 x n)
        H_post = 2σ(α_post · x' φ_post + b_post)      (1 x n)
        H_res  = Sinkhorn-Knopp(α_res · mat(x' φ_res) + b_res)   (n x n)

    The Sinkhorn is :func:`sinkhorn_ops.mhc_sinkhorn`: 20 iterations, column then row (steps =
    40, start = "col", a = b = 1), one fused kernel for all tokens and another for the backward
    (n <= 8, iters <= 32, the unrolled gradient). All mappings are computed in fp32
    (fp64 for fp64 streams) whatever the activation dtype: the norm of every token and the raw
    projections x φ (one matmul), then the norm's scale, the gates, biases, sigmoids and the
    Sinkhorn of every token in one fused kernel (:func:`sinkhorn_ops.mhc_coefficients`), and
    their backward in another, unless :meth:`residual_matrix` is overridden (then
    ``torch.ops.sinkhorn_ops.rms_projection`` and PyTorch ops around your H_res). The stream
    mixings are fused kernels (n <= 8) that accumulate in fp32 and write the streams' dtype.

    Args:
        num_streams: n >= 2, the number of residual streams (the paper uses 4).
        dim: C, the width of each stream and of F's input and output.
        branch: the sub-layer F, a module mapping (..., C) -> (..., C) (attention, MLP, ...), or
            None to call F yourself between :meth:`width_connection` and
            :meth:`depth_connection`.
        iters: Sinkhorn iterations (20 in the paper and in DeepSeek-V4).
        variant: "paper" (the log-domain Sinkhorn above) or "v4", DeepSeek-V4's production
            variant: H_res = combᵀ with comb = :func:`sinkhorn_ops.mhc_v4_sinkhorn` (linear
            domain, eps in every sum), and H_pre = σ(...) + eps, as in the public
            re-implementations of DeepSeek-V4's inference code (MATH.md gives only its Sinkhorn).
            Its learned final reduction of the streams is not provided (see reduce_streams).
        eps: the eps of the "v4" variant (1e-6 as published); unused by "paper".
        grad: backward of the Sinkhorn of "paper": "unrolled" (default, the paper's) or
            "implicit" (also "implicit_dense", "implicit_cg"). "v4" has the unrolled gradient
            only (its fused kernel's backward, or autograd through the loop beyond the kernel's
            limits); it accepts only "unrolled".
        norm_eps: the eps of the RMSNorm over all nC values, finite and > 0.
        alpha_init: initial value of the three gates α (0.01 in the paper).

    Parameters (shapes):
        phi_pre: (n·C, n), phi_post: (n·C, n), phi_res: (n·C, n·n) with mat(v)[i, j] = v[i·n + j].
            Init N(0, 1/(n·C)), so x'φ has unit variance for a unit-RMS x'.
        alpha_pre, alpha_post, alpha_res: () scalar gates, init ``alpha_init``.
        b_pre: (n,), init log(1/(n-1)), so H_pre = 1/n: F reads the mean of the streams.
        b_post: (n,), init 0, so H_post = 1: F's output is added to every stream.
        b_res: (n, n), init 4·I, so H_res is close to the identity (0.95 on the diagonal at n=4).
        With copied streams (:func:`expand_streams`) and α → 0, this makes the layer start as
        x + F(x) on every stream. ``branch``'s parameters are registered as a submodule.
        With the fused mappings, the gradients of the three α and three b are views of one
        small tensor (one reduction for all six): one storage and one version counter, so an
        in-place change to one of these ``.grad`` bumps the others' versions.

    Shapes: x is (..., n, C), any leading dimensions (e.g. (batch, time, n, C)); F receives and
    returns (..., C); the output is (..., n, C) in x's dtype.

    Example (run by the tests)::

        >>> import torch
        >>> from torch import nn
        >>> from sinkhorn_ops.nn import (ManifoldConstrainedHyperConnections, expand_streams,
        ...                              reduce_streams)
        >>> n, C = 4, 64
        >>> mlp = nn.Sequential(nn.LayerNorm(C), nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))
        >>> layer = ManifoldConstrainedHyperConnections(n, C, branch=mlp)
        >>> h = torch.randn(2, 10, C)          # (batch, time, C), e.g. the token embeddings
        >>> x = expand_streams(h, n)           # (2, 10, 4, 64)
        >>> x = layer(x)                       # x_{l+1}, (2, 10, 4, 64)
        >>> reduce_streams(x).shape            # then the final norm and the head
        torch.Size([2, 10, 64])

        A sub-layer with other arguments, called by hand between the two halves:

        >>> attn = nn.MultiheadAttention(C, 4, batch_first=True)
        >>> hc = ManifoldConstrainedHyperConnections(n, C)    # branch=None
        >>> h_in, maps = hc.width_connection(x)               # H_pre x: (2, 10, 64)
        >>> out, _ = attn(h_in, h_in, h_in, need_weights=False)
        >>> hc.depth_connection(x, out, maps).shape
        torch.Size([2, 10, 4, 64])
    """

    def __init__(
        self,
        num_streams: int,
        dim: int,
        branch: nn.Module | None = None,
        *,
        iters: int = 20,
        variant: str = "paper",
        eps: float = 1e-6,
        grad: str = "unrolled",
        norm_eps: float = 1e-6,
        alpha_init: float = 0.01,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, value, low in (("num_streams", num_streams, 2), ("dim", dim, 1),
                                ("iters", iters, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected {arg} to be an int >= {low}, got {value!r}")
        if variant not in _VARIANTS:
            raise ValueError(f"{name}: expected variant in {_VARIANTS}, got {variant!r}")
        if grad not in _GRADS:
            raise ValueError(f"{name}: expected grad in {_GRADS}, got {grad!r}")
        if variant == "v4" and grad != "unrolled":
            raise ValueError(f"{name}: variant 'v4' has only the unrolled gradient (of its "
                             f"iterations); expected grad='unrolled', got {grad!r}")
        if (isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float))
                or not 0 < norm_eps < math.inf):
            raise ValueError(f"{name}: expected a finite norm_eps > 0, got {norm_eps!r}")
        if variant == "v4":
            _check_eps(name, eps, " for variant 'v4'")
        elif isinstance(eps, bool) or not isinstance(eps, numbers.Real):  # unused, kept as float
            raise ValueError(f"{name}: expected eps to be a number, got {eps!r}")
        if (isinstance(alpha_init, bool) or not isinstance(alpha_init, numbers.Real)
                or not math.isfinite(alpha_init)):
            raise ValueError(f"{name}: expected a finite alpha_init, got {alpha_init!r}")
        if branch is not None and not callable(branch):
            raise TypeError(f"{name}: expected branch to be a module or None, got "
                            f"{type(branch).__name__}")
        self.num_streams, self.dim, self.iters = num_streams, dim, iters
        self.variant, self.eps, self.grad = variant, float(eps), grad
        self.norm_eps, self.alpha_init = float(norm_eps), float(alpha_init)
        self.branch = branch
        n, width = num_streams, num_streams * dim
        kw = {"device": device, "dtype": dtype}
        self.phi_pre = nn.Parameter(torch.empty(width, n, **kw))
        self.phi_post = nn.Parameter(torch.empty(width, n, **kw))
        self.phi_res = nn.Parameter(torch.empty(width, n * n, **kw))
        self.alpha_pre = nn.Parameter(torch.empty((), **kw))
        self.alpha_post = nn.Parameter(torch.empty((), **kw))
        self.alpha_res = nn.Parameter(torch.empty((), **kw))
        self.b_pre = nn.Parameter(torch.empty(n, **kw))
        self.b_post = nn.Parameter(torch.empty(n, **kw))
        self.b_res = nn.Parameter(torch.empty(n, n, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation documented in the class docstring (not the branch's)."""
        n, width = self.num_streams, self.num_streams * self.dim
        with torch.no_grad():
            for phi in (self.phi_pre, self.phi_post, self.phi_res):
                nn.init.normal_(phi, std=1.0 / math.sqrt(width))
            for alpha in (self.alpha_pre, self.alpha_post, self.alpha_res):
                alpha.fill_(self.alpha_init)
            self.b_pre.fill_(-math.log(n - 1))
            self.b_post.zero_()
            self.b_res.copy_(_RES_DIAGONAL_INIT * torch.eye(n))

    def extra_repr(self) -> str:
        return (f"num_streams={self.num_streams}, dim={self.dim}, iters={self.iters}, "
                f"variant={self.variant!r}, grad={self.grad!r}")

    def residual_matrix(self, logits: Tensor) -> Tensor:
        """H_res from the logits H̃_res of shape (..., n, n), oriented as applied (stream i of
        x_{l+1} takes Σ_j H_res[i, j] x_j). Override it to study other constraints."""
        if self.variant == "v4":
            return mhc_v4_sinkhorn(logits, self.iters, self.eps).mT
        return mhc_sinkhorn(logits, self.iters, grad=self.grad)

    def mappings(self, x: Tensor) -> MHCMappings:
        """H_pre, H_post, H_res for streams x of shape (..., n, C), in fp32 (fp64 for fp64)."""
        n, dim = self.num_streams, self.dim
        _check_floating(type(self).__name__, "x", x)
        if x.dim() < 2 or tuple(x.shape[-2:]) != (n, dim):
            raise ValueError(f"{type(self).__name__}: expected x of shape (..., n, C) = "
                             f"(..., {n}, {dim}), got {tuple(x.shape)}")
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        flat = x.reshape(*x.shape[:-2], n * dim)
        # RMSNorm(x) φ = (x φ) / rms(x): the scale is applied to the n² + 2n projections rather
        # than to the nC inputs, so the normalised copy of x is never materialised (nor x², nor
        # in the backward, nor an fp32 copy of bf16 streams kept for it).
        weights = (self.alpha_pre, self.alpha_post, self.alpha_res, self.b_pre, self.b_post,
                   self.b_res)
        own = getattr(self.residual_matrix, "__func__", None)  # None: set on the instance
        if own is ManifoldConstrainedHyperConnections.residual_matrix:
            # The norm, the projections and the mappings in two ATen ops and one fused kernel
            # where it applies (mhc_coefficients; otherwise rms_projection and mhc_mappings).
            phis = (_in(self.phi_pre, acc), _in(self.phi_post, acc), _in(self.phi_res, acc))
            return MHCMappings(*mhc_coefficients(
                flat, *phis, *(_in(w, acc) for w in weights), self.iters,
                norm_eps=self.norm_eps, variant=self.variant, eps=self.eps, grad=self.grad))
        phi = _in(torch.cat([self.phi_pre, self.phi_post, self.phi_res], dim=-1), acc)
        with no_autocast(x.device.type):  # in fp32 whatever autocast says, as mhc_coefficients
            proj = rms_projection(flat, phi, self.norm_eps)
        pre_eps = self.eps if self.variant == "v4" else None
        return MHCMappings(*mappings_composite(_in(proj, acc), [_in(w, acc) for w in weights],
                                               self.residual_matrix, pre_eps))

    def width_connection(self, x: Tensor) -> tuple[Tensor, MHCMappings]:
        """The sub-layer's input H_pre x of shape (..., C) in x's dtype, and the mappings that
        :meth:`depth_connection` needs."""
        maps = self.mappings(x)
        return mhc_branch_input(x, maps.pre), maps

    def depth_connection(self, x: Tensor, branch_output: Tensor, maps: MHCMappings) -> Tensor:
        """x_{l+1} = H_res x + H_postᵀ branch_output, of shape (..., n, C) in x's dtype."""
        if not isinstance(branch_output, Tensor):
            raise TypeError(f"{type(self).__name__}: expected the branch to return a tensor of "
                            f"shape (..., C), got {type(branch_output).__name__} (wrap a branch "
                            f"that returns a tuple to pick the tensor)")
        if branch_output.shape != x.shape[:-2] + x.shape[-1:]:
            raise ValueError(f"{type(self).__name__}: expected the branch output of shape "
                             f"{tuple(x.shape[:-2] + x.shape[-1:])}, got "
                             f"{tuple(branch_output.shape)}")
        return mhc_combine(x, branch_output, maps.post, maps.res)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """x_{l+1} for streams x of shape (..., n, C); extra arguments go to the branch."""
        if self.branch is None:
            raise TypeError(f"{type(self).__name__}: no branch was given; call "
                            "width_connection, your sub-layer, then depth_connection")
        h, maps = self.width_connection(x)
        return self.depth_connection(x, self.branch(h, *args, **kwargs), maps)
