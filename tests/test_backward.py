"""The backward (MATH.md section 2): the unrolled gradient against autograd through the float64
reference for every step count, start axis and dtype; the implicit gradient against a dense
solve of section 2.2, against finite differences of the converged map and against the unrolled
gradient at convergence; invariants, masks, empty shapes, early stopping, torch.compile and
opcheck. Second order: tests/test_second_order.py."""

import math

import pytest
import torch
from conftest import (
    DEVICES,
    LOW_PRECISION,
    TOLERANCES,
    accumulation_dtype,
    assert_close,
    assert_flash_rule,
    generator,
    implicit_oracle,
    load_ops,
    ot_problem,
    random_marginals,
    random_scores,
    sinkhorn_reference,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sinkhorn_ops = load_ops()
OPS = torch.ops.sinkhorn_ops
IMPLICIT = ["implicit", "implicit_dense", "implicit_cg"]
ALL_DTYPES = [torch.float64, *LOW_PRECISION]

# Absolute floors of FlashAttention's rule for gradients of size O(1) (the reference's own error
# in a low-precision dtype can be tiny by luck on a small problem).
GRAD_FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Two solutions of a converged problem (implicit vs unrolled, or against finite differences).
CONVERGED_ATOL = 1e-6
# A tight CG so that "implicit_cg" is compared like a direct solve; the default is tested apart.
TIGHT_CG = {"cg_tol": 1e-12, "cg_max_iter": 500}


# ---------------------------------------------------------------------------------------------
# Helpers


def problem(batch, n, m, *, seed, given=True, dtype=torch.float64, device="cpu", scale=1.0):
    """Scores and (when `given`) positive marginals with sum(a) = sum(b), all in `dtype`."""
    S = random_scores(batch + (n, m), scale=scale, seed=seed, dtype=dtype, device=device)
    if not given:
        return S, None, None
    a, b = random_marginals(batch, n, m, seed=seed, dtype=dtype, device=device)
    return S, a, b


def upstream(batch, n, m, *, seed, device="cpu"):
    """Random float64 weights W, u, v of the linear loss <W, P> + <u, f> + <v, g>."""
    gen = generator(seed + 77)
    W = torch.randn(batch + (n, m), generator=gen, dtype=torch.float64)
    u = torch.randn(batch + (n,), generator=gen, dtype=torch.float64)
    v = torch.randn(batch + (m,), generator=gen, dtype=torch.float64)
    return W.to(device), u.to(device), v.to(device)


def balanced(u, v):
    """Shift u and v so that sum(u) = sum(v) = 0 per problem: the loss <u, f> + <v, g> is then
    blind to the gauge f + t, g - t, which the fixed point leaves free."""
    return u - u.mean(-1, keepdim=True), v - v.mean(-1, keepdim=True)


def op_run(S, a=None, b=None, **kwargs):
    return sinkhorn_ops.sinkhorn(S, a, b, return_potentials=True, **kwargs)


def ref_run(S, a=None, b=None, **kwargs):
    kwargs.pop("grad", None)
    kwargs.pop("cg_tol", None)
    kwargs.pop("cg_max_iter", None)
    return sinkhorn_reference(S, a, b, **kwargs)


def linear_loss(out, W=None, u=None, v=None):
    """<W, P> + <u, f> + <v, g>, summed in float64; absent weights drop their term."""
    loss = out.plan.new_zeros((), dtype=torch.float64)
    if W is not None:
        loss = loss + (out.plan.to(torch.float64) * W.to(out.plan.device)).sum()
    if u is not None:
        loss = loss + (out.f.to(torch.float64) * u.to(out.f.device)).sum()
    if v is not None:
        loss = loss + (out.g.to(torch.float64) * v.to(out.g.device)).sum()
    return loss


def grads(fn, S, a=None, b=None, W=None, u=None, v=None, *, device=None, loss=None, **kwargs):
    """(dL/dS, dL/da, dL/db) of L = linear_loss(fn(S, a, b, **kwargs)) (or `loss(out, a, b)`),
    computed on `device` (default: the inputs' device); None for absent marginals."""
    device = device or S.device
    leaves = [
        None if x is None else x.detach().to(device).clone().requires_grad_() for x in (S, a, b)
    ]
    if kwargs.get("mask") is not None:
        kwargs["mask"] = kwargs["mask"].to(device)
    out = fn(*leaves, **kwargs)
    value = linear_loss(out, W, u, v) if loss is None else loss(out, leaves[1], leaves[2])
    present = [x for x in leaves if x is not None]
    got = iter(torch.autograd.grad(value, present, allow_unused=True, materialize_grads=True))
    return tuple(None if x is None else next(got) for x in leaves)


def op_grads(S, a=None, b=None, W=None, u=None, v=None, **kwargs):
    return grads(op_run, S, a, b, W, u, v, **kwargs)


def ref_grads(S, a=None, b=None, W=None, u=None, v=None, **kwargs):
    """Autograd through the pure-PyTorch loop on the CPU: the unrolled ground truth."""
    return grads(ref_run, S, a, b, W, u, v, device="cpu", **kwargs)


def directional(ga, gb, da, db):
    """<dL/da, da> + <dL/db, db> per problem (float64, CPU)."""
    ga, gb = ga.detach().cpu().double(), gb.detach().cpu().double()
    return (ga * da.cpu()).sum(-1) + (gb * db.cpu()).sum(-1)


def mass_preserving_direction(batch, n, m, *, seed):
    """Directions (da, db) with sum(da) = sum(db) per problem, so a + h da, b + h db stay a
    valid problem: the only changes of the marginals along which dL/da, dL/db are defined."""
    gen = generator(seed + 555)
    da = torch.randn(batch + (n,), generator=gen, dtype=torch.float64)
    db = torch.randn(batch + (m,), generator=gen, dtype=torch.float64)
    db = db + (da.sum(-1, keepdim=True) - db.sum(-1, keepdim=True)) / m
    return da, db


def outer_sum(x, y):
    """x_i + y_j: the part of (dL/da, dL/db) that the gauge (x + t, y - t) leaves unchanged."""
    return x.unsqueeze(-1) + y.unsqueeze(-2)


def scale_of(t):
    return max(1.0, t.detach().abs().max().item()) if t.numel() else 1.0


# ---------------------------------------------------------------------------------------------
# gradcheck (float64)

GRADCHECK_CASES = [((2,), 3, 4), ((2,), 4, 4), ((), 4, 3), ((2, 1), 1, 3)]


@pytest.mark.parametrize("batch,n,m", GRADCHECK_CASES, ids=str)
@pytest.mark.parametrize("start", ["row", "col"])
@pytest.mark.parametrize("marginals", ["default", "given"])
def test_gradcheck_unrolled(device, batch, n, m, start, marginals):
    """The unrolled map is smooth in S, a and b for any positive a, b (the steps never use
    sum(a) = sum(b)), so a full gradcheck through plan, f and g is valid."""
    S, a, b = problem(batch, n, m, seed=n * 10 + m, given=marginals == "given", device=device)
    inputs = [S.requires_grad_()] + (
        [a.requires_grad_(), b.requires_grad_()] if a is not None else []
    )

    def fn(S, *ab):
        out = op_run(S, *ab, steps=5, start=start)
        return out.plan, out.f, out.g

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_unrolled_masked(device):
    S, a, b = problem((2,), 4, 5, seed=3, device=device)
    mask = torch.ones(2, 4, 5, dtype=torch.bool, device=device)
    mask[0, 1, 2] = mask[1, 3, 0] = mask[1, 0, 4] = False
    fn = lambda S, a, b: op_run(S, a, b, mask=mask, steps=6, start="col")[:3]
    inputs = (S.requires_grad_(), a.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("solver", ["implicit_dense", "implicit_cg"])
@pytest.mark.parametrize("batch,n,m", GRADCHECK_CASES[:3], ids=str)
@pytest.mark.parametrize("marginals", ["default", "given"])
def test_gradcheck_implicit_scores(device, solver, batch, n, m, marginals):
    """At convergence (300 steps, no early stop: a smooth map) the implicit gradient is the
    derivative of the converged plan and of the gauge-free dual value <a, f> + <b, g>."""
    S, a, b = problem(batch, n, m, seed=n * 10 + m + 1, given=marginals == "given", device=device)
    wa = torch.ones(batch + (n,), dtype=torch.float64, device=device) if a is None else a
    wb = torch.full(batch + (m,), n / m, dtype=torch.float64, device=device) if b is None else b

    def fn(S):
        out = op_run(S, a, b, steps=300, grad=solver, **TIGHT_CG)
        return out.plan, (out.f * wa).sum(-1) + (out.g * wb).sum(-1)

    assert torch.autograd.gradcheck(fn, (S.requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("grad", ["unrolled", *IMPLICIT])
@pytest.mark.parametrize("start", ["row", "col"])
def test_marginal_directional_derivative(device, grad, start):
    """<dL/da, da> + <dL/db, db> against a central difference of L(a + h da, b + h db) with
    sum(da) = sum(db) (one-entry differences would break sum(a) = sum(b)); the loss mixes the plan
    and the gauge-free potential terms. Converged (400 steps) so that implicit applies too."""
    batch, n, m = (3,), 4, 5
    S, a, b = problem(batch, n, m, seed=11, device=device)
    W, u, v = upstream(batch, n, m, seed=11, device=device)
    u, v = balanced(u, v)
    kwargs = {"steps": 400, "start": start, "grad": grad, **TIGHT_CG}
    _, ga, gb = op_grads(S, a, b, W, u, v, **kwargs)
    da, db = mass_preserving_direction(batch, n, m, seed=11)
    h = 1e-5

    def loss_at(t):
        with torch.no_grad():
            out = op_run(S, a + t * da.to(device), b + t * db.to(device), **kwargs)
            P, f, g = (x.cpu() for x in out[:3])
        return (P * W.cpu()).sum((-1, -2)) + (f * u.cpu()).sum(-1) + (g * v.cpu()).sum(-1)

    fd = (loss_at(h) - loss_at(-h)) / (2 * h)
    assert_close(
        directional(ga, gb, da, db), fd, atol=CONVERGED_ATOL, rtol=1e-6, name=f"{grad} d/da,db"
    )


# ---------------------------------------------------------------------------------------------
# Unrolled: equal to autograd through the reference loop


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("start", ["row", "col"])
@pytest.mark.parametrize("marginals", ["default", "given"])
@pytest.mark.parametrize("n,m", [(6, 9), (4, 4)])  # the CPU tiny path's general and 4x4 builds
def test_unrolled_matches_reference(device, dtype, steps, start, marginals, n, m):
    """float64: direct comparison. Low precision: FlashAttention's rule against the float64
    gradient of the same (rounded) inputs, with the reference's own autograd in that dtype as the
    yardstick."""
    batch = (2,)
    S, a, b = problem(
        batch, n, m, seed=steps, given=marginals == "given", dtype=dtype, device=device
    )
    W, u, v = upstream(batch, n, m, seed=steps, device=device)
    kwargs = {"steps": steps, "start": start}
    got = op_grads(S, a, b, W, u, v, **kwargs)
    up = lambda x: None if x is None else x.double()
    truth = ref_grads(up(S), up(a), up(b), W, u, v, **kwargs)
    names = ["grad_scores", "grad_a", "grad_b"]
    for x, g, name in zip((S, a, b), got, names):
        if x is not None:
            assert g.shape == x.shape and g.dtype == x.dtype, f"{name}: {g.shape} {g.dtype}"
            assert g.device == x.device
    if dtype == torch.float64:
        for g, t, name in zip(got, truth, names):
            if t is not None:
                assert_close(g, t, atol=1e-10 * scale_of(t), rtol=1e-9, name=name)
        return
    lowp = ref_grads(S, a, b, W, u, v, **kwargs)
    for g, low, t, name in zip(got, lowp, truth, names):
        if t is not None:
            floor = GRAD_FLOOR[dtype] * scale_of(t)
            assert_flash_rule(g, low, t, floor=floor, name=f"{dtype} K={steps} {name}")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_one_row_step_is_softmax_gradient(device, dtype):
    """steps=1 from the rows with a = 1 is softmax(S, -1) (MATH section 1), so the gradient is
    softmax's: P (W - sum_j W P)."""
    S = random_scores((3, 5, 7), scale=2.0, seed=1, dtype=dtype, device=device)
    W, _, _ = upstream((3,), 5, 7, seed=1, device=device)
    W = W.to(dtype)
    got = op_grads(S, None, None, W, steps=1, start="row")[0]
    S2 = S.detach().clone().requires_grad_()
    soft = torch.softmax(S2.to(accumulation_dtype(dtype)), -1).to(dtype)
    expected = torch.autograd.grad((soft * W).sum(), S2)[0]
    atol, rtol = TOLERANCES[dtype]
    assert got.dtype == dtype
    assert_close(got, expected, atol=2 * atol, rtol=2 * rtol, name="softmax gradient")
    # Unbatched scores take the same path.
    got2d = op_grads(S[0], None, None, W[0], steps=1)[0]
    assert_close(got2d, expected[0], atol=2 * atol, rtol=2 * rtol, name="unbatched")


def test_broadcast_marginals_and_dtypes(device):
    """a, b broadcast over the batch: their gradient is summed back to their own shape and
    dtype (accumulation-dtype marginals with float16 scores included)."""
    batch, n, m = (2, 3), 4, 5
    S = random_scores(batch + (n, m), seed=5, device=device)
    a_full, b_full = random_marginals((), n, m, seed=5, device=device)
    a, b = a_full, b_full.reshape(1, 1, m)
    W, u, v = upstream(batch, n, m, seed=5, device=device)
    kwargs = {"steps": 6, "start": "col"}
    got = op_grads(S, a, b, W, u, v, **kwargs)
    expected = ref_grads(S, a, b, W, u, v, **kwargs)
    for g, e, name in zip(got, expected, ["scores", "a", "b"]):
        assert g.shape == e.shape, f"{name}: {g.shape} != {e.shape}"
        assert_close(g, e, atol=1e-10, rtol=1e-9, name=name)
    # float16 scores with float32 marginals: gradients in each input's dtype.
    S16 = S.to(torch.float16)
    a32, b32 = a.float(), b.float()
    g16 = op_grads(S16, a32, b32, W, u, v, **kwargs)
    assert [x.dtype for x in g16] == [torch.float16, torch.float32, torch.float32]
    truth = ref_grads(S16.double(), a32.double(), b32.double(), W, u, v, **kwargs)
    low = ref_grads(S16, a32, b32, W, u, v, **kwargs)
    for g, lo, t, name in zip(g16, low, truth, ["scores", "a", "b"]):
        floor = GRAD_FLOOR[torch.float16] * scale_of(t)
        assert_flash_rule(g, lo, t, floor=floor, name=f"float16/float32 {name}")


@pytest.mark.parametrize("grad", ["unrolled", "implicit"])
def test_noncontiguous_inputs_and_upstream(device, grad):
    """Transposed scores, and upstream gradients that are transposed, sliced or expanded
    (stride 0), as autograd hands them to the backward."""
    n, m = 5, 4
    base = random_scores((2, m, n), seed=9, device=device)
    S = base.transpose(-1, -2)
    a, b = random_marginals((2,), n, m, seed=9, device=device)
    W, _, _ = upstream((2,), m, n, seed=9, device=device)
    kwargs = {"steps": 300 if grad != "unrolled" else 7, "grad": grad}
    losses = {
        "transposed": lambda out, a, b: (out.plan.transpose(-1, -2) * W.to(out.plan.device)).sum(),
        "sliced": lambda out, a, b: (out.plan[..., ::2] ** 2).sum() + out.f[..., 1::2].sum(),
        "expanded": lambda out, a, b: out.plan.sum() * 3.0 + out.plan[:, 0].sum(),
    }
    for name, loss in losses.items():
        got = grads(op_run, S, a, b, loss=loss, **kwargs)
        if grad == "unrolled":
            expected = grads(ref_run, S.cpu(), a.cpu(), b.cpu(), loss=loss, **kwargs)
        else:
            expected = grads(op_run, S.contiguous(), a, b, loss=loss, **kwargs)
        assert_close(got[0], expected[0], atol=1e-10, rtol=1e-9, name=f"{name} scores")
        assert_close(outer_sum(*got[1:]), outer_sum(*expected[1:]), atol=1e-9, name=f"{name} a+b")


@pytest.mark.parametrize("start", ["row", "col"])
@pytest.mark.parametrize("steps", [0, 1, 2, 5])
def test_unrolled_constant_upstream(device, start, steps):
    """After any step the total mass is fixed (sum(a) after a row step, sum(b) after a column
    step), so a constant dL/dP = c gives dL/dS = 0 and c on the marginal the last step fixed
    (checked against the reference). With no step, P = exp(S) and dL/dS = c exp(S)."""
    c = 3.0
    S, a, b = problem((2,), 4, 6, seed=steps, device=device)
    W = torch.full((2, 4, 6), c, dtype=torch.float64, device=device)
    gS, ga, gb = op_grads(S, a, b, W, steps=steps, start=start)
    if steps == 0:
        assert_close(gS, c * S.exp(), atol=1e-12, rtol=1e-12, name="exp(S) gradient")
        return
    assert_close(gS, torch.zeros_like(gS), atol=1e-12, name="dL/dS")
    last_row = (steps % 2 == 1) == (start == "row")
    assert_close(ga, torch.full_like(ga, c if last_row else 0.0), atol=1e-12, name="dL/da")
    assert_close(gb, torch.full_like(gb, 0.0 if last_row else c), atol=1e-12, name="dL/db")


@pytest.mark.parametrize("start", ["row", "col"])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_unrolled_start_axis_invariant(device, start, steps):
    """Starting from f = g = 0, adding u_i to row i of S (start "row") only shifts f by -u and
    leaves P and g unchanged, so the row sums of dL/dS equal -dL/df; columns likewise for
    start "col". The other axis has no such invariant (checked not to hold by accident)."""
    S, a, b = problem((2,), 5, 4, seed=steps, device=device)
    W, u, v = upstream((2,), 5, 4, seed=steps, device=device)
    gS = op_grads(S, a, b, W, u, v, steps=steps, start=start)[0]
    row_sums, col_sums = gS.sum(-1) + u, gS.sum(-2) + v
    fixed, other = (row_sums, col_sums) if start == "row" else (col_sums, row_sums)
    assert_close(fixed, torch.zeros_like(fixed), atol=1e-12, name=f"{start} sums + dL/d(potential)")
    assert other.abs().max() > 1e-3, "the other axis should not satisfy the invariant"


@pytest.mark.parametrize("steps", [1, 4, 9])
@pytest.mark.parametrize("start", ["row", "col"])
def test_unrolled_dual_value_loss(device, steps, start):
    """L = <a, f> + <b, g> with a, b requiring grad (used directly and by the operator) before
    convergence, against autograd through the reference."""
    S, a, b = problem((3,), 5, 4, seed=steps + 30, device=device, scale=2.0)
    loss = lambda out, a, b: (out.f * a).sum() + (out.g * b).sum() + (out.plan**2).sum()
    got = grads(op_run, S, a, b, loss=loss, steps=steps, start=start)
    expected = grads(ref_run, S.cpu(), a.cpu(), b.cpu(), loss=loss, steps=steps, start=start)
    for g, e, name in zip(got, expected, ["scores", "a", "b"]):
        assert_close(g, e, atol=1e-10 * scale_of(e), rtol=1e-9, name=name)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batch=st.lists(st.integers(1, 3), max_size=2).map(tuple),
    n=st.integers(1, 6),
    m=st.integers(1, 6),
    steps=st.integers(0, 12),
    start=st.sampled_from(["row", "col"]),
    given_marginals=st.booleans(),
    scale=st.floats(0.01, 6.0),
    with_potentials=st.booleans(),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("dev", DEVICES)
def test_property_unrolled_matches_reference(
    dev, batch, n, m, steps, start, given_marginals, scale, with_potentials, seed
):
    S, a, b = problem(batch, n, m, seed=seed, given=given_marginals, scale=scale, device=dev)
    W, u, v = upstream(batch, n, m, seed=seed, device=dev)
    if not with_potentials:
        u = v = None
    kwargs = {"steps": steps, "start": start}
    got = op_grads(S, a, b, W, u, v, **kwargs)
    expected = ref_grads(S, a, b, W, u, v, **kwargs)
    for g, e, name in zip(got, expected, ["scores", "a", "b"]):
        if e is not None:
            assert torch.isfinite(g).all(), f"{name} not finite"
            assert_close(g, e, atol=1e-10 * scale_of(e), rtol=1e-8, name=name)


# ---------------------------------------------------------------------------------------------
# Implicit (MATH section 2.2)


@pytest.mark.parametrize("solver", IMPLICIT)
@pytest.mark.parametrize("steps", [3, 300])
@pytest.mark.parametrize("potentials", ["plan_only", "with_potentials"])
def test_implicit_op_matches_dense_solve(device, solver, steps, potentials):
    """The backward op on any plan (converged or not: it uses the actual sums of P) against a
    float64 pseudo-inverse solve; dL/df, dL/dg with sum(dL/df) != sum(dL/dg) exercise the
    projection of the right-hand side onto the range of H. (x, y) compared as x_i + y_j."""
    batch, n, m = (3,), 5, 7
    S, a, b = problem(batch, n, m, seed=steps, device=device, scale=1.5)
    plan = op_run(S, a, b, steps=steps).plan
    W, u, v = upstream(batch, n, m, seed=steps, device=device)
    if potentials == "plan_only":
        u = v = None
    gS, x, y = OPS.sinkhorn_backward_implicit(W, u, v, plan, solver, 1e-12, 500)
    eS, ex, ey = implicit_oracle(plan, W, u, v)
    assert gS.shape == plan.shape and gS.dtype == plan.dtype
    assert x.shape == batch + (n,) and y.shape == batch + (m,) and x.dtype == torch.float64
    assert_close(gS, eS, atol=1e-9, rtol=1e-8, name=f"{solver} grad_scores")
    assert_close(outer_sum(x, y), outer_sum(ex, ey), atol=1e-8, rtol=1e-8, name=f"{solver} x+y")


@pytest.mark.parametrize("solver", IMPLICIT)
@pytest.mark.parametrize("steps", [3, 300])
def test_implicit_invariants(device, solver, steps):
    """MATH 2.2: every row and column sum of dL/dS is zero; a constant dL/dP gives dL/dS = 0
    (and x_i + y_j = c). With dL/df, dL/dg the sums become -dL/df + t and -dL/dg - t, with
    t = (sum dL/df - sum dL/dg) / (n + m) from projecting onto the range of H."""
    batch, n, m = (2,), 6, 4
    S, a, b = problem(batch, n, m, seed=steps + 1, device=device, scale=1.5)
    plan = op_run(S, a, b, steps=steps).plan
    W, u, v = upstream(batch, n, m, seed=steps, device=device)
    gS, _, _ = OPS.sinkhorn_backward_implicit(W, None, None, plan, solver, 1e-12, 500)
    assert gS.abs().max() > 1e-3, "the test needs a non-trivial gradient"
    assert_close(gS.sum(-1), torch.zeros_like(gS.sum(-1)), atol=1e-10, name="row sums")
    assert_close(gS.sum(-2), torch.zeros_like(gS.sum(-2)), atol=1e-10, name="column sums")
    c = 2.5
    gS, x, y = OPS.sinkhorn_backward_implicit(
        torch.full_like(W, c), None, None, plan, solver, 1e-12, 500
    )
    assert_close(gS, torch.zeros_like(gS), atol=1e-10, name="constant upstream dL/dS")
    assert_close(outer_sum(x, y), torch.full_like(outer_sum(x, y), c), atol=1e-9, name="x+y")
    gS, _, _ = OPS.sinkhorn_backward_implicit(W, u, v, plan, solver, 1e-12, 500)
    t = (u.sum(-1, keepdim=True) - v.sum(-1, keepdim=True)) / (n + m)
    assert_close(gS.sum(-1), -u + t, atol=1e-10, name="row sums with dL/df")
    assert_close(gS.sum(-2), -v - t, atol=1e-10, name="column sums with dL/dg")


@pytest.mark.parametrize("solver", IMPLICIT)
@pytest.mark.parametrize("start", ["row", "col"])
@pytest.mark.parametrize("marginals", ["default", "given"])
def test_implicit_matches_unrolled_at_convergence(device, solver, start, marginals):
    """K >= 500 with tol 1e-12 in float64: implicit = unrolled = reference autograd to ~1e-6 for
    dL/dS, and along mass-preserving directions for a, b; the loss mixes the plan and gauge-free
    potential terms (sum u = sum v = 0, and the dual value <a, f> + <b, g>)."""
    batch, n, m = (3,), 6, 5
    _, S, a, b = ot_problem(batch, n, m, eps=[1.0, 0.3, 0.1], seed=2, device=device)
    if marginals == "default":
        a = b = None
    W, u, v = upstream(batch, n, m, seed=2, device=device)
    u, v = balanced(u, v)
    kwargs = {"steps": 600, "start": start, "tol": 1e-12}
    out = op_run(S, a, b, **kwargs)
    assert bool((out.steps < 600).all()), f"not converged: steps {out.steps.tolist()}"

    def dual(out, a, b):
        wa = torch.ones_like(out.f) if a is None else a
        wb = torch.full_like(out.g, n / m) if b is None else b
        return linear_loss(out, W, u, v) + (out.f * wa).sum() + (out.g * wb).sum()

    imp = grads(op_run, S, a, b, loss=dual, grad=solver, **TIGHT_CG, **kwargs)
    unr = grads(op_run, S, a, b, loss=dual, grad="unrolled", **kwargs)
    ref = grads(
        ref_run, S.cpu(), *(x.cpu() if x is not None else None for x in (a, b)), loss=dual, **kwargs
    )
    for g, e, name in zip(unr, ref, ["scores", "a", "b"]):
        if e is not None:
            assert_close(g, e, atol=1e-9, rtol=1e-8, name=f"unrolled vs reference {name}")
    assert_close(imp[0], unr[0], atol=CONVERGED_ATOL, rtol=1e-6, name=f"{solver} vs unrolled dL/dS")
    if a is not None:
        da, db = mass_preserving_direction(batch, n, m, seed=2)
        assert_close(
            directional(*imp[1:], da, db),
            directional(*unr[1:], da, db),
            atol=CONVERGED_ATOL,
            rtol=1e-6,
            name=f"{solver} vs unrolled along (da, db)",
        )


@pytest.mark.parametrize("grad", ["unrolled", *IMPLICIT])
def test_dual_value_envelope(device, grad):
    """At convergence d(<a, f> + <b, g>)/dS = -P exactly (envelope theorem, MATH 2.3 at eps=1:
    the dual value is that sum minus the fixed mass), and dL/da_i + dL/db_j = f_i + g_j + 1."""
    batch, n, m = (2,), 5, 6
    S, a, b = problem(batch, n, m, seed=21, device=device)
    kwargs = {"steps": 500, "grad": grad, **TIGHT_CG}
    loss = lambda out, a, b: (out.f * a).sum() + (out.g * b).sum()
    gS, ga, gb = grads(op_run, S, a, b, loss=loss, **kwargs)
    out = op_run(S, a, b, steps=500)
    assert_close(gS, -out.plan, atol=CONVERGED_ATOL, name="dL/dS = -P")
    assert_close(outer_sum(ga, gb), outer_sum(out.f, out.g) + 1, atol=CONVERGED_ATOL, name="f+g+1")


@pytest.mark.parametrize("n,m", [(256, 300), (300, 257)])
def test_implicit_solvers_agree_across_the_dense_limit(device, n, m):
    """The auto solver "implicit" solves densely up to min(n, m) = 256 and by CG above: at 256
    it must equal the dense solver, at 257 the CG one (same cg_tol); dense and CG agree to the
    CG tolerance."""
    S = random_scores((1, n, m), seed=n, device=device)
    plan = op_run(S, steps=20).plan
    W, _, _ = upstream((1,), n, m, seed=n, device=device)
    dense = OPS.sinkhorn_backward_implicit(W, None, None, plan, "implicit_dense", 1e-6, 100)
    cg = OPS.sinkhorn_backward_implicit(W, None, None, plan, "implicit_cg", 1e-10, 1000)
    assert_close(cg[0], dense[0], atol=1e-8 * scale_of(dense[0]), name="cg vs dense")
    auto = OPS.sinkhorn_backward_implicit(W, None, None, plan, "implicit", 1e-10, 1000)
    same = dense if min(n, m) <= 256 else cg
    assert_close(auto[0], same[0], atol=1e-12 * scale_of(same[0]), name="auto path")


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("solver", ["implicit_dense", "implicit_cg"])
@pytest.mark.parametrize("n,m", [(6, 9), (9, 6)])
def test_implicit_nonfinite_upstream_spoils_its_problem_only(device, kind, solver, n, m):
    """A NaN or inf in grad_plan makes every gradient of its problem NaN, whichever side the
    solve runs on, never a finite value that looks valid; the other problems stay finite."""
    S = random_scores((3, n, m), seed=7, device=device)
    plan = op_run(S, steps=30).plan
    W, _, _ = upstream((3,), n, m, seed=7, device=device)
    W[1, 2, 3] = math.nan if kind == "nan" else math.inf
    grads = OPS.sinkhorn_backward_implicit(W, None, None, plan, solver, 1e-10, 200)
    for name, g in zip(("grad_scores", "grad_a", "grad_b"), grads):
        assert bool(g[1].isnan().all()), f"{name} of the spoiled problem: {g[1]}"
        assert bool(g[[0, 2]].isfinite().all()), f"{name} of the clean problems"


def test_implicit_default_cg_tolerance(device):
    """The default cg_tol (1e-6) and cg_max_iter (100) give a gradient close to the dense one."""
    S, a, b = problem((2,), 40, 30, seed=4, device=device)
    W, _, _ = upstream((2,), 40, 30, seed=4, device=device)
    dense = op_grads(S, a, b, W, steps=300, grad="implicit_dense")[0]
    cg = op_grads(S, a, b, W, steps=300, grad="implicit_cg")[0]
    assert_close(cg, dense, atol=1e-4 * scale_of(dense), name="default CG")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("solver", ["implicit_dense", "implicit_cg"])
def test_implicit_low_precision(device, dtype, solver):
    """FlashAttention's rule: the op in `dtype` against the float64 solve of the same (rounded)
    plan, with the float64 solve of the plan and dL/dP rounded to `dtype` as the yardstick."""
    batch, n, m = (2,), 7, 9
    S = random_scores(batch + (n, m), seed=6, dtype=dtype, device=device)
    plan = op_run(S, steps=200).plan
    W, _, _ = upstream(batch, n, m, seed=6, device=device)
    W = W.to(dtype)
    gS = OPS.sinkhorn_backward_implicit(W, None, None, plan, solver, 1e-7, 200)[0]
    assert gS.dtype == dtype
    truth = implicit_oracle(plan, W)[0]
    lowp = implicit_oracle(plan.float(), W.float())[0].to(dtype)
    assert_flash_rule(gS, lowp, truth, floor=GRAD_FLOOR[dtype], name=f"{dtype} {solver}")


# ---------------------------------------------------------------------------------------------
# Masks, empty shapes, early stopping


@pytest.mark.parametrize("grad", ["unrolled", *IMPLICIT])
@pytest.mark.parametrize("how", ["mask", "minus_inf"])
def test_masked_entries_get_zero_gradient(device, grad, how):
    """Masked entries (a mask or -inf scores) get exactly zero, the others finite values equal to
    the reference (unrolled) or to the implicit solve on the masked plan."""
    batch, n, m = (2,), 5, 6
    S, a, b = problem(batch, n, m, seed=8, device=device)
    gen = generator(8)
    mask = torch.rand(batch + (n, m), generator=gen) < 0.75
    mask[..., torch.arange(min(n, m)), torch.arange(min(n, m))] = True  # no empty row or column
    mask = mask.to(device)
    W, u, v = upstream(batch, n, m, seed=8, device=device)
    steps = 7 if grad == "unrolled" else 300
    if how == "mask":
        kwargs = {"mask": mask, "steps": steps, "grad": grad, **TIGHT_CG}
    else:
        S = S.masked_fill(~mask, float("-inf"))
        kwargs = {"steps": steps, "grad": grad, **TIGHT_CG}
    gS, ga, gb = op_grads(S, a, b, W, u, v, **kwargs)
    assert bool((gS[~mask] == 0).all()), f"masked gradients {gS[~mask]}"
    assert torch.isfinite(gS).all() and torch.isfinite(ga).all() and torch.isfinite(gb).all()
    if grad == "unrolled":
        expected = ref_grads(S, a, b, W, u, v, **kwargs)
        for g, e, name in zip((gS, ga, gb), expected, ["scores", "a", "b"]):
            assert_close(g, e, atol=1e-10, rtol=1e-9, name=name)
    else:
        plan = op_run(S, a, b, **kwargs).plan
        u, v = balanced(u, v)
        gS, _, _ = op_grads(S, a, b, W, u, v, **kwargs)
        expected = implicit_oracle(plan, W, u, v)[0]
        assert_close(gS, expected, atol=1e-8, rtol=1e-8, name="implicit on the masked plan")


@pytest.mark.parametrize("grad", ["unrolled", *IMPLICIT])
@pytest.mark.parametrize("start", ["row", "col"])
@pytest.mark.parametrize("marginals", ["default", "given"])
def test_empty_rows_and_columns(device, grad, start, marginals):
    """Rows and columns with no allowed entry: finite gradients everywhere, zero on them, and on
    the allowed block the gradient of the problem without them (for the default marginals that
    problem has the same defaults; given marginals of an empty row stay unused)."""
    batch, n, m = (2,), 5, 6
    S, a, b = problem(batch, n, m, seed=12, given=marginals == "given", device=device)
    mask = torch.ones(batch + (n, m), dtype=torch.bool)
    rows, cols = [0, 1, 3, 4], [0, 2, 3, 5]  # row 2 and columns 1, 4 empty in every problem
    mask[:, 2, :] = False
    mask[:, :, [1, 4]] = False
    mask = mask.to(device)
    W, u, v = upstream(batch, n, m, seed=12, device=device)
    r, c = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    if grad != "unrolled":
        # Zero on the empty rows and columns, balanced on the others: every projection of the
        # right-hand side (over all rows or the allowed ones) then leaves it unchanged.
        u_alive, v_alive = balanced(u.index_select(-1, r), v.index_select(-1, c))
        u = torch.zeros_like(u).index_copy(-1, r, u_alive)
        v = torch.zeros_like(v).index_copy(-1, c, v_alive)
    steps = 6 if grad == "unrolled" else 400
    kwargs = {"steps": steps, "start": start, "grad": grad, **TIGHT_CG}
    gS, ga, gb = op_grads(S, a, b, W, u, v, mask=mask, **kwargs)
    for g, name in [(gS, "scores"), (ga, "a"), (gb, "b")]:
        if g is not None:
            assert torch.isfinite(g).all(), f"{grad}: {name} gradient not finite: {g}"
    assert bool((gS[~mask] == 0).all()), "masked entries must get exactly zero"

    sub = lambda x, dims: x if x is None else x.index_select(-1, dims)
    S_sub = S.index_select(-2, r).index_select(-1, c)
    W_sub = W.index_select(-2, r).index_select(-1, c)
    a_sub, b_sub, u_sub, v_sub = sub(a, r), sub(b, c), sub(u, r), sub(v, c)
    if grad == "unrolled":
        expected = ref_grads(S_sub, a_sub, b_sub, W_sub, u_sub, v_sub, steps=steps, start=start)
        if a is not None:
            assert_close(sub(ga, r), expected[1], atol=1e-10, rtol=1e-9, name="a (allowed rows)")
            assert_close(sub(gb, c), expected[2], atol=1e-10, rtol=1e-9, name="b (allowed cols)")
            assert bool((ga[:, 2] == 0).all()) and bool((gb[:, [1, 4]] == 0).all()), "unused a, b"
    else:
        expected = op_grads(S_sub, a_sub, b_sub, W_sub, u_sub, v_sub, **kwargs)
    block = gS.index_select(-2, r).index_select(-1, c)
    assert_close(block, expected[0], atol=1e-8, rtol=1e-8, name=f"{grad} allowed block")


@pytest.mark.parametrize("grad", IMPLICIT)
def test_implicit_gradient_of_a_block_diagonal_plan(device, grad):
    """A block-diagonal mask (packed sequences) splits the plan into independent problems, whose
    Schur system then has a null direction per block: the gradient of the scores through the
    plan is still each block's own (its right-hand side is balanced per block)."""
    n = 6
    S = random_scores((2, n, n), seed=40, device=device)
    mask = torch.zeros(2, n, n, dtype=torch.bool)
    mask[:, :2, :2] = mask[:, 2:, 2:] = True
    mask = mask.to(device)
    W = random_scores((2, n, n), seed=41, device=device)
    kwargs = {"steps": 400, "grad": grad, **TIGHT_CG}
    gS = op_grads(S, None, None, W, None, None, mask=mask, **kwargs)[0]
    assert torch.isfinite(gS).all() and bool((gS[~mask] == 0).all())
    for block in (slice(0, 2), slice(2, n)):
        want = op_grads(S[:, block, block], None, None, W[:, block, block], None, None,
                        **kwargs)[0]
        assert_close(gS[:, block, block], want, atol=1e-9, rtol=1e-8, name=f"{grad} {block}")


@pytest.mark.parametrize("grad", ["unrolled", *IMPLICIT])
def test_fully_masked_problem(device, grad):
    """A problem with no allowed entry next to a normal one: zero, finite gradients for it, and
    the normal problem unaffected."""
    S = random_scores((2, 4, 3), seed=13, device=device)
    mask = torch.ones(2, 4, 3, dtype=torch.bool, device=device)
    mask[0] = False
    W, u, v = upstream((2,), 4, 3, seed=13, device=device)
    u, v = balanced(u, v)
    kwargs = {"steps": 5 if grad == "unrolled" else 300, "grad": grad, **TIGHT_CG}
    gS = op_grads(S, None, None, W, u, v, mask=mask, **kwargs)[0]
    assert bool((gS[0] == 0).all()), f"{grad}: fully masked problem got {gS[0]}"
    alone = op_grads(S[1:], None, None, W[1:], u[1:], v[1:], **kwargs)[0]
    assert_close(gS[1:], alone, atol=1e-12, rtol=1e-12, name="the other problem")


@pytest.mark.parametrize("grad", ["unrolled", *IMPLICIT])
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (2, 0, 0)], ids=str)
def test_empty_shapes(device, grad, shape):
    """n = 0, m = 0 and B = 0 run backward and give zero gradients of the right shapes."""
    S = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    out = op_run(S, steps=5, grad=grad)
    loss = out.plan.sum() + out.f.sum() + out.g.sum()
    (gS,) = torch.autograd.grad(loss, S)
    assert gS.shape == S.shape and gS.dtype == S.dtype and int(gS.count_nonzero()) == 0
    if shape[0] == 0:  # given marginals, B = 0
        a = torch.ones(0, 3, dtype=torch.float64, device=device, requires_grad=True)
        b = torch.ones(0, 4, dtype=torch.float64, device=device, requires_grad=True)
        out = op_run(S, a, b, steps=5, grad=grad)
        gs = torch.autograd.grad(out.plan.sum() + out.f.sum(), (S, a, b))
        assert [g.shape for g in gs] == [S.shape, a.shape, b.shape]


@pytest.mark.parametrize("start", ["row", "col"])
@pytest.mark.parametrize("marginals", ["default", "given"])
def test_early_stopping_unrolled(device, start, marginals):
    """tol > 0: every problem stops on its own; the unrolled gradient is autograd through the
    reference run with the same tol, and through exactly the steps each problem used."""
    batch, n, m = (4,), 6, 5
    _, S, a, b = ot_problem(batch, n, m, eps=[2.0, 0.5, 0.2, 0.1], seed=4, device=device)
    if marginals == "default":
        a = b = None
    W, u, v = upstream(batch, n, m, seed=4, device=device)
    kwargs = {"steps": 200, "start": start, "tol": 1e-5}
    steps_used = op_run(S, a, b, **kwargs).steps.cpu()
    assert len(set(steps_used.tolist())) > 1, f"the test needs different steps: {steps_used}"
    assert bool((steps_used < 200).all())
    got = op_grads(S, a, b, W, u, v, **kwargs)
    expected = ref_grads(S, a, b, W, u, v, **kwargs)
    for g, e, name in zip(got, expected, ["scores", "a", "b"]):
        if e is not None:
            assert_close(g, e, atol=1e-10, rtol=1e-9, name=f"{name} vs reference with tol")
    for i, k in enumerate(steps_used.tolist()):
        pick = lambda x, i=i: None if x is None else x[i : i + 1]
        one = ref_grads(pick(S), pick(a), pick(b), pick(W), pick(u), pick(v), steps=k, start=start)
        for g, e, name in zip(got, one, ["scores", "a", "b"]):
            if e is not None:
                assert_close(
                    g[i : i + 1], e, atol=1e-10, rtol=1e-9, name=f"problem {i} ({k} steps) {name}"
                )


# ---------------------------------------------------------------------------------------------
# The backward ops called directly, opcheck, torch.compile


def test_backward_unrolled_op_direct(device):
    """sinkhorn_backward_unrolled returns d a, d b (not d log a) in the broadcast shapes and the
    accumulation dtype, empty tensors without marginals; equal to autograd."""
    batch, n, m = (2,), 4, 5
    for dtype in [torch.float64, torch.float16]:
        S, a, b = problem(batch, n, m, seed=1, dtype=dtype, device=device)
        out = op_run(S, a, b, steps=5, start="col")
        W, u, v = upstream(batch, n, m, seed=1, device=device)
        acc = accumulation_dtype(dtype)
        Wd, ud, vd = W.to(dtype), u.to(acc), v.to(acc)
        gS, ga, gb = OPS.sinkhorn_backward_unrolled(Wd, ud, vd, S, a, b, None, out.steps, 5, "col")
        assert gS.shape == S.shape and gS.dtype == dtype
        assert ga.shape == batch + (n,) and gb.shape == batch + (m,)
        assert ga.dtype == acc and gb.dtype == acc
        expected = op_grads(S, a, b, Wd, ud, vd, steps=5, start="col")
        atol, rtol = TOLERANCES[dtype]
        assert_close(gS, expected[0], atol=atol, rtol=rtol, name="scores")
        assert_close(ga, expected[1], atol=atol, rtol=rtol, name="a")
        assert_close(gb, expected[2], atol=atol, rtol=rtol, name="b")
        gS2, ga2, gb2 = OPS.sinkhorn_backward_unrolled(
            Wd, None, None, S, None, None, None, out.steps, 5, "col"
        )
        assert ga2.numel() == 0 and gb2.numel() == 0 and gS2.shape == S.shape


def _backward_op_args(device, dtype=torch.float64):
    S, a, b = problem((2,), 3, 4, seed=0, dtype=dtype, device=device)
    mask = torch.ones(2, 3, 4, dtype=torch.bool, device=device)
    mask[1, 0, 1] = False
    W, u, v = upstream((2,), 3, 4, seed=0, device=device)
    acc = accumulation_dtype(dtype)
    W, u, v = W.to(dtype), u.to(acc), v.to(acc)
    out = op_run(S, a, b, mask=mask, steps=6, tol=1e-3)
    plan = op_run(S, a, b, steps=50).plan
    return {
        "unrolled_given": (OPS.sinkhorn_backward_unrolled.default,
                           (W, u, v, S, a, b, mask, out.steps, 6, "row")),
        "unrolled_default": (OPS.sinkhorn_backward_unrolled.default,
                             (W, None, None, S, None, None, None, out.steps, 6, "col")),
        "implicit_dense": (OPS.sinkhorn_backward_implicit.default,
                           (W, u, v, plan, "implicit_dense", 1e-6, 100)),
        "implicit_cg": (OPS.sinkhorn_backward_implicit.default,
                        (W, None, v, plan, "implicit_cg", 1e-8, 50)),
    }  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "case", ["unrolled_given", "unrolled_default", "implicit_dense", "implicit_cg"]
)
def test_opcheck_backward_ops(device, dtype, case):
    op, args = _backward_op_args(device, dtype)[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("grad", ["unrolled", "implicit_dense", "implicit_cg"])
@pytest.mark.parametrize("marginals", ["default", "given"])
def test_opcheck_forward_with_requires_grad(device, grad, marginals):
    """test_autograd_registration and test_aot_dispatch_dynamic (which compares gradients) need
    inputs that require grad."""
    S, a, b = problem((2,), 3, 5, seed=1, given=marginals == "given", device=device)
    S.requires_grad_()
    if a is not None:
        a.requires_grad_()
        b.requires_grad_()
    steps = 4 if grad == "unrolled" else 60
    args = (S, a, b, None, steps, "row", 0.0, grad, 1e-8, 50)
    torch.library.opcheck(OPS.sinkhorn.default, args)


@pytest.mark.parametrize("grad", ["unrolled", "implicit"])
def test_compile_backward_matches_eager(device, grad):
    torch._dynamo.reset()
    W, u, v = upstream((2,), 5, 4, seed=3, device=device)
    u, v = balanced(u, v)
    steps = 6 if grad == "unrolled" else 200

    def loss_fn(S, a, b):
        out = sinkhorn_ops.sinkhorn(
            S, a, b, steps=steps, start="col", grad=grad, return_potentials=True
        )
        return (out.plan * W).sum() + (out.f * u).sum() + (out.g * v).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for seed, given_marginals in [(0, True), (1, False)]:
        S, a, b = problem((2,), 5, 4, seed=seed, given=given_marginals, device=device)
        leaves = lambda xs=(S, a, b): [
            x.detach().clone().requires_grad_() for x in xs if x is not None
        ]
        eager_in, comp_in = leaves(), leaves()
        if a is None:
            eager_in += [None, None]
            comp_in += [None, None]
        loss_e = loss_fn(*eager_in)
        loss_c = compiled(*comp_in)
        loss_e.backward()
        loss_c.backward()
        assert_close(loss_c, loss_e, atol=1e-12, rtol=1e-12, name="loss")
        for xe, xc in zip(eager_in, comp_in):
            if xe is not None:
                assert xc.grad is not None, "compiled backward produced no gradient"
                assert_close(xc.grad, xe.grad, atol=1e-12, rtol=1e-12, name=f"{grad} compiled grad")


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_path_marginals_over_many_orders_of_magnitude(device):
    """Marginals from 1e-13 to 1e13 make scaling ratios beyond the CPU tiny path's product
    range (1e12 in fp32), so the potentials' pending products fold their logs into sums: the
    plan (relative to its row's mass) matches float64, and plan and gradient stay finite. (fp32
    cannot resolve this gradient, whose entries span 20 orders of magnitude, so only its
    finiteness is checked.)"""
    torch.manual_seed(5)
    a = torch.tensor([1e13, 1.0, 1e-13, 3.0], dtype=torch.float64)
    b = a[[2, 0, 3, 1]].clone()
    S = torch.randn(40, 4, 4, dtype=torch.float64, device=device)
    W = torch.randn_like(S)
    want_plan = None
    for dtype in (torch.float64, torch.float32):
        x = S.to(dtype).requires_grad_(True)
        plan = sinkhorn_ops.sinkhorn(x, a.to(device, dtype), b.to(device, dtype), steps=40,
                                     start="col")
        (grad,) = torch.autograd.grad((plan / a.to(device, dtype)[:, None] * W.to(dtype)).sum(), x)
        assert torch.isfinite(plan).all() and torch.isfinite(grad).all(), dtype
        rel = (plan.double() / a.to(device)[:, None])
        if want_plan is None:
            want_plan = rel
            continue
        assert (rel - want_plan).abs().max().item() < 1e-4


def test_composite_unrolled_backward_matches_the_cpu_kernel(tmp_path):
    """The ATen-composed unrolled backward (the CUDA path for n * m >= 2^20) against the CPU
    kernel: masks, given marginals, early stopping, dL/df and dL/dg, float64/float32/bfloat16."""
    import os
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parent / "scripts" / "unrolled_grads.py"
    outs = {}
    for mode in ("kernel", "composite"):
        env = dict(os.environ)
        env.pop("SINKHORN_CPU_BACKWARD", None)
        if mode == "composite":
            env["SINKHORN_CPU_BACKWARD"] = "composite"
        path = tmp_path / f"{mode}.pt"
        run = subprocess.run([sys.executable, str(script), str(path)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        outs[mode] = torch.load(path)
    tolerances = [1e-12, 1e-4, 2e-2]  # the script's dtype order: float64, float32, bfloat16
    assert len(outs["kernel"]) == len(outs["composite"]) == 15
    for k, (want, got) in enumerate(zip(outs["kernel"], outs["composite"])):
        for a, b in zip(want, got):
            assert torch.equal(a.isnan(), b.isnan()), (k, a.isnan().sum(), b.isnan().sum())
            ok = ~a.isnan()
            err = (a[ok] - b[ok]).abs().max().item() / max(a[ok].abs().max().item(), 1e-30)
            assert err <= tolerances[k % 3], (k, err)
