"""Pure-PyTorch log-domain Sinkhorn (MATH.md section 1): the ground truth of the tests and the
baseline of the benchmarks. Literal formulas, batched over leading dimensions, no compiled code."""

from typing import NamedTuple

import torch

__all__ = ["ReferenceResult", "accumulation_dtype", "default_log_marginals", "sinkhorn_reference"]

_NEG_INF = float("-inf")


class ReferenceResult(NamedTuple):
    """The operator's 5-tuple: plan (scores.dtype), f, g and error (accumulation dtype), steps (int64)."""

    plan: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    steps: torch.Tensor
    error: torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 scores, float32 for every other input dtype (MATH.md: Numerics)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_log_marginals(S: torch.Tensor):
    """log a and log b of the default marginals of masked scores S (masked entries are -inf).

    a_i = 1 on rows with an allowed entry, b_j = (allowed rows) / (allowed columns) on allowed
    columns, and 0 (log: -inf) on rows and columns with no allowed entry.
    """
    allowed = ~torch.isneginf(S)
    alive_rows = allowed.any(-1)  # (..., n)
    alive_cols = allowed.any(-2)  # (..., m)
    n_alive = alive_rows.sum(-1, keepdim=True).to(S.dtype)
    m_alive = alive_cols.sum(-1, keepdim=True).to(S.dtype)
    log_a = torch.where(alive_rows, 0.0, _NEG_INF).to(S.dtype)
    # An alive column implies an alive row, so the ratio is finite wherever it is selected.
    log_b = torch.where(alive_cols, torch.log(n_alive / m_alive), _NEG_INF).to(S.dtype)
    return log_a, log_b


def _log_marginal(x: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    if x is None:
        return default
    return torch.log(x.to(default.dtype)).expand(default.shape)


def _lse_rows(S: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """LSE_j (S_ij + g_j), shape (..., n); -inf for a row with no allowed entry."""
    return torch.logsumexp(S + g.unsqueeze(-2), dim=-1)


def _lse_cols(S: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """LSE_i (S_ij + f_i), shape (..., m); -inf for a column with no allowed entry."""
    return torch.logsumexp(S + f.unsqueeze(-1), dim=-2)


def _potential(log_marginal: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log marginal - LSE; an all -inf LSE gives 0 so that the row stays zero and no
    -inf + inf = NaN appears in later steps."""
    return torch.where(lse > _NEG_INF, log_marginal - lse, 0.0)


def _marginal_error(log_marginal: torch.Tensor, lse: torch.Tensor, potential: torch.Tensor):
    """L1 distance between the current sums exp(LSE + potential) and the target marginal."""
    mass = torch.where(lse > _NEG_INF, torch.exp(lse + potential), 0.0)
    return (mass - torch.exp(log_marginal)).abs().sum(-1)


def sinkhorn_reference(
    scores: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    steps: int = 100,
    start: str = "row",
    tol: float = 0.0,
    init: "tuple[torch.Tensor | None, torch.Tensor | None] | None" = None,
) -> ReferenceResult:
    """Log-domain Sinkhorn with the semantics of sinkhorn_ops.sinkhorn(return_potentials=True).

    scores (..., n, m); a broadcastable to (..., n), b to (..., m), None for the default
    marginals; mask bool broadcastable to scores, True = keep. Step k is a row step when
    (k even) == (start == "row"). With tol > 0 a problem stops before step k >= 1 once the L1
    error of the marginal that step would fix is <= tol * sum(a). The reported error is the L1
    error of the marginal the next step would fix (the one the last step did not fix).
    init = (f0, g0): the potentials to start from (a warm start; None for zeros), f0
    broadcastable to (..., n), g0 to (..., m).
    """
    if scores.dim() < 2:
        raise ValueError(f"sinkhorn_reference: expected scores of rank >= 2, got {scores.dim()}")
    if start not in ("row", "col"):
        raise ValueError(f"sinkhorn_reference: expected start 'row' or 'col', got {start!r}")
    if steps < 0:
        raise ValueError(f"sinkhorn_reference: expected steps >= 0, got {steps}")
    if not (0.0 <= tol < float("inf")):
        raise ValueError(f"sinkhorn_reference: expected a finite tol >= 0, got {tol}")

    acc = accumulation_dtype(scores.dtype)
    S = scores.to(acc)
    if mask is not None:
        S = S.masked_fill(~mask, _NEG_INF)
    batch, (n, m) = S.shape[:-2], S.shape[-2:]
    default_a, default_b = default_log_marginals(S)
    log_a = _log_marginal(a, default_a)
    log_b = _log_marginal(b, default_b)

    f = S.new_zeros(batch + (n,))
    g = S.new_zeros(batch + (m,))
    if init is not None:
        f0, g0 = init
        if f0 is not None:
            f = f + f0.to(acc)
        if g0 is not None:
            g = g + g0.to(acc)
    row_first = start == "row"

    def is_row(k: int) -> bool:
        return (k % 2 == 0) == row_first

    steps_used = torch.full(batch, steps, dtype=torch.int64, device=S.device)
    if tol == 0.0:
        # The fast path that the benchmarks time: one LSE pass per step.
        for k in range(steps):
            if is_row(k):
                f = _potential(log_a, _lse_rows(S, g))
            else:
                g = _potential(log_b, _lse_cols(S, f))
        done = None
        stopped_error = None
    else:
        # Per-problem stopping without host synchronisation: a problem that is done keeps its
        # potentials, its step count and the error that stopped it.
        threshold = tol * torch.exp(log_a).sum(-1)
        done = torch.zeros(batch, dtype=torch.bool, device=S.device)
        stopped_error = S.new_zeros(batch)
        for k in range(steps):
            row = is_row(k)
            lse = _lse_rows(S, g) if row else _lse_cols(S, f)
            if k >= 1:
                err = _marginal_error(log_a if row else log_b, lse, f if row else g)
                stop = ~done & (err <= threshold)
                steps_used = torch.where(stop, k, steps_used)
                stopped_error = torch.where(stop, err, stopped_error)
                done = done | stop
            if row:
                f = torch.where(done.unsqueeze(-1), f, _potential(log_a, lse))
            else:
                g = torch.where(done.unsqueeze(-1), g, _potential(log_b, lse))

    # Error of the marginal that step `steps` would fix, i.e. the one the last step did not fix.
    if is_row(steps):
        error = _marginal_error(log_a, _lse_rows(S, g), f)
    else:
        error = _marginal_error(log_b, _lse_cols(S, f), g)
    if done is not None:
        error = torch.where(done, stopped_error, error)

    plan = torch.exp(S + f.unsqueeze(-1) + g.unsqueeze(-2)).to(scores.dtype)
    return ReferenceResult(plan, f, g, steps_used, error)
