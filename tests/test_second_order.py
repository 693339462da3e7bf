"""Second order and forward mode of the Sinkhorn operator (MATH.md section 2): the backward
operators differentiate (create_graph, torch.func's nested transforms, forward-mode tangents)
through their out-of-place ATen form; the operator has forward-mode AD in every grad mode (the
implicit tangents from the linearised fixed point); so do the mHC operators and their
backwards (forward over reverse), through their ATen forms.

Checked against finite differences (gradgradcheck, fwAD), against the float64 reference's own
second derivatives (hessians, Hessian-vector products, jvps; the reference is plain PyTorch), in
low precision against float64, with masks, zero marginals, early stopping and both starts, and
through Sinkhorn attention (a gradient penalty)."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import DEVICES, assert_close, load_ops, random_marginals, random_scores
from torch import func
from torch.autograd import gradcheck, gradgradcheck

so = load_ops()
from sinkhorn_ops.reference import sinkhorn_reference  # noqa: E402

F64 = torch.float64
IMPLICIT = ["implicit", "implicit_dense", "implicit_cg"]
TIGHT_CG = {"cg_tol": 1e-14, "cg_max_iter": 300}


def weights(shape, seed, device):
    return random_scores(shape, seed=seed, device=device)


def plan_loss(run, W):
    """A smooth loss of the plan whose second derivative is not trivially zero."""
    return lambda S: (run(S) * W).sin().sum()


# ---- the unrolled mode ----------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("start", ["row", "col"])
@pytest.mark.parametrize("steps", [0, 1, 4, 7])
def test_unrolled_gradgradcheck(device, start, steps):
    """Every output (plan, f, g) against every input (scores, a, b), by finite differences of
    the gradient; unbalanced marginals are fine here (the unrolled map is exact at any step)."""
    S = random_scores((2, 3, 4), seed=1, device=device).requires_grad_()
    a, b = random_marginals((2,), 3, 4, seed=1, device=device)
    a.requires_grad_()
    b.requires_grad_()

    def run(S, a, b):
        r = so.sinkhorn(S, a, b, steps=steps, start=start, return_potentials=True)
        return r.plan, r.f, r.g

    assert gradgradcheck(run, (S, a, b))


@pytest.mark.parametrize("device", DEVICES)
def test_unrolled_gradgradcheck_default_marginals_and_mask(device):
    S = random_scores((2, 4, 5), seed=2, device=device).requires_grad_()
    mask = torch.ones(2, 4, 5, dtype=torch.bool, device=device)
    mask[0, 1] = False  # an empty row
    mask[1, :, 3] = False  # an empty column
    mask[1, 0, 0] = False

    def run(S):
        r = so.sinkhorn(S, mask=mask, steps=6, return_potentials=True)
        return r.plan, r.f, r.g

    assert gradgradcheck(run, (S,))


def reference_hessian(loss_of_plan, S, **kw):
    return torch.autograd.functional.hessian(
        lambda s: loss_of_plan(sinkhorn_reference(s, **kw).plan), S)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["plain", "mask", "marginals", "tol", "zero_marginal"])
def test_unrolled_hessian_matches_reference(device, case):
    """torch.func.hessian (forward over reverse) and torch.autograd.functional.hessian (reverse
    over reverse) of a loss of the plan, against the hessian of the float64 reference."""
    n, m = 3, 4
    S = random_scores((n, m), seed=3, device=device)
    W = weights((n, m), 4, device)
    kw = {"steps": 5}
    if case == "mask":
        # (no empty line: the reference's own second derivative is NaN there, from
        # logsumexp's over an all -inf line; gradgradcheck covers empty lines above)
        mask = torch.ones(n, m, dtype=torch.bool, device=device)
        mask[1, 1:] = False
        mask[0, 2] = False
        kw["mask"] = mask
    elif case == "marginals":
        a, b = random_marginals((), n, m, seed=5, device=device)
        kw.update(a=a, b=b)
    elif case == "tol":
        kw = {"steps": 60, "tol": 1e-3}  # stops well before the cap
    elif case == "zero_marginal":
        a, b = random_marginals((), n, m, seed=6, device=device)
        a = a.clone()
        a[1] = 0.0
        b = b * (a.sum() / b.sum())
        kw.update(a=a, b=b)
    loss_of_plan = lambda P: (P * W).sin().sum()  # noqa: E731
    pos = {k: kw.pop(k) for k in ("a", "b") if k in kw}
    run = lambda s: so.sinkhorn(s, pos.get("a"), pos.get("b"), **kw)  # noqa: E731
    if case == "tol":
        steps = so.sinkhorn(S, return_potentials=True, **kw).steps
        assert 0 < int(steps) < 60
    want = reference_hessian(loss_of_plan, S.cpu(), **{k: (v.cpu() if torch.is_tensor(v) else v)
                                                       for k, v in {**kw, **pos}.items()})
    assert torch.isfinite(want).all()
    got_fr = func.hessian(lambda s: loss_of_plan(run(s)))(S)
    got_rr = torch.autograd.functional.hessian(lambda s: loss_of_plan(run(s)), S)
    assert_close(got_fr, want, atol=1e-10, rtol=1e-9, name="func.hessian")
    assert_close(got_rr, want, atol=1e-10, rtol=1e-9, name="autograd hessian")


@pytest.mark.parametrize("device", DEVICES)
def test_unrolled_second_order_in_the_marginals(device):
    """Mixed second derivatives in a and b (through d a = d log a / a) against the reference."""
    S = random_scores((3, 4), seed=7, device=device)
    a, b = random_marginals((), 3, 4, seed=7, device=device)
    W = weights((3, 4), 8, device)

    def loss(run):
        return lambda a, b: (run(a, b) * W).sin().sum()

    ours = loss(lambda a, b: so.sinkhorn(S, a, b, steps=5))
    ref = loss(lambda a, b: sinkhorn_reference(S.cpu(), a, b, steps=5).plan.to(S.device))
    got = torch.autograd.functional.hessian(ours, (a, b))
    want = torch.autograd.functional.hessian(ref, (a, b))
    for i in range(2):
        for j in range(2):
            assert_close(got[i][j], want[i][j], atol=1e-10, rtol=1e-9, name=f"H[{i}][{j}]")


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_penalty_trains(device):
    """create_graph through the operator: a penalty on the gradient's norm gets the gradient the
    reference gives it, and NaN never appears (an empty row included)."""
    S = random_scores((2, 4, 4), seed=9, device=device).requires_grad_()
    mask = torch.ones(2, 4, 4, dtype=torch.bool, device=device)
    mask[1, 2] = False
    W = weights((2, 4, 4), 10, device)

    def penalty(run, S, W=W):
        (g,) = torch.autograd.grad((run(S) * W).sin().sum(), S, create_graph=True)
        return g.square().sum()

    ours = penalty(lambda s: so.sinkhorn(s, mask=mask, steps=8), S)
    (got,) = torch.autograd.grad(ours, S)
    assert torch.isfinite(got).all()
    # The truth: the reference on each problem with its empty row left out (the default
    # marginals of the rest are the same: 1 a row, rows / columns a column), whose own second
    # derivative would be NaN across an all -inf line; that row's gradient is 0.
    want = torch.zeros(2, 4, 4, dtype=F64)
    for i, rows in ((0, [0, 1, 2, 3]), (1, [0, 1, 3])):
        Sc = S.detach()[i, rows].cpu().requires_grad_()
        ref = penalty(lambda s: sinkhorn_reference(s, steps=8).plan, Sc, W[i, rows].cpu())
        want[i, rows] = torch.autograd.grad(ref, Sc)[0]
    assert_close(got, want, atol=1e-10, rtol=1e-9, name="penalty gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", ["unrolled", "implicit_dense"])
def test_third_order_and_the_double_backward_trick(device, grad):
    """Differentiating the second-order result again: torch.autograd.functional.hvp (which
    differentiates a double backward with respect to its upstream gradient) and a third
    derivative d/dS <H(S) V, U>, against the reference's (the unrolled one's at convergence for
    the implicit mode)."""
    S = random_scores((2, 3, 4), seed=29, device=device)
    W, V, U = (weights((2, 3, 4), s, device) for s in (30, 31, 32))
    steps = 5 if grad == "unrolled" else 400
    ours = plan_loss(lambda s: so.sinkhorn(s, steps=steps, grad=grad), W)
    if grad == "unrolled":
        ref = plan_loss(lambda s: sinkhorn_reference(s, steps=steps).plan.to(S.device), W)
    else:
        ref = plan_loss(lambda s: so.sinkhorn(s, steps=steps), W)  # forward over reverse

    def third(f):
        s = S.clone().requires_grad_()
        (g,) = torch.autograd.grad(f(s), s, create_graph=True)
        (hv,) = torch.autograd.grad((g * V).sum(), s, create_graph=True)
        (t,) = torch.autograd.grad((hv * U).sum(), s)
        return hv.detach(), t

    tol = {"atol": 1e-10, "rtol": 1e-9} if grad == "unrolled" else {"atol": 1e-7, "rtol": 1e-6}
    if grad == "unrolled":
        (hv_got, t_got), (hv_want, t_want) = third(ours), third(ref)
        assert_close(t_got, t_want, name="third derivative", **tol)
    else:
        hv_got = third(ours)[0]
        hv_want = torch.autograd.functional.hvp(ref, S, V)[1]
    assert_close(hv_got, hv_want, name="create_graph hvp", **tol)
    got = torch.autograd.functional.hvp(ours, S, V)[1]
    assert_close(got, hv_want, name="functional.hvp", **tol)


# ---- forward mode --------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["plain", "marginals", "mask", "tol"])
def test_forward_mode_matches_reference(device, case):
    """jvp of plan, f and g against the reference's jvp, for tangents on S, a and b."""
    S = random_scores((2, 3, 4), seed=11, device=device)
    a, b = random_marginals((2,), 3, 4, seed=11, device=device)
    kw = {"steps": 7, "start": "col"}
    if case == "mask":
        mask = torch.ones(2, 3, 4, dtype=torch.bool, device=device)
        mask[0, 1] = False
        kw["mask"] = mask
    if case == "tol":
        kw = {"steps": 80, "tol": 1e-4}
    use_ab = case in ("marginals", "tol")
    tS = random_scores((2, 3, 4), seed=12, device=device)
    ta, tb = random_marginals((2,), 3, 4, seed=13, device=device)

    def ours(S, a, b):
        r = so.sinkhorn(S, a if use_ab else None, b if use_ab else None,
                        return_potentials=True, **kw)
        return r.plan, r.f, r.g

    def ref(S, a, b):
        cpu = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}
        r = sinkhorn_reference(S.cpu(), a.cpu() if use_ab else None, b.cpu() if use_ab else None,
                               **cpu)
        return r.plan, r.f, r.g

    out, tan = func.jvp(ours, (S, a, b), (tS, ta, tb))
    rout, rtan = func.jvp(ref, (S, a, b), (tS, ta, tb))
    for name, x, y in zip(("plan", "f", "g"), out, rout):
        assert_close(x, y, atol=1e-12, rtol=1e-12, name=name)
    for name, x, y in zip(("plan", "f", "g"), tan, rtan):
        assert_close(x, y, atol=1e-10, rtol=1e-9, name=f"tangent of {name}")
    # The steps and error come from the operator's own run, unchanged.
    with fwAD.dual_level():
        r = so.sinkhorn(fwAD.make_dual(S, tS), return_potentials=True, **{
            k: v for k, v in kw.items()})
        plain = so.sinkhorn(S, return_potentials=True, **kw)
        assert torch.equal(r.steps, plain.steps)
        assert_close(r.error, plain.error, atol=0, rtol=0, name="error")


@pytest.mark.parametrize("device", DEVICES)
def test_forward_mode_gradcheck(device):
    S = random_scores((2, 3, 3), seed=14, device=device).requires_grad_()
    a, b = random_marginals((2,), 3, 3, seed=14, device=device)
    a.requires_grad_()

    def run(S, a):
        r = so.sinkhorn(S, a, b, steps=5, return_potentials=True)
        return r.plan, r.f, r.g

    assert gradcheck(run, (S, a), check_forward_ad=True, check_backward_ad=True,
                     check_batched_forward_grad=True)


def _converged(device, seed, mask=False):
    """A problem, balanced marginals, a mask with an empty row and an empty column (or None),
    and tangents, those of the marginals balanced (sum da = sum db: the only meaningful
    changes of the marginals)."""
    S = random_scores((2, 3, 4), seed=seed, device=device)
    a, b = random_marginals((2,), 3, 4, seed=seed, device=device)
    m = None
    if mask:
        m = torch.ones(2, 3, 4, dtype=torch.bool, device=device)
        m[0, 1] = False
        m[1, :, 2] = False
    tS = random_scores((2, 3, 4), seed=seed + 1, device=device)
    ta, tb = random_scores((2, 3), seed=seed + 2, device=device), random_scores(
        (2, 4), seed=seed + 3, device=device)
    tb = tb - (tb.sum(-1, keepdim=True) - ta.sum(-1, keepdim=True)) / 4
    return S, a, b, m, (tS, ta, tb)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", IMPLICIT)
@pytest.mark.parametrize("mask", [False, True])
def test_implicit_forward_mode(device, grad, mask):
    """Forward mode of the implicit modes: the plan's tangent is the converged map's, so it
    equals the converged unrolled jvp (through the reference); the tangents of f and g are the
    ones whose jvp is the transpose of the implicit vjp, <u, J v> = <J^T u, v>, for every
    output and balanced tangents of the marginals."""
    S, a, b, m, tangents = _converged(device, 21, mask)
    # With a mask, the default marginals (a_i = 0 for the empty row): explicit marginals would
    # make the problem infeasible. Their tangents then go nowhere.
    marg = (lambda a, b: (None, None)) if mask else (lambda a, b: (a, b))  # noqa: E731

    def ours(S, a, b):
        r = so.sinkhorn(S, *marg(a, b), steps=600, mask=m, grad=grad, return_potentials=True,
                        **TIGHT_CG)
        return r.plan, r.f, r.g

    def ref(S, a, b):
        return sinkhorn_reference(S, *marg(a, b), steps=600, mask=m).plan

    out, tan = func.jvp(ours, (S, a, b), tangents)
    _, want = func.jvp(ref, (S, a, b), tangents)
    assert want.abs().max() > 1e-2
    assert_close(tan[0], want, atol=1e-9, rtol=1e-8, name="tangent of the plan")
    assert torch.isfinite(tan[1]).all() and torch.isfinite(tan[2]).all()
    if mask:
        assert (tan[0][~m] == 0).all() and (tan[1][0, 1] == 0)
    u = tuple(random_scores(t.shape, seed=30 + i, device=device) for i, t in enumerate(out))
    if mask:
        u = (u[0] * m,) + u[1:]
    _, vjp_fn = func.vjp(ours, S, a, b)
    back = vjp_fn(u)
    lhs = sum((x * y).sum() for x, y in zip(u, tan))
    rhs = sum((x * y).sum() for x, y in zip(back, tangents))
    assert_close(lhs, rhs, atol=1e-9, rtol=1e-9, name="<u, J v> = <J^T u, v>")


@pytest.mark.parametrize("grad", IMPLICIT)
def test_implicit_jvp_and_vjp_agree_in_the_raw_marginals(grad):
    """Unbalanced changes of a and b too (sum da != sum db): the implicit vjp's dL/da, dL/db
    are taken in the gauge orthogonal to (1, -1), where jacfwd and jacrev agree."""
    S = random_scores((3, 4), seed=26)
    a, b = random_marginals((), 3, 4, seed=26)

    def plan(S, a, b):
        return so.sinkhorn(S, a, b, steps=600, grad=grad, **TIGHT_CG)

    fwd = func.jacfwd(plan, argnums=(0, 1, 2))(S, a, b)
    rev = func.jacrev(plan, argnums=(0, 1, 2))(S, a, b)
    for name, x, y in zip("Sab", fwd, rev):
        assert y.abs().max() > 1e-2
        assert_close(x, y, atol=1e-10, rtol=1e-9, name=f"jacobian in {name}")
    r = so.sinkhorn(S, a.requires_grad_(), b.requires_grad_(), steps=600, grad=grad, **TIGHT_CG)
    da, db = torch.autograd.grad((r * random_scores((3, 4), seed=27)).sum(), (a, b))
    assert_close(da.sum(), db.sum(), atol=1e-12, rtol=0, name="gauge of dL/da, dL/db")


@pytest.mark.parametrize("grad", IMPLICIT)
def test_implicit_forward_mode_with_plain_autograd(grad):
    """torch.autograd.forward_ad with torch.autograd.grad (no torch.func): forward over reverse
    (gradgradcheck's check_fwd_over_rev; the saved plan keeps its tangent) and reverse over
    forward inside the dual level (the solve's node reads a copy of the plan)."""
    S = random_scores((2, 3, 4), seed=28).requires_grad_()

    def run(S):
        return so.sinkhorn(S, steps=400, grad=grad, **TIGHT_CG)

    assert gradgradcheck(run, (S,), check_fwd_over_rev=True, check_rev_over_rev=False,
                         check_undefined_grad=False, atol=1e-6)
    W, tS = random_scores((2, 3, 4), seed=29), random_scores((2, 3, 4), seed=30)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(run(fwAD.make_dual(S, tS))).tangent
        (got,) = torch.autograd.grad((tangent * W).sum(), S)
    want = func.grad(lambda s: (func.jvp(run, (s,), (tS,))[1] * W).sum())(S.detach())
    assert want.abs().max() > 1e-2
    assert_close(got, want, atol=1e-10, rtol=1e-9, name="reverse over forward")


@pytest.mark.parametrize("grad", IMPLICIT)
def test_implicit_per_sample_hessians(grad):
    """vmap(hessian): vmap of jacfwd, whose batched tangents the second order's dense solve
    takes through an inverse (linalg.solve's forward mode is wrong there in torch 2.13)."""
    S = random_scores((3, 3, 4), seed=31)
    W = weights((3, 4), 32, "cpu")
    f = plan_loss(lambda s: so.sinkhorn(s, steps=400, grad=grad, **TIGHT_CG), W)
    got = func.vmap(func.hessian(f))(S)
    want = torch.stack([torch.autograd.functional.hessian(f, s) for s in S])
    assert want.abs().max() > 1e-2
    assert_close(got, want, atol=1e-9, rtol=1e-8, name="vmap(hessian)")


@pytest.mark.parametrize("grad", IMPLICIT)
def test_implicit_forward_mode_gradcheck_and_hessians(grad):
    """The plan's tangents against finite differences of the converged map (marginals through
    a softmax keep the problem balanced), and the implicit hessian forward over reverse
    (torch.func.hessian) and reverse over forward (jacrev of jacfwd) against reverse over
    reverse."""
    S = random_scores((2, 3, 4), seed=22).requires_grad_()
    al = random_scores((2, 3), seed=23).requires_grad_()
    be = random_scores((2, 4), seed=24).requires_grad_()

    def run(S, al, be):
        return so.sinkhorn(S, al.softmax(-1), be.softmax(-1), steps=400, grad=grad, **TIGHT_CG)

    assert gradcheck(run, (S, al, be), check_forward_ad=True, check_backward_ad=False, atol=1e-6)
    W = weights((2, 3, 4), 25, "cpu")
    f = plan_loss(lambda S: so.sinkhorn(S, steps=400, grad=grad, **TIGHT_CG), W)
    S0 = S.detach()
    want = torch.autograd.functional.hessian(f, S0)
    assert want.abs().max() > 1e-2
    for name, got in [("func.hessian", func.hessian(f)(S0)),
                      ("jacrev of jacfwd", func.jacrev(func.jacfwd(f))(S0))]:
        assert not got.requires_grad, name
        assert_close(got, want, atol=1e-9, rtol=1e-8, name=name)


# ---- the implicit modes ---------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", IMPLICIT)
def test_implicit_gradgradcheck(device, grad):
    """The implicit gradient differentiated: through the plan (its own implicit gradient) and the
    solve. Marginals through a softmax keep the problem balanced under the finite differences,
    so that the converged map (which the implicit gradient differentiates) exists."""
    S = random_scores((2, 3, 4), seed=16, device=device).requires_grad_()
    al = random_scores((2, 3), seed=17, device=device).requires_grad_()
    be = random_scores((2, 4), seed=18, device=device).requires_grad_()

    def run(S, al, be):
        r = so.sinkhorn(S, al.softmax(-1), be.softmax(-1), steps=400, grad=grad,
                        return_potentials=True, **TIGHT_CG)
        return r.plan, r.f, r.g

    assert gradgradcheck(run, (S, al, be), atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_implicit_hessian_matches_the_converged_unrolled_one(device):
    """At convergence the implicit and unrolled hessians agree (the unrolled one through our
    forward-over-reverse, the implicit one through reverse-over-reverse)."""
    S = random_scores((3, 4), seed=19, device=device)
    W = weights((3, 4), 20, device)
    f_unrolled = plan_loss(lambda s: so.sinkhorn(s, steps=400), W)
    f_implicit = plan_loss(lambda s: so.sinkhorn(s, steps=400, grad="implicit_dense"), W)
    want = func.hessian(f_unrolled)(S)
    got = torch.autograd.functional.hessian(f_implicit, S)
    assert_close(got, want, atol=1e-8, rtol=1e-7, name="implicit hessian")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", IMPLICIT)
def test_implicit_second_order_at_a_zero_upstream_gradient(device, grad):
    """A least-squares loss at its optimum (dL/dP = 0 exactly): its Hessian-vector product is
    the Gauss-Newton term 2 J^T J V, which a solve differentiated through CG iterations that
    stop before their first step (a zero right-hand side) would lose; and
    torch.autograd.functional.hvp (a double backward at a zero upstream gradient) agrees with vhp
    (the Hessian is symmetric)."""
    S0 = random_scores((3, 4), seed=36, device=device)
    V = weights((3, 4), 37, device)
    W = weights((3, 4), 38, device)

    def gauss_newton(run):
        target = run(S0).detach()
        s = S0.clone().requires_grad_()
        (g,) = torch.autograd.grad((run(s) - target).square().sum(), s, create_graph=True)
        return torch.autograd.grad((g * V).sum(), s)[0]

    ours = lambda s: so.sinkhorn(s, steps=300, grad=grad)  # noqa: E731
    want = gauss_newton(lambda s: sinkhorn_reference(s.cpu(), steps=300).plan.to(device))
    got = gauss_newton(ours)
    assert want.abs().max() > 1e-3
    assert_close(got, want, atol=1e-8, rtol=1e-7, name="Gauss-Newton hvp")
    f = plan_loss(ours, W)
    hv = torch.autograd.functional.hvp(f, S0, V)[1]
    vh = torch.autograd.functional.vhp(f, S0, V)[1]
    assert_close(hv, vh, atol=1e-10, rtol=1e-9, name="hvp against vhp")


# ---- low precision, attention, errors -------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_hessian_vector_product(device, dtype):
    """A Hessian-vector product in low precision, within twice the reference's own error in
    that dtype (plus a floor), against the float64 reference."""
    S64 = random_scores((2, 4, 4), seed=21, device=device)
    W64 = weights((2, 4, 4), 22, device)
    V64 = weights((2, 4, 4), 23, device)

    def hvp(run, S, W, V):
        f = lambda s: (run(s).to(torch.float64) * W.to(torch.float64)).sin().sum()  # noqa: E731
        return torch.autograd.functional.hvp(f, S, V)[1]

    truth = hvp(lambda s: sinkhorn_reference(s, steps=6).plan, S64.cpu(), W64.cpu(), V64.cpu())
    ref = hvp(lambda s: sinkhorn_reference(s, steps=6).plan, S64.cpu().to(dtype), W64.cpu(),
              V64.cpu().to(dtype))
    got = hvp(lambda s: so.sinkhorn(s, steps=6), S64.to(dtype), W64, V64.to(dtype))
    err = (got.cpu().double() - truth).abs().max().item()
    ref_err = (ref.double() - truth).abs().max().item()
    floor = {torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    assert torch.isfinite(got).all()
    assert err <= 2 * ref_err + floor, f"{dtype}: hvp error {err:.3e} > 2 x {ref_err:.3e} + {floor}"


@pytest.mark.parametrize("device", DEVICES)
def test_attention_double_backward(device):
    """A gradient penalty through Sinkhorn attention (create_graph), against the same attention
    written with the reference."""
    import torch.nn.functional as F

    q, k, v = (random_scores((1, 2, 5, 4), seed=s, device=device).requires_grad_()
               for s in (24, 25, 26))

    def penalty(attend):
        out = attend(q, k, v)
        (gq,) = torch.autograd.grad(out.sin().sum(), q, create_graph=True)
        return gq.square().sum()

    def reference_attention(q, k, v):
        scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
        return sinkhorn_reference(scores, steps=3).plan @ v

    got = torch.autograd.grad(penalty(lambda q, k, v: so.sinkhorn_attention(q, k, v, steps=3)),
                              (q, k, v))
    want = torch.autograd.grad(penalty(reference_attention), (q, k, v))
    for name, x, y in zip("qkv", got, want):
        assert_close(x, y, atol=1e-10, rtol=1e-9, name=f"d penalty / d {name}")
    del F


def test_backward_operator_second_order_from_cpp_dispatch():
    """The backward operator called directly, with create_graph-style inputs, differentiates."""
    S = random_scores((2, 3, 3), seed=27).requires_grad_()
    G = random_scores((2, 3, 3), seed=28).requires_grad_()
    r = so.sinkhorn(S.detach(), steps=4, return_potentials=True)
    ds, _, _ = torch.ops.sinkhorn_ops.sinkhorn_backward_unrolled(
        G, None, None, S, None, None, None, r.steps, 4, "row")
    assert ds.grad_fn is not None and "SinkhornOpsDoubleBackward" not in ds.grad_fn.name()
    assert gradcheck(lambda G, S: torch.ops.sinkhorn_ops.sinkhorn_backward_unrolled(
        G, None, None, S, None, None, None, r.steps, 4, "row")[0], (G, S))


# ---- torch.func compositions ----------------------------------------------------------------

_S = random_scores((2, 2, 3), seed=33)
_W = random_scores((2, 3), seed=34)
_U = random_scores((2, 3), seed=35)
COMPOSITIONS = {
    "vmap(hessian)": lambda f: func.vmap(func.hessian(f))(_S),
    "vmap(grad(grad))": lambda f: func.vmap(func.grad(lambda s: func.grad(f)(s).sin().sum()))(_S),
    "jacrev(jacrev)": lambda f: func.jacrev(func.jacrev(f))(_S[0]),
    "vjp(grad)": lambda f: func.vjp(func.grad(f), _S[0])[1](_W)[0],
    "jacrev(jacrev(jacrev))": lambda f: func.jacrev(func.jacrev(func.jacrev(f)))(_S[0]),
    "vmap(grad)": lambda f: func.vmap(func.grad(f))(_S),
}
# A node recorded inside a transform that has ended, run under a vmap or jvp still running
# around it: a clear error rather than a derivative that silently drops those levels.
UNSUPPORTED = {
    "vmap(jacrev(jacrev))": lambda f: func.vmap(func.jacrev(func.jacrev(f)))(_S),
    "vmap(vjp(grad))": lambda f: func.vmap(lambda s: func.vjp(func.grad(f), s)[1](_W)[0])(_S),
    "jvp(vjp_fn)": lambda f: func.jvp(lambda s: func.vjp(func.grad(f), s)[1](_W)[0],
                                      (_S[0],), (_U,))[1],
    "jacfwd(jacrev(jacrev))": lambda f: func.jacfwd(func.jacrev(func.jacrev(f)))(_S[0]),
}


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_func_compositions_match_the_reference(name):
    ours = lambda s: (so.sinkhorn(s, steps=3) * _W).sin().sum()  # noqa: E731
    ref = lambda s: (sinkhorn_reference(s, steps=3).plan * _W).sin().sum()  # noqa: E731
    got, want = COMPOSITIONS[name](ours), COMPOSITIONS[name](ref)
    assert want.abs().max() > 1e-4
    assert not got.requires_grad
    assert_close(got, want, atol=1e-12, rtol=1e-10, name=name)


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_func_compositions_through_ended_levels_are_clear_errors(name):
    ours = lambda s: (so.sinkhorn(s, steps=3) * _W).sin().sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match="SinkhornBackwardUnrolledBackward: this second "
                                                  "derivative needs"):
        UNSUPPORTED[name](ours)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0)])
def test_forward_mode_of_empty_problems_gives_zero_tangents(shape):
    S = torch.randn(shape, dtype=F64)
    with fwAD.dual_level():
        r = so.sinkhorn(fwAD.make_dual(S, torch.ones_like(S)), steps=4, return_potentials=True)
        plain = so.sinkhorn(S, steps=4, return_potentials=True)
        for name, x, y in zip(("plan", "f", "g"), (r.plan, r.f, r.g),
                              (plain.plan, plain.f, plain.g)):
            primal, tangent = fwAD.unpack_dual(x)
            assert primal.shape == y.shape and torch.equal(primal, y), name
            assert tangent is not None and tangent.shape == y.shape, name
            assert (tangent == 0).all(), name


# ---- the mHC paper's Sinkhorn ----------------------------------------------------------------

def _paper_reference(logits, iters):
    """mHC paper eq. 9 in the log domain (tests/test_mhc.py's sinkhorn_knopp_reference)."""
    log_m = logits
    for _ in range(iters):
        log_m = log_m - torch.logsumexp(log_m, dim=-2, keepdim=True)
        log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)
    return log_m.exp()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1.0, 40.0])  # 40: the kernel's log-domain twin
def test_mhc_sinkhorn_second_order_and_forward_mode(device, scale):
    op = torch.ops.sinkhorn_ops.mhc_sinkhorn
    x = (random_scores((3, 4, 4), seed=39, device=device) * scale).requires_grad_()
    assert gradgradcheck(lambda x: op(x, 3), (x,))
    assert gradcheck(lambda x: op(x, 3), (x,), check_forward_ad=True,
                     check_batched_forward_grad=True)
    x0 = random_scores((4, 4), seed=40, device=device) * scale
    W = weights((4, 4), 41, device)
    ours = lambda x: (so.mhc_sinkhorn(x, 5) * W).sin().sum()  # noqa: E731
    ref = lambda x: (_paper_reference(x, 5) * W).sin().sum()  # noqa: E731
    want = torch.autograd.functional.hessian(ref, x0)
    for name, got in [("func.hessian", func.hessian(ours)(x0)),
                      ("jacrev(jacrev)", func.jacrev(func.jacrev(ours))(x0)),
                      ("autograd hessian", torch.autograd.functional.hessian(ours, x0))]:
        assert_close(got, want, atol=1e-10, rtol=1e-9, name=name)


@pytest.mark.parametrize("device", DEVICES)
def test_mhc_sinkhorn_forward_mode_in_fp32(device):
    """The fp32 op's primal under forward mode (the ATen form) and its tangent, against the
    kernel and the float64 reference's jvp, within twice the fp32 reference's error."""
    x = random_scores((64, 4, 4), seed=42, device=device)
    t = random_scores((64, 4, 4), seed=43, device=device)
    _, truth = func.jvp(lambda x: _paper_reference(x, 20), (x,), (t,))
    _, lowp = func.jvp(lambda x: _paper_reference(x, 20), (x.float(),), (t.float(),))
    primal, got = func.jvp(lambda x: so.mhc_sinkhorn(x, 20), (x.float(),), (t.float(),))
    assert primal.dtype == torch.float32
    assert_close(primal, so.mhc_sinkhorn(x.float(), 20), atol=1e-6, rtol=0, name="primal")
    err = (got.double() - truth).abs().max().item()
    ref_err = (lowp.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, f"tangent error {err:.3e} > 2 x {ref_err:.3e}"


# ---- every mHC operator, and the mHC layer -----------------------------------------------------

def _mhc_cases(device):
    """(name, function of the differentiable inputs, inputs) for each mHC operator, float64,
    n = 3 streams of width 5 over 4 tokens, gates moved away from their init."""
    gen = torch.Generator().manual_seed(44)

    def r(*shape, positive=False):
        t = torch.rand(*shape, generator=gen, dtype=F64) if positive else torch.randn(
            *shape, generator=gen, dtype=F64)
        return t.to(device).requires_grad_()

    n, T, C = 3, 4, 5
    x, h, y, hr, L = r(T, n, C), r(T, n, positive=True), r(T, C), r(T, n, n, positive=True), r(T, n, n)
    proj, xs = r(T, 2 * n + n * n), r(T, n * C)
    w = [r(()) * 0.3 for _ in range(3)] + [r(n), r(n), r(n, n)]
    phi = [r(n * C, n), r(n * C, n), r(n * C, n * n)]
    ops = torch.ops.sinkhorn_ops
    cases = [
        ("mhc_sinkhorn", lambda L: ops.mhc_sinkhorn(L, 3), (L,)),
        ("mhc_v4_sinkhorn", lambda L: ops.mhc_v4_sinkhorn(L, 3, 1e-3), (L,)),
        ("mhc_pre_mix", lambda x, h: ops.mhc_pre_mix(x, h), (x, h)),
        ("mhc_post_mix", lambda *a: ops.mhc_post_mix(*a), (x, y, h, hr)),
    ]
    for v in ("paper", "v4"):
        cases.append((f"mhc_mappings {v}",
                      lambda p, *w, v=v: ops.mhc_mappings(p, *w, 3, 1e-3, v), (proj, *w)))
        cases.append((f"mhc_coefficients {v}",
                      lambda x, a, b, c, *w, v=v: ops.mhc_coefficients(
                          x, a, b, c, *w, 1e-6, 3, 1e-3, v)[:3], (xs, *phi, *w)))
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_every_mhc_operator_differentiates_twice_and_in_forward_mode(device):
    """Finite differences of the fused kernels' gradients (gradgradcheck) and of their outputs
    (forward mode, through the operators' ATen forms: so the forms compute what the kernels
    do)."""
    for name, fn, args in _mhc_cases(device):
        assert gradcheck(fn, args, check_forward_ad=True, check_backward_ad=False), name
        assert gradgradcheck(fn, args), name


@pytest.mark.parametrize("device", DEVICES)
def test_every_mhc_backward_in_forward_mode(device):
    """Forward over reverse through every mHC backward operator (its form carries the tangents):
    finite differences of its tangents (gradgradcheck's check_fwd_over_rev), and torch.func's
    hessian (jacfwd of jacrev) of a loss against jacrev of jacrev."""
    for name, fn, args in _mhc_cases(device):
        assert gradgradcheck(fn, args, check_fwd_over_rev=True, check_rev_over_rev=False,
                             check_undefined_grad=False), name
        argnums = tuple(range(len(args)))

        def loss(*a):
            out = fn(*a)
            return sum(o.sin().sum() for o in (out if isinstance(out, (tuple, list)) else (out,)))

        primals = [a.detach() for a in args]
        fr = func.hessian(loss, argnums=argnums)(*primals)
        rr = func.jacrev(func.jacrev(loss, argnums=argnums), argnums=argnums)(*primals)
        for i in argnums:
            for j in argnums:
                assert not fr[i][j].requires_grad, f"{name}: a graph leaked out of hessian"
                assert_close(fr[i][j], rr[i][j], atol=1e-12, rtol=1e-10,
                             name=f"{name} d2/d{i}d{j}")
        assert max(fr[i][j].abs().max().item() for i in argnums for j in argnums) > 1e-3, name


def test_mhc_backward_tangents_record_no_graph():
    """A backward operator called on dual tensors that require no grad returns results (and
    tangents) without a graph: the form's own gradients are taken without create_graph."""
    ops = torch.ops.sinkhorn_ops
    L, g = random_scores((3, 4, 4), seed=57), random_scores((3, 4, 4), seed=58)
    x, h, u = random_scores((3, 4, 5), seed=59), random_scores((3, 4), seed=60).sigmoid(), \
        random_scores((3, 5), seed=61)
    with fwAD.dual_level():
        # (dh_pre depends on x; dx does not: its tangent is None.)
        outs = [ops.mhc_v4_sinkhorn_backward(g, fwAD.make_dual(L, torch.ones_like(L)), 3, 1e-3),
                ops.mhc_pre_mix_backward(u, fwAD.make_dual(x, torch.ones_like(x)), h)[1]]
        for o in outs:
            primal, tangent = fwAD.unpack_dual(o)
            assert tangent is not None and not o.requires_grad and not tangent.requires_grad


@pytest.mark.parametrize("variant", ["paper", "v4"])
def test_mhc_layer_hessian_forward_over_reverse(variant):
    """torch.func.hessian (forward over reverse) of a loss of the whole layer in the streams,
    against the same of the float64 reference layer written in PyTorch ops."""
    from test_mhc import make_layer, make_streams, mhc_reference

    layer = make_layer(2, variant=variant, iters=3)
    x = make_streams(2, shape=(2,)).detach()
    W = torch.randn(x.shape, generator=torch.Generator().manual_seed(56), dtype=F64)
    ref_forward = lambda x: mhc_reference(layer, x, layer.branch, sinkhorn_dtype=F64)  # noqa: E731
    got = func.hessian(lambda x: (layer(x) * W).sin().sum())(x)
    want = func.hessian(lambda x: (ref_forward(x) * W).sin().sum())(x)
    assert want.abs().max() > 1e-3
    assert_close(got, want, atol=1e-10, rtol=1e-9, name="layer hessian")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["paper", "v4"])
def test_mhc_layer_second_order_and_jvp_match_the_reference(device, variant):
    """A Hessian-vector product (create_graph) of a loss of the whole layer, with respect to the
    streams and every parameter, and a jvp in the streams, against the same through the
    float64 reference layer written in PyTorch ops (tests/test_mhc.py)."""
    from test_mhc import make_layer, make_streams, mhc_reference

    layer = make_layer(3, variant=variant, iters=4).to(device)
    x = make_streams(3, device=device, shape=(4,))
    params = [p for _, p in layer.named_parameters()]
    W = torch.randn(x.shape, generator=torch.Generator().manual_seed(45), dtype=F64).to(device)

    def hvp(forward):
        inputs = [x, *params]
        loss = (forward(x) * W).sin().sum()
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        vs = [torch.ones_like(g) for g in grads]
        dot = sum((g * v).sum() for g, v in zip(grads, vs))
        return torch.autograd.grad(dot, inputs)

    ref_forward = lambda x: mhc_reference(layer, x, layer.branch, sinkhorn_dtype=F64)  # noqa: E731
    for i, (got, want) in enumerate(zip(hvp(layer), hvp(ref_forward))):
        assert_close(got, want, atol=1e-9, rtol=1e-8, name=f"hvp input {i}")
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(46), dtype=F64).to(device)
    _, got = func.jvp(lambda x: layer(x), (x.detach(),), (t,))
    _, want = func.jvp(ref_forward, (x.detach(),), (t,))
    assert_close(got, want, atol=1e-10, rtol=1e-9, name="jvp")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["paper", "v4"])
def test_mhc_layer_penalty_and_functional_apis(device, variant):
    """Inputs that depend on one another (the layer's x feeds the mixings together with the
    mappings computed from it): an R1-style gradient penalty on the parameters only, with
    create_graph, and torch.autograd.functional's jvp and hvp (double-backward tricks), against
    the float64 PyTorch layer. (A form that differentiated the saved inputs themselves counted
    the paths through x's history twice.)"""
    from test_mhc import make_layer, make_streams, mhc_reference

    layer = make_layer(3, variant=variant, iters=4).to(device)
    x = make_streams(3, device=device, shape=(4,))
    params = [p for _, p in layer.named_parameters()]
    W = torch.randn(x.shape, generator=torch.Generator().manual_seed(47), dtype=F64).to(device)
    ref_forward = lambda x: mhc_reference(layer, x, layer.branch, sinkhorn_dtype=F64)  # noqa: E731

    def penalty(forward):
        (g,) = torch.autograd.grad((forward(x) * W).sin().sum(), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), params, create_graph=True)

    for p, got, want in zip(dict(layer.named_parameters()), penalty(layer), penalty(ref_forward)):
        assert_close(got, want, atol=1e-10, rtol=1e-9, name=f"penalty gradient {p}")
    V = torch.randn(x.shape, generator=torch.Generator().manual_seed(48), dtype=F64).to(device)
    loss = lambda f: lambda x: (f(x) * W).sin().sum()  # noqa: E731
    x0 = x.detach()
    for name, api in [("jvp", torch.autograd.functional.jvp),
                      ("hvp", torch.autograd.functional.hvp)]:
        got = api(loss(layer), x0, V)[1]
        want = api(loss(ref_forward), x0, V)[1]
        assert_close(got, want, atol=1e-10, rtol=1e-9, name=name)


def test_mhc_mix_second_order_with_weights_that_depend_on_the_streams():
    """h_pre computed from x: the second derivative counts each path once, with and without
    create_graph."""
    x = random_scores((3, 4, 5), seed=49).requires_grad_()
    p = random_scores((5,), seed=50)
    u = random_scores((3, 5), seed=51)

    def second(mix, create_graph):
        h = torch.sigmoid((x * p).sum(-1))
        (g,) = torch.autograd.grad((mix(x, h) * u).sin().sum(), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), x, create_graph=create_graph)[0]

    ref = lambda x, h: (h.unsqueeze(-1) * x).sum(-2)  # noqa: E731
    for create_graph in (False, True):
        assert_close(second(so.mhc_branch_input, create_graph), second(ref, create_graph),
                     atol=1e-12, rtol=1e-10, name=f"create_graph={create_graph}")


@pytest.mark.parametrize("variant", ["paper", "v4"])
def test_mhc_mappings_forms_take_gates_of_any_one_value_shape(variant):
    """Gates of shape (1, 1) with a 1-D proj: the forms give the kernel's shapes (forward mode)
    and the double backward's gradients fit the inputs."""
    proj = random_scores((8,), seed=52).requires_grad_()
    w = [torch.full((1, 1), 0.3, dtype=F64) for _ in range(3)] + [
        random_scores((2,), seed=53), random_scores((2,), seed=54), random_scores((2, 2), seed=55)]
    run = lambda p: so.mhc_mappings(p, *w, 3, variant=variant)  # noqa: E731
    plain = run(proj.detach())
    _, tangents = func.jvp(run, (proj.detach(),), (torch.ones(8, dtype=F64),))
    assert [t.shape for t in tangents] == [t.shape for t in plain]
    (g,) = torch.autograd.grad(sum(o.sin().sum() for o in run(proj)), proj, create_graph=True)
    (h,) = torch.autograd.grad(g.square().sum(), proj)
    assert h.shape == proj.shape and torch.isfinite(h).all()
