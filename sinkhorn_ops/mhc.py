"""Functional pieces of mHC, manifold-constrained hyper-connections (MATH.md section 4): the two
Sinkhorn variants that make the residual mixing matrix H_res, and the two stream mixings."""
from __future__ import annotations

import contextlib
import numbers
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _mhc_coefficients_ops, _mhc_mappings_ops, _mhc_mix_ops, _mhc_v4_ops  # noqa: F401
from ._ops import GRAD_MODES, sinkhorn
from ._rms_projection import rms_projection

__all__ = [
    "mhc_branch_input",
    "mhc_coefficients",
    "mhc_combine",
    "mhc_mappings",
    "mhc_sinkhorn",
    "mhc_v4_sinkhorn",
    "mhc_v4_sinkhorn_loop",
]

_GRADS = GRAD_MODES
_VARIANTS = _mhc_mappings_ops.VARIANTS


def _sinkhorn_dtype(dtype: torch.dtype) -> torch.dtype:
    """The mHC paper runs the Sinkhorn in fp32 whatever the activation dtype; float64 stays
    float64 so that the float64 tests compare like with like."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _in(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype: t itself when it already is (Tensor.to costs about a microsecond of argument
    parsing even then, and a layer call makes eight of them)."""
    return t if t.dtype == dtype else t.to(dtype)


def _check_iters(name: str, iters: int) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{name}: expected iters to be an int >= 1, got {iters!r}")


def _check_eps(name: str, eps: float, context: str = "") -> None:
    """DeepSeek-V4's eps: a finite number > 0 (context ends the expectation, e.g. " for ...")."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < float("inf"):
        raise ValueError(f"{name}: expected a finite eps > 0{context}, got {eps!r}")


def _check_floating(name: str, arg: str, t) -> None:
    """TypeError unless t is a real floating-point tensor (an integer one would be mixed in
    integer arithmetic, a complex one lose its imaginary part)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected {arg} to be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected {arg} of a floating-point dtype, got {t.dtype}")


def _check_broadcast(name: str, arg: str, t: Tensor, shape, what: str) -> None:
    """ValueError unless t broadcasts to shape (what names that shape in the message)."""
    ok = t.shape == shape
    if not ok:
        try:
            ok = torch.broadcast_shapes(t.shape, shape) == shape
        except RuntimeError:
            pass
    if not ok:
        raise ValueError(f"{name}: expected {arg} broadcastable to {what} = {tuple(shape)}, got "
                         f"shape {tuple(t.shape)}")


def no_autocast(device_type: str):
    """Autocast disabled on device_type; nothing on devices without autocast (meta), where
    torch.autocast itself raises."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _check_logits(name: str, logits: Tensor, iters: int) -> None:
    _check_floating(name, "logits", logits)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"{name}: expected logits of shape (..., n, n), got {tuple(logits.shape)}")
    _check_iters(name, iters)


def mhc_sinkhorn(logits: Tensor, iters: int = 20, *, grad: str = "unrolled") -> Tensor:
    """H_res = Sinkhorn-Knopp(H̃_res) of the mHC paper (Xie et al. 2025, eq. 9).

    M⁰ = exp(H̃_res), M^t = T_r(T_c(M^{t-1})) for t = 1..iters: a column normalisation, then a
    row one, ``iters`` times. That is our log-domain operator with ``steps = 2 * iters``,
    ``start="col"`` and the default marginals, which for a square problem are a = b = 1
    (MATH.md section 1, published-variants table). The rows sum to 1 exactly (the last step is a
    row step); the columns to 1 up to the convergence error after ``iters`` iterations.

    With ``grad="unrolled"``, n <= 8 and iters <= 32 on CPU and CUDA it runs one fused kernel
    for all problems (``torch.ops.sinkhorn_ops.mhc_sinkhorn``), and its backward another: the
    iterations in the linear domain (the DeepSeek-V4 kernel on the transpose, with eps = 0),
    and, for a problem whose logits span more than 32 or are not finite, where the linear
    domain could underflow, the same iterations in the log domain, with the operator's
    semantics for -inf entries. Elsewhere it runs the operator. Second derivatives
    (create_graph, hessians) and forward-mode AD (jvp, jacfwd) go through the operator's
    differentiable form, as :func:`sinkhorn_ops.sinkhorn`'s do.

    Args:
        logits: (..., n, n) H̃_res, any floating dtype; cast to fp32 before the Sinkhorn (fp64
            stays fp64), as the paper runs it in fp32 whatever the activation dtype.
        iters: Sinkhorn-Knopp iterations t_max (each one column and one row normalisation).
        grad: backward of the operator, "unrolled" (default: the exact gradient of the
            iterations that ran, what the paper trains with), or "implicit" (the gradient at the
            fixed point, MATH.md section 2.2; "implicit_dense" and "implicit_cg" force a solver).

    Returns:
        (..., n, n) doubly-stochastic H_res in fp32 (fp64 for fp64 logits).
    """
    _check_logits("mhc_sinkhorn", logits, iters)
    if grad not in _GRADS:
        raise ValueError(f"mhc_sinkhorn: expected grad in {_GRADS}, got {grad!r}")
    x = _in(logits, _sinkhorn_dtype(logits.dtype))
    if grad == "unrolled" and _mhc_v4_ops.fused(x, iters):
        return torch.ops.sinkhorn_ops.mhc_sinkhorn.default(x, iters)
    return sinkhorn(x, steps=2 * iters, start="col", grad=grad)


def mhc_v4_sinkhorn(logits: Tensor, iters: int = 20, eps: float = 1e-6) -> Tensor:
    """The linear-domain Sinkhorn of DeepSeek-V4's production mHC (MATH.md section 1 table).

    Literally::

        comb = softmax(logits, dim=-1) + eps
        comb = comb / (comb.sum(-2) + eps)                  # column sums
        repeat iters - 1 times:
            comb = comb / (comb.sum(-1) + eps)              # row sums
            comb = comb / (comb.sum(-2) + eps)              # column sums

    The model mixes the streams with combᵀ (x_{l+1} = combᵀ x_l + ...), which
    :class:`sinkhorn_ops.nn.ManifoldConstrainedHyperConnections` does with ``variant="v4"``. It
    differs from :func:`mhc_sinkhorn` by O(eps) and in its last step (columns, not rows).

    For n <= 8 and iters <= 32 on CPU and CUDA this is one fused kernel for all problems
    (``torch.ops.sinkhorn_ops.mhc_v4_sinkhorn``), and its backward another: the exact gradient
    of the iterations (unrolled), recomputed from the logits, keeping only each normalisation's
    divisors. Its second derivatives and forward mode (forward over reverse, that is
    ``torch.func.hessian``, included) go through the loop above in ATen ops. Elsewhere it runs
    the loop above in PyTorch, with autograd through it.

    Args:
        logits: (..., n, n), any floating dtype; computed in fp32 (fp64 stays fp64).
        iters: number of column normalisations (the first row normalisation is the softmax).
        eps: added to the softmax and to every sum, as published (1e-6); must be > 0.

    Returns:
        (..., n, n) comb in fp32 (fp64 for fp64 logits), not transposed.
    """
    _check_logits("mhc_v4_sinkhorn", logits, iters)
    _check_eps("mhc_v4_sinkhorn", eps)
    x = _in(logits, _sinkhorn_dtype(logits.dtype))
    if _mhc_v4_ops.fused(x, iters):
        return torch.ops.sinkhorn_ops.mhc_v4_sinkhorn.default(x, iters, float(eps))
    return mhc_v4_sinkhorn_loop(x, iters, eps)


def mhc_v4_sinkhorn_loop(logits: Tensor, iters: int = 20, eps: float = 1e-6) -> Tensor:
    """:func:`mhc_v4_sinkhorn` as the plain PyTorch loop (about 6 small ops per iteration), in
    the logits' dtype, with autograd through it: the fallback beyond the fused kernel's limits,
    and the baseline the benchmarks measure against."""
    _check_logits("mhc_v4_sinkhorn_loop", logits, iters)
    _check_eps("mhc_v4_sinkhorn_loop", eps)
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


def mhc_mappings(
    proj: Tensor,
    alpha_pre: Tensor,
    alpha_post: Tensor,
    alpha_res: Tensor,
    b_pre: Tensor,
    b_post: Tensor,
    b_res: Tensor,
    iters: int = 20,
    *,
    variant: str = "paper",
    eps: float = 1e-6,
    grad: str = "unrolled",
) -> tuple[Tensor, Tensor, Tensor]:
    """mHC's per-token mappings H_pre, H_post, H_res (MATH.md section 4) from the normalised
    projections x' φ, where x' = RMSNorm(vec(x_l)) and φ = [φ_pre | φ_post | φ_res]::

        H_pre  = σ(α_pre · proj_pre + b_pre)            (+ eps for variant "v4")
        H_post = 2σ(α_post · proj_post + b_post)
        H_res  = Sinkhorn-Knopp(α_res · mat(proj_res) + b_res)

    H_res is :func:`mhc_sinkhorn` (variant "paper") or DeepSeek-V4's combᵀ with
    comb = :func:`mhc_v4_sinkhorn` (variant "v4"), oriented as applied: stream i of x_{l+1} takes
    Σ_j H_res[i, j] x_j.

    For n <= 8 and iters <= 32 on CPU and CUDA, with the unrolled gradient, all of this is one
    fused kernel for all tokens (``torch.ops.sinkhorn_ops.mhc_mappings``), and its backward
    another (it recomputes the forward from proj and returns the gradients of proj and of every
    weight); elsewhere it is the same formula in PyTorch ops.

    Args:
        proj: (..., 2n + n²) the projections laid out [pre (n) | post (n) | res (n × n,
            row-major)]; any floating dtype, computed in fp32 (fp64 stays fp64).
        alpha_pre, alpha_post, alpha_res: the scalar gates (one value each).
        b_pre, b_post: (n,) biases; b_res: (n, n).
        iters: Sinkhorn iterations.
        variant: "paper" or "v4" (see above).
        eps: the "v4" variant's eps (added to H_pre and in every Sinkhorn sum); unused by
            "paper".
        grad: the Sinkhorn's backward for "paper": "unrolled" (default, fused) or an implicit
            mode (see :func:`mhc_sinkhorn`; runs the composite); "v4" takes "unrolled" only.

    Returns:
        (H_pre (..., n), H_post (..., n), H_res (..., n, n)) in fp32 (fp64 for fp64 proj).
    """
    if not isinstance(proj, Tensor):
        raise TypeError(f"mhc_mappings: expected proj to be a torch.Tensor, got "
                        f"{type(proj).__name__}")
    if variant not in _VARIANTS:
        raise ValueError(f"mhc_mappings: expected variant in {_VARIANTS}, got {variant!r}")
    if grad not in _GRADS or (variant == "v4" and grad != "unrolled"):
        allowed = ("unrolled",) if variant == "v4" else _GRADS
        raise ValueError(f"mhc_mappings: expected grad in {allowed} for variant {variant!r}, "
                         f"got {grad!r}")
    _check_iters("mhc_mappings", iters)
    if variant == "v4":
        _check_eps("mhc_mappings", eps, " for variant 'v4'")
    for arg, t in (("proj", proj), ("alpha_pre", alpha_pre), ("alpha_post", alpha_post),
                   ("alpha_res", alpha_res), ("b_pre", b_pre), ("b_post", b_post),
                   ("b_res", b_res)):
        _check_floating("mhc_mappings", arg, t)
    n = b_res.shape[-1] if b_res.dim() == 2 else 0
    if b_res.dim() != 2 or b_res.shape[0] != n or n < 1:
        raise ValueError(f"mhc_mappings: expected b_res of shape (n, n), got {tuple(b_res.shape)}")
    if proj.dim() < 1 or proj.shape[-1] != 2 * n + n * n:
        raise ValueError(f"mhc_mappings: expected proj of shape (..., 2n + n^2) = "
                         f"(..., {2 * n + n * n}) for n = {n}, got {tuple(proj.shape)}")
    acc = _sinkhorn_dtype(proj.dtype)
    y = _in(proj, acc)
    weights = [_in(w, acc) for w in (alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)]
    if grad == "unrolled" and _mhc_mappings_ops.fused(n, iters, y.device):
        pre, post, res = torch.ops.sinkhorn_ops.mhc_mappings.default(
            y, *weights, iters, float(eps), variant)
        return pre, post, res
    if variant == "v4":
        return mappings_composite(y, weights, lambda r: mhc_v4_sinkhorn(r, iters, eps).mT, eps)
    return mappings_composite(y, weights, lambda r: mhc_sinkhorn(r, iters, grad=grad))


def mhc_coefficients(
    x: Tensor,
    phi_pre: Tensor,
    phi_post: Tensor,
    phi_res: Tensor,
    alpha_pre: Tensor,
    alpha_post: Tensor,
    alpha_res: Tensor,
    b_pre: Tensor,
    b_post: Tensor,
    b_res: Tensor,
    iters: int = 20,
    *,
    norm_eps: float = 1e-6,
    variant: str = "paper",
    eps: float = 1e-6,
    grad: str = "unrolled",
) -> tuple[Tensor, Tensor, Tensor]:
    """mHC's coefficients from the streams (MATH.md section 4): :func:`mhc_mappings` of
    proj = RMSNorm(x) [φ_pre | φ_post | φ_res], the norm without a gain (it would fold into φ)::

        proj = (x φ) / sqrt(mean(x²) + norm_eps)      (mean over the D = nC values of a token)

    Where :func:`mhc_mappings` is fused (n <= 8, iters <= 32, CPU or CUDA, the unrolled
    gradient), the norm's statistic is folded into its kernel
    (``torch.ops.sinkhorn_ops.mhc_coefficients``): a call is the norms ||x||, the raw projections
    x φ (one matmul) and the kernel, with no normalised copy of x, and its backward is the kernel,
    one reduction for the six weights and two matmuls (the three φ's gradients are views of one;
    AccumulateGrad stores them as contiguous copies). Elsewhere it is ``rms_projection`` then
    :func:`mhc_mappings`.

    Args:
        x: (..., D) the flattened streams vec(x_l), D = n·C, in phi's dtype or a lower precision
            (converted in each pass, a transient copy; saved as it came).
        phi_pre, phi_post: (D, n); phi_res: (D, n²), with mat(v)[i, j] = v[i·n + j]. float32 or
            float64, the dtype of every weight and of the computation (autocast does not lower
            it, on either path).
        alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res, iters, variant, eps, grad: as in
            :func:`mhc_mappings`.
        norm_eps: added to mean(x²), finite and > 0.

    Returns:
        (H_pre (..., n), H_post (..., n), H_res (..., n, n)) in phi's dtype.
    """
    phis = (phi_pre, phi_post, phi_res)
    weights = (alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)
    for name, t in zip(("x", "phi_pre", "phi_post", "phi_res"), (x, *phis)):
        if not isinstance(t, Tensor):
            raise TypeError(f"mhc_coefficients: expected {name} to be a torch.Tensor, got "
                            f"{type(t).__name__}")
    if (isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float))
            or not 0 < norm_eps < float("inf")):
        raise ValueError(f"mhc_coefficients: expected a finite norm_eps > 0, got {norm_eps!r}")
    n = b_res.shape[-1] if isinstance(b_res, Tensor) and b_res.dim() == 2 else 0
    if (grad == "unrolled" and variant in _VARIANTS and type(iters) is int
            and _mhc_mappings_ops.fused(n, iters, x.device)):
        pre, post, res, _, _ = torch.ops.sinkhorn_ops.mhc_coefficients.default(
            x, *phis, *weights, float(norm_eps), iters, float(eps), variant)
        return pre, post, res
    dim = x.shape[-1] if x.dim() >= 1 else 0
    for name, t, width in zip(("phi_pre", "phi_post", "phi_res"), phis, (n, n, n * n)):
        if n >= 1 and tuple(t.shape) != (dim, width):
            raise ValueError(f"mhc_coefficients: expected {name} of shape (D, {width}) = "
                             f"({dim}, {width}) for x of shape {tuple(x.shape)} and n = {n}, got "
                             f"{tuple(t.shape)}")
    # As the fused op: the projection in phi's dtype whatever autocast says.
    with no_autocast(x.device.type):
        proj = rms_projection(x, torch.cat([phi_pre, phi_post, phi_res], dim=-1), norm_eps)
    return mhc_mappings(proj, *weights, iters, variant=variant, eps=eps, grad=grad)


def mappings_composite(proj: Tensor, weights, residual: Callable[[Tensor], Tensor],
                       pre_eps: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`mhc_mappings` in PyTorch ops, with H_res = residual(logits) for the (..., n, n)
    logits and pre_eps added to H_pre when given; weights as mhc_mappings takes them, in proj's
    dtype."""
    alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res = weights
    n = b_res.shape[-1]
    pre, post, res = proj.split([n, n, n * n], dim=-1)
    h_pre = torch.sigmoid(alpha_pre * pre + b_pre)
    if pre_eps is not None:
        h_pre = h_pre + pre_eps
    h_post = 2.0 * torch.sigmoid(alpha_post * post + b_post)
    return h_pre, h_post, residual(alpha_res * res.unflatten(-1, (n, n)) + b_res)


def _check_arg(name: str, arg: str, t, shape, what: str) -> None:
    _check_floating(name, arg, t)
    _check_broadcast(name, arg, t, shape, what)


def _fit(t: Tensor, dtype: torch.dtype, shape, name: str, arg: str, what: str) -> Tensor:
    """t in dtype, broadcast to shape; t itself when it already is (no autograd node: a
    differentiated call pays host time for each). Checked as _check_arg, whose full checks run
    only when t is not already a floating tensor of that shape (a layer call's case)."""
    if not (isinstance(t, Tensor) and t.is_floating_point() and t.shape == shape):
        _check_arg(name, arg, t, shape, what)
    t = _in(t, dtype)
    return t if t.shape == shape else torch.broadcast_to(t, shape)


def _check_streams(name: str, x) -> None:
    _check_floating(name, "x", x)
    if x.dim() < 2:
        raise ValueError(f"{name}: expected x of shape (..., n, C), got {tuple(x.shape)}")


def mhc_branch_input(x: Tensor, h_pre: Tensor) -> Tensor:
    """H_pre x_l: the sub-layer's input, a weighted sum of the n streams.

    For n <= 8 on CPU and CUDA this is one fused kernel (``torch.ops.sinkhorn_ops.mhc_pre_mix``,
    and its backward another) that reads x once; the sum is accumulated in fp32 (fp64 for
    fp64) and rounded once to x's dtype. Elsewhere it is the same sum in PyTorch.

    Args:
        x: (..., n, C) streams in the activation dtype.
        h_pre: (..., n) weights, broadcast against x's leading dimensions; any floating dtype
            (the kernel takes them in the accumulation dtype).

    Returns:
        (..., C) in x's dtype.
    """
    _check_streams("mhc_branch_input", x)
    args = ("mhc_branch_input", "h_pre", "x's (..., n)")
    if _mhc_mix_ops.fused(x):
        h = _fit(h_pre, _sinkhorn_dtype(x.dtype), x.shape[:-1], *args)
        return torch.ops.sinkhorn_ops.mhc_pre_mix.default(x, h)
    _check_arg(args[0], args[1], h_pre, x.shape[:-1], args[2])
    # A broadcast product and a sum rather than einsum: einsum becomes a bmm of (n x C) problems
    # per token, several times slower for n <= 8 on the CPU.
    return (h_pre.to(x.dtype).unsqueeze(-1) * x).sum(-2)


def mhc_combine(x: Tensor, branch_output: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    """x_{l+1} = H_res x_l + H_postᵀ F(H_pre x_l) (MATH.md section 4).

    For n <= 8 on CPU and CUDA this is one fused kernel (``torch.ops.sinkhorn_ops.mhc_post_mix``,
    and its backward another): each stream and the branch output are read once, the mixing is
    accumulated in fp32 (fp64 for fp64) and rounded once to x's dtype. Elsewhere it runs in
    PyTorch, in x's dtype.

    Args:
        x: (..., n, C) streams x_l.
        branch_output: (..., C) the sub-layer's output F(H_pre x_l) (cast to x's dtype).
        h_post: (..., n) write-back weights of the output into each stream.
        h_res: (..., n, n) residual mixing: stream i of the result takes Σ_j h_res[i, j] x_j.

    Returns:
        (..., n, C) x_{l+1} in x's dtype.
    """
    _check_streams("mhc_combine", x)
    n = x.shape[-2]
    shapes = ((*x.shape[:-2], x.shape[-1]), x.shape[:-1], (*x.shape[:-2], n, n))
    names = ("branch_output", "h_post", "h_res")
    whats = ("x's (..., C)", "x's (..., n)", "(..., n, n)")
    if _mhc_mix_ops.fused(x):
        acc = _sinkhorn_dtype(x.dtype)
        y = _fit(branch_output, x.dtype, shapes[0], "mhc_combine", names[0], whats[0])
        q = _fit(h_post, acc, shapes[1], "mhc_combine", names[1], whats[1])
        r = _fit(h_res, acc, shapes[2], "mhc_combine", names[2], whats[2])
        return torch.ops.sinkhorn_ops.mhc_post_mix.default(x, y, q, r)
    for t, shape, arg, what in zip((branch_output, h_post, h_res), shapes, names, whats):
        _check_arg("mhc_combine", arg, t, shape, what)
    mixed = (h_res.to(x.dtype).unsqueeze(-1) * x.unsqueeze(-3)).sum(-2)  # see mhc_branch_input
    return mixed + h_post.to(x.dtype).unsqueeze(-1) * branch_output.to(x.dtype).unsqueeze(-2)
