"""Self-checks of the pure-PyTorch reference against MATH.md section 1 and independent
implementations (softmax, POT, the published linear-domain loops). Runs without the extension."""

import math

import pytest
import torch
from conftest import assert_close, ot_problem, random_marginals, random_scores, sinkhorn_reference


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (2, 3, 4, 9)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_row_step_is_softmax(shape, dtype):
    S = random_scores(shape, scale=3.0, dtype=dtype)
    out = sinkhorn_reference(S, steps=1, start="row")
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    assert_close(out.plan, torch.softmax(S, dim=-1), atol=tol, rtol=tol, name="plan")
    assert out.plan.dtype == dtype and out.f.dtype == dtype


@pytest.mark.parametrize("start", ["row", "col"])
@pytest.mark.parametrize("steps", [1, 2, 3, 8])
@pytest.mark.parametrize("given", [False, True])
def test_last_step_fixes_its_marginal_and_error_measures_the_other(start, steps, given):
    batch, n, m = (3,), 6, 4
    S = random_scores(batch + (n, m), scale=2.0, seed=steps)
    if given:
        a, b = random_marginals(batch, n, m, seed=steps)
    else:
        a, b = (
            torch.ones(batch + (n,), dtype=S.dtype),
            torch.full(batch + (m,), n / m, dtype=S.dtype),
        )
    out = sinkhorn_reference(
        S, a if given else None, b if given else None, steps=steps, start=start
    )
    last_is_row = ((steps - 1) % 2 == 0) == (start == "row")
    rows, cols = out.plan.sum(-1), out.plan.sum(-2)
    fixed, fixed_target = (rows, a) if last_is_row else (cols, b)
    other, other_target = (cols, b) if last_is_row else (rows, a)
    assert_close(fixed, fixed_target, atol=1e-12, rtol=1e-12, name="fixed marginal")
    assert_close(
        out.error, (other - other_target).abs().sum(-1), atol=1e-12, rtol=1e-10, name="error"
    )
    assert bool((out.error > 1e-6).all()), "a few steps on random scores should not converge"
    assert torch.equal(out.steps, torch.full(batch, steps))


@pytest.mark.parametrize("start", ["row", "col"])
def test_zero_steps_plan_is_exp_and_error_is_first_marginal(start):
    S = random_scores((2, 3, 5), seed=3)
    a, b = random_marginals((2,), 3, 5, seed=3)
    out = sinkhorn_reference(S, a, b, steps=0, start=start)
    assert_close(out.plan, S.exp(), atol=0, rtol=1e-15, name="plan")
    expected = (
        (S.exp().sum(-1) - a).abs().sum(-1)
        if start == "row"
        else (S.exp().sum(-2) - b).abs().sum(-1)
    )
    assert_close(out.error, expected, atol=1e-13, rtol=1e-13, name="error")
    assert bool((out.f == 0).all() and (out.g == 0).all())
    assert torch.equal(out.steps, torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("n,m", [(6, 6), (4, 9), (9, 4)])
def test_converges_to_given_marginals(n, m):
    S = random_scores((2, n, m), seed=n * m)
    a, b = random_marginals((2,), n, m, seed=n)
    out = sinkhorn_reference(S, a, b, steps=400)
    assert_close(out.plan.sum(-1), a, atol=1e-10, name="row sums")
    assert_close(out.plan.sum(-2), b, atol=1e-10, name="column sums")
    assert bool((out.error < 1e-10).all())


def test_default_marginals_square_is_doubly_stochastic():
    S = random_scores((3, 7, 7), scale=2.0, seed=11)
    out = sinkhorn_reference(S, steps=300)
    assert_close(out.plan.sum(-1), torch.ones(3, 7, dtype=S.dtype), atol=1e-10, name="rows")
    assert_close(out.plan.sum(-2), torch.ones(3, 7, dtype=S.dtype), atol=1e-10, name="cols")


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_shift_invariance_exact(steps):
    S = random_scores((2, 5, 6), seed=steps)
    row_shift = random_scores((2, 5, 1), scale=10.0, seed=100 + steps)
    col_shift = random_scores((2, 1, 6), scale=10.0, seed=200 + steps)
    base_row = sinkhorn_reference(S, steps=steps, start="row").plan
    base_col = sinkhorn_reference(S, steps=steps, start="col").plan
    # The first step absorbs a shift along its own axis exactly; a global shift is absorbed by any.
    assert_close(
        sinkhorn_reference(S + row_shift, steps=steps, start="row").plan,
        base_row,
        atol=1e-12,
        rtol=1e-10,
        name="row shift",
    )
    assert_close(
        sinkhorn_reference(S + col_shift, steps=steps, start="col").plan,
        base_col,
        atol=1e-12,
        rtol=1e-10,
        name="col shift",
    )
    assert_close(
        sinkhorn_reference(S + 7.5, steps=steps, start="col").plan,
        base_col,
        atol=1e-12,
        rtol=1e-10,
        name="global shift",
    )


def test_shift_invariance_at_convergence():
    S = random_scores((2, 5, 6), seed=4)
    shift = random_scores((2, 5, 1), scale=5.0, seed=5) + random_scores(
        (2, 1, 6), scale=5.0, seed=6
    )
    for start in ("row", "col"):
        base = sinkhorn_reference(S, steps=400, start=start).plan
        shifted = sinkhorn_reference(S + shift, steps=400, start=start).plan
        assert_close(shifted, base, atol=1e-10, name=f"start={start}")


@pytest.mark.parametrize("n,m,eps", [(8, 8, 0.5), (10, 6, 0.1), (5, 12, 0.05)])
def test_matches_pot_sinkhorn_log(n, m, eps):
    ot = pytest.importorskip("ot")
    C, S, a, b = ot_problem((), n, m, eps, seed=n + m)
    a, b = a / n, b / n  # POT works with probability vectors
    plan_pot, log = ot.bregman.sinkhorn_log(
        a.numpy(), b.numpy(), C.numpy(), eps, numItermax=100000, stopThr=1e-13, log=True
    )
    out = sinkhorn_reference(S, a, b, steps=4000)
    assert_close(out.plan, torch.from_numpy(plan_pot), atol=1e-10, rtol=1e-7, name="plan vs POT")
    # Potentials agree up to the (f + t, g - t) gauge: POT's log_u, log_v are f, g.
    df = out.f - torch.from_numpy(log["log_u"])
    dg = out.g - torch.from_numpy(log["log_v"])
    assert_close(df, df.mean().expand_as(df), atol=1e-7, name="f - log_u constant")
    assert_close(dg, -df.mean().expand_as(dg), atol=1e-7, name="g - log_v = -(f - log_u)")


def test_matches_mhc_linear_loop():
    # Xie et al. 2025 eq. 9: M0 = exp(H), M_t = T_r(T_c(M_{t-1})), t_max = 20.
    H = random_scores((3, 4, 4), scale=1.5, seed=7)
    M = H.exp()
    for _ in range(20):
        M = M / M.sum(-2, keepdim=True)
        M = M / M.sum(-1, keepdim=True)
    ones = torch.ones(3, 4, dtype=H.dtype)
    out = sinkhorn_reference(H, ones, ones, steps=40, start="col")
    assert_close(out.plan, M, atol=1e-13, rtol=1e-12, name="mHC")


def test_matches_swav_optvq_loop():
    # Q = exp(-eps cost); 5 x {columns to 1/K, rows to 1/N}; rows x N.
    N, K, eps = 12, 5, 10.0
    cost = torch.rand(2, N, K, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    Q = torch.exp(-eps * cost)
    for _ in range(5):
        Q = Q / Q.sum(-2, keepdim=True) / K
        Q = Q / Q.sum(-1, keepdim=True) / N
    a = torch.ones(2, N, dtype=torch.float64)
    b = torch.full((2, K), N / K, dtype=torch.float64)
    out = sinkhorn_reference(-eps * cost, a, b, steps=10, start="col")
    assert_close(out.plan, Q * N, atol=1e-13, rtol=1e-12, name="SwAV")


@pytest.mark.parametrize("start", ["row", "col"])
def test_padding_mask_is_exact(start):
    n, m = 7, 9
    sizes = [(7, 9), (3, 5), (1, 4), (6, 1)]
    S = random_scores((len(sizes), n, m), seed=9)
    mask = torch.zeros(len(sizes), n, m, dtype=torch.bool)
    for i, (r, c) in enumerate(sizes):
        mask[i, :r, :c] = True
    out = sinkhorn_reference(S, mask=mask, steps=200, start=start)
    assert bool(
        torch.isfinite(out.plan).all()
        and torch.isfinite(out.f).all()
        and torch.isfinite(out.g).all()
    )
    for i, (r, c) in enumerate(sizes):
        crop = sinkhorn_reference(S[i, :r, :c], steps=200, start=start)
        assert_close(out.plan[i, :r, :c], crop.plan, atol=1e-13, rtol=1e-12, name=f"block {i}")
        assert bool((out.plan[i][~mask[i]] == 0).all()), "masked entries must be exactly zero"
        assert bool((out.f[i, r:] == 0).all() and (out.g[i, c:] == 0).all()), (
            "dead potentials are 0"
        )
        assert_close(
            out.plan[i, :r, :c].sum(-1), torch.ones(r, dtype=S.dtype), atol=1e-9, name="rows"
        )
        assert_close(
            out.plan[i, :r, :c].sum(-2),
            torch.full((c,), r / c, dtype=S.dtype),
            atol=1e-9,
            name="cols",
        )


def test_mask_equals_minus_inf_scores_and_fully_masked_problem_is_zero():
    S = random_scores((3, 4, 5), seed=12)
    mask = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[2] = False
    out = sinkhorn_reference(S, mask=mask, steps=9)
    out_inf = sinkhorn_reference(S.masked_fill(~mask, -math.inf), steps=9)
    for x, y in zip(out, out_inf):
        assert torch.equal(x, y)
    assert bool((out.plan[2] == 0).all() and (out.f[2] == 0).all() and (out.g[2] == 0).all())
    assert bool(torch.isfinite(out.error).all())


def test_early_stopping_per_problem():
    eps = [1.0, 0.3, 0.1, 0.04]
    _, S, a, b = ot_problem((len(eps),), 8, 8, eps, seed=5)
    tol, K = 1e-6, 150
    out = sinkhorn_reference(S, a, b, steps=K, tol=tol)
    threshold = tol * a.sum(-1)
    # Independent recount with the plain loop: the error after k steps is what step k would fix.
    errors = torch.stack([sinkhorn_reference(S, a, b, steps=k).error for k in range(1, K)])
    below = errors <= threshold
    first = torch.where(below.any(0), below.int().argmax(0) + 1, K)
    assert torch.equal(out.steps, first)
    assert len(set(out.steps.tolist())) == len(eps), (
        f"problems should stop at different steps: {out.steps}"
    )
    assert int(out.steps.max()) < K
    for i, s in enumerate(out.steps.tolist()):
        plain = sinkhorn_reference(S[i], a[i], b[i], steps=s)
        assert_close(out.plan[i], plain.plan, atol=0, name=f"plan {i}")
        assert_close(out.error[i], plain.error, atol=0, name=f"error {i}")
        assert float(out.error[i]) <= float(threshold[i])


def test_early_stopping_not_reached_reports_last_error():
    _, S, a, b = ot_problem((2,), 6, 6, [0.05, 0.05], seed=2)
    out = sinkhorn_reference(S, a, b, steps=5, tol=1e-12)
    plain = sinkhorn_reference(S, a, b, steps=5)
    assert torch.equal(out.steps, torch.full((2,), 5))
    assert_close(out.error, plain.error, atol=0, name="error")
    assert_close(out.plan, plain.plan, atol=0, name="plan")


@pytest.mark.parametrize("shape", [(0, 4, 5), (2, 0, 5), (2, 4, 0), (0, 0)])
@pytest.mark.parametrize("tol", [0.0, 1e-3])
def test_empty_dims(shape, tol):
    S = torch.zeros(shape, dtype=torch.float64)
    out = sinkhorn_reference(S, steps=3, tol=tol)
    batch = shape[:-2]
    assert out.plan.shape == shape
    assert out.f.shape == batch + (shape[-2],) and out.g.shape == batch + (shape[-1],)
    assert out.steps.shape == batch and out.error.shape == batch
    for t in out:
        assert bool(torch.isfinite(t.double()).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_accumulates_in_float32(dtype):
    S = random_scores((2, 3, 4), dtype=dtype)
    out = sinkhorn_reference(S, steps=5)
    assert out.plan.dtype == dtype
    assert out.f.dtype == out.g.dtype == out.error.dtype == torch.float32
    exact = sinkhorn_reference(S.float(), steps=5)
    assert torch.equal(out.f, exact.f) and torch.equal(out.plan, exact.plan.to(dtype))
