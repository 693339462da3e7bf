"""Python entry point of the Sinkhorn operator and its fake (meta) kernel for torch.compile."""
from __future__ import annotations

import operator
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor


class SinkhornResult(NamedTuple):
    """Everything a run computes; shapes for scores of shape (..., n, m)."""

    plan: Tensor  # (..., n, m), the scores' dtype: P = exp(S + f_i + g_j)
    f: Tensor  # (..., n), accumulation dtype (float64 for float64 scores, else float32)
    g: Tensor  # (..., m), accumulation dtype
    steps: Tensor  # (...), int64: normalisations actually run per problem
    error: Tensor  # (...), L1 error of the marginal the last step did not fix


# The values of sinkhorn's `grad` (the op checks them; the layers check them when built).
GRAD_MODES = ("unrolled", "implicit", "implicit_dense", "implicit_cg")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sinkhorn(
    scores: Tensor,
    a: Optional[Tensor] = None,
    b: Optional[Tensor] = None,
    *,
    mask: Optional[Tensor] = None,
    steps: int = 100,
    start: str = "row",
    tol: float = 0.0,
    return_potentials: bool = False,
    validate: bool = False,
    grad: str = "unrolled",
    cg_tol: float = 1e-6,
    cg_max_iter: int = 100,
    init: Optional[tuple[Optional[Tensor], Optional[Tensor]]] = None,
) -> Union[Tensor, SinkhornResult]:
    """Batched log-domain Sinkhorn: finds P = exp(S + f ⊕ g) with P 1 = a and Pᵀ 1 = b.

    Computes exactly ``../shared/MATH.md`` section 1 for every problem of the batch.

    Args:
        scores: (..., n, m) logits S, float32/float64/float16/bfloat16, any strides. Entries
            equal to -inf are masked (P = 0 there). Entropic OT with cost C at temperature eps
            is ``scores = -C / eps``.
        a: (..., n) positive row marginals, broadcast against ``scores.shape[:-1]``; in the
            scores' dtype or the accumulation dtype. Default (with ``b=None``): 1 on every row
            that has an allowed entry, 0 on the others.
        b: (..., m) positive column marginals, broadcast against ``scores.shape[:-2] + (m,)``;
            ``sum(a)`` must equal ``sum(b)``. Default: (allowed rows) / (allowed columns) on
            every allowed column, so a square unmasked problem is doubly stochastic. Give both
            a and b, or neither.
        mask: bool, broadcast to ``scores.shape``; True keeps an entry, False is S = -inf.
        steps: number of normalisations (half-iterations) to run at most; 0 returns exp(S).
        start: "row" (the first step normalises rows: ``steps=1`` is ``softmax(scores, -1)``) or
            "col" (columns first, as the mHC paper).
        tol: if > 0, a problem stops, on its own and on the device, once the L1 error of the
            marginal the last step did not fix is <= ``tol * sum(a)``.
        return_potentials: also return potentials, steps used and the final error.
        validate: check values that need a host synchronisation (NaN or +inf scores,
            non-positive or non-finite marginals, ``sum(a) != sum(b)``) and raise ValueError.
            Without it such inputs give a defined result and never a crash: NaN confined to
            each problem whose scores hold NaN or +inf, and nowhere else (after one step only
            the offending rows or columns; from the second step on the whole problem's plan,
            potentials and gradients). Keep it off under torch.compile and CUDA graphs.
        grad: the backward (MATH.md section 2). "unrolled" (default) is the exact gradient of
            the steps that were run, what the Sinkformer and mHC references train with: choose
            it for a few fixed steps inside a layer. It replays the forward and keeps one LSE
            vector per step, O(steps * (n + m)) memory. "implicit" is the gradient at the
            fixed point (implicit function theorem), built from the plan alone, its memory
            independent of the steps: choose it for a converged OT solve. It solves on the
            smaller side, densely up to 256, by conjugate gradients above; "implicit_dense" and
            "implicit_cg" force a solver. Both differentiate twice (create_graph, hessians)
            and have forward-mode AD (jvp, jacfwd); the implicit tangents of f and g are
            taken in the gauge where their jvp is the transpose of the implicit vjp.
        cg_tol, cg_max_iter: relative residual and iteration cap of the conjugate gradients.
        init: ``(f0, g0)``, the potentials to start from instead of zeros (a warm start; either
            may be None for zeros), in this function's convention P = exp(S + f ⊕ g): f0
            broadcastable to (..., n), g0 to (..., m), any floating dtype, finite. The steps then
            run exactly as from zeros (MATH.md section 1), so ``init=(r.f, r.g)`` of a run of
            k steps continues it (with ``start`` flipped when k is odd). For entropic OT at a new
            temperature, rescale: f0 = f_prev * eps_prev / eps. Computed as a run from zeros on
            the shifted scores S + f0 ⊕ g0, a copy of S in the accumulation dtype (for bf16 or
            fp16 scores twice their memory; the unrolled backward saves it in place of S),
            differentiable with respect to f0 and g0 as well.

    Returns:
        The plan P of shape (..., n, m) in the scores' dtype, or a :class:`SinkhornResult`
        ``(plan, f, g, steps, error)`` when ``return_potentials`` is True; the potentials
        and the error in the accumulation dtype (float64 for float64, float32 otherwise).
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"sinkhorn: expected scores to be a torch.Tensor, got {type(scores).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"sinkhorn: expected steps to be an int, got {type(steps).__name__}")
    if not isinstance(start, str):
        raise TypeError(f"sinkhorn: expected start to be 'row' or 'col', got {type(start).__name__}")
    tol, cg_tol = _real("tol", tol), _real("cg_tol", cg_tol)
    cg_max_iter = _integer("cg_max_iter", cg_max_iter)
    if init is not None:
        result = _warm_started(scores, a, b, mask, steps, start, tol, grad, cg_tol, cg_max_iter,
                               init)
    else:
        result = SinkhornResult(*torch.ops.sinkhorn_ops.sinkhorn.default(
            scores, a, b, mask, steps, start, tol, grad, cg_tol, cg_max_iter))
    if validate:  # after the op, whose argument checks (shapes, dtypes) come first
        _validate(scores, a, b, mask)
        for name, x in zip(("f0", "g0"), init or ()):
            if x is not None and not bool(torch.isfinite(x).all()):
                raise ValueError(f"sinkhorn: expected init's {name} finite, got "
                                 f"{int((~torch.isfinite(x)).sum())} non-finite entries")
    return result if return_potentials else result.plan


def _real(name: str, value) -> float:
    """value as a float (a Python number, a NumPy scalar, a 0-d tensor); TypeError naming the
    argument for anything else (a string, None, a bool)."""
    try:
        if isinstance(value, (str, bytes, bool)) or value is None:
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"sinkhorn: expected {name} to be a float, got "
                        f"{type(value).__name__}") from None


def _integer(name: str, value) -> int:
    """value as an int (a Python or NumPy integer, or a float of integral value such as 1e3
    from a config); TypeError naming the argument for anything else (1.7, a string, a bool)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"sinkhorn: expected {name} to be an int, got {type(value).__name__}")


def _warm_started(scores: Tensor, a: Optional[Tensor], b: Optional[Tensor],
                  mask: Optional[Tensor], steps: int, start: str, tol: float, grad: str,
                  cg_tol: float, cg_max_iter: int, init) -> SinkhornResult:
    """The run from init = (f0, g0): torch.ops.sinkhorn_ops.sinkhorn_warm (csrc/ops/
    sinkhorn_warm.cpp), the operator on S + f0 ⊕ g0 with f0 and g0 added back."""
    if not (isinstance(init, (tuple, list)) and len(init) == 2):
        got = (f"a {type(init).__name__} of length {len(init)}"
               if isinstance(init, (tuple, list)) else type(init).__name__)
        raise TypeError(f"sinkhorn: expected init to be a pair (f0, g0) of tensors or None, got "
                        f"{got}")
    for name, x in zip(("f0", "g0"), init):
        if x is not None and not isinstance(x, Tensor):
            raise TypeError(f"sinkhorn: expected init's {name} to be a torch.Tensor or None, got "
                            f"{type(x).__name__}")
    return SinkhornResult(*torch.ops.sinkhorn_ops.sinkhorn_warm.default(
        scores, a, b, mask, init[0], init[1], steps, start, tol, grad, cg_tol, cg_max_iter))


def _validate(scores: Tensor, a: Optional[Tensor], b: Optional[Tensor], mask: Optional[Tensor]) -> None:
    """The value checks of ``validate=True``; each synchronises with the device."""
    bad = torch.isnan(scores) | (scores == float("inf"))
    if mask is not None and mask.dtype == torch.bool:
        bad = bad & mask
    if bool(bad.any()):
        raise ValueError("sinkhorn: expected scores without NaN or +inf (-inf masks an entry), got "
                         f"{int(bad.sum())} such entries")
    for name, x in (("a", a), ("b", b)):
        if x is not None and not bool(((x > 0) & torch.isfinite(x)).all()):
            raise ValueError(f"sinkhorn: expected {name} positive and finite, got min "
                             f"{float(x.min())}, max {float(x.max())}")
    if a is not None and b is not None:
        acc = _accumulation_dtype(scores.dtype)
        batch = scores.shape[:-2]
        mass_a = torch.broadcast_to(a, scores.shape[:-1]).to(acc).sum(-1)
        mass_b = torch.broadcast_to(b, (*batch, scores.shape[-1])).to(acc).sum(-1)
        gap = (mass_a - mass_b).abs()
        if bool((gap > 1e-4 * mass_a.abs().clamp_min(1e-30)).any()):
            worst = int(gap.argmax()) if gap.numel() else 0
            raise ValueError("sinkhorn: expected sum(a) == sum(b) in every problem, got "
                             f"{float(mass_a.flatten()[worst])} != {float(mass_b.flatten()[worst])}")


# The fake kernel repeats the front door's checks (ValueError / TypeError like TORCH_CHECK_VALUE
# and TORCH_CHECK_TYPE) and returns outputs of the right shapes, dtypes and devices.
@torch.library.register_fake("sinkhorn_ops::sinkhorn")
def _sinkhorn_fake(scores, a, b, mask, steps, start, tol, grad="unrolled", cg_tol=1e-6, cg_max_iter=100):
    torch._check_value(scores.dim() >= 2, lambda: f"sinkhorn: expected scores with at least 2 dimensions, got {scores.dim()}")
    torch._check_value(steps >= 0, lambda: f"sinkhorn: expected steps >= 0, got {steps}")
    torch._check_value(start in ("row", "col"), lambda: f"sinkhorn: expected start 'row' or 'col', got {start!r}")
    torch._check_value((a is None) == (b is None), lambda: "sinkhorn: expected both marginals a and b or neither")
    acc = _accumulation_dtype(scores.dtype)
    *batch, n, m = scores.shape
    for name, x, full in (("a", a, (*batch, n)), ("b", b, (*batch, m)), ("mask", mask, tuple(scores.shape))):
        if x is None:
            continue
        torch._check_value(x.device == scores.device,
                     lambda: f"sinkhorn: expected {name} on the scores' device {scores.device}, got {x.device}")
        if name == "mask":
            torch._check_type(x.dtype == torch.bool, lambda: f"sinkhorn: expected mask of dtype torch.bool, got {x.dtype}")
        else:
            allowed = str(scores.dtype) if acc == scores.dtype else f"{scores.dtype} or {acc}"
            torch._check_type(x.dtype in (scores.dtype, acc),
                              lambda: f"sinkhorn: expected {name} of dtype {allowed}, got {x.dtype}")
        torch._check_value(x.dim() <= len(full) and all(
            s == 1 or s == t for s, t in zip(reversed(x.shape), reversed(full))),
            lambda: f"sinkhorn: expected {name} broadcastable to {tuple(full)}, got {tuple(x.shape)}")
    return (
        scores.new_empty(scores.shape),
        scores.new_empty((*batch, n), dtype=acc),
        scores.new_empty((*batch, m), dtype=acc),
        scores.new_empty(tuple(batch), dtype=torch.int64),
        scores.new_empty(tuple(batch), dtype=acc),
    )


@torch.library.register_fake("sinkhorn_ops::sinkhorn_backward_unrolled")
def _backward_unrolled_fake(grad_plan, grad_f, grad_g, scores, a, b, mask, steps_used, steps, start):
    return _backward_fake(scores, a, b)


@torch.library.register_fake("sinkhorn_ops::sinkhorn_backward_implicit")
def _backward_implicit_fake(grad_plan, grad_f, grad_g, plan, solver, cg_tol, cg_max_iter):
    # The checks of the C++ front door (sinkhorn_implicit.cpp) that shapes and dtypes decide.
    torch._check_value(plan.dim() >= 2, lambda: f"sinkhorn_backward_implicit: expected plan "
                                                f"(..., n, m), got {tuple(plan.shape)}")
    torch._check_type(plan.is_floating_point(), lambda: f"sinkhorn_backward_implicit: expected a "
                                                        f"floating-point plan, got {plan.dtype}")
    torch._check_value(grad_plan.shape == plan.shape,
                       lambda: f"sinkhorn_backward_implicit: expected grad_plan of shape "
                               f"{tuple(plan.shape)}, got {tuple(grad_plan.shape)}")
    *batch, n, m = plan.shape
    for name, grad, side in (("grad_f", grad_f, n), ("grad_g", grad_g, m)):
        torch._check_value(grad is None or tuple(grad.shape) == (*batch, side),
                           lambda: f"sinkhorn_backward_implicit: expected {name} of shape "
                                   f"{[*batch, side]}, got {list(grad.shape)}")
    acc = _accumulation_dtype(plan.dtype)
    return (plan.new_empty(plan.shape), plan.new_empty((*batch, n), dtype=acc),
            plan.new_empty((*batch, m), dtype=acc))


def _backward_fake(scores, a, b):
    acc = _accumulation_dtype(scores.dtype)
    *batch, n, m = scores.shape
    grad_a = scores.new_empty((*batch, n) if a is not None else (0,), dtype=acc)
    grad_b = scores.new_empty((*batch, m) if b is not None else (0,), dtype=acc)
    return scores.new_empty(scores.shape), grad_a, grad_b


# Autograd (MATH.md section 2) is registered in C++ (csrc/ops/sinkhorn_autograd.cpp), for the
# operator and for its backward ops (whose own backward is a clear double-backward error), so
# that C++ callers differentiate too and torch.compile traces the backward ops.
