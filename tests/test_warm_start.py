"""Warm starts (sinkhorn(..., init=(f0, g0)), MATH.md section 1: "start from f = g = 0 (or a warm
start)"): against the float64 reference started from the same potentials, continuation of a run,
early stopping from converged potentials, low precision, gradients, bad arguments and
torch.compile."""
import pytest
import torch
from conftest import DEVICES

import sinkhorn_ops as so
from sinkhorn_ops.reference import sinkhorn_reference

F64 = torch.float64


def _problem(device, B=3, n=5, m=4, seed=0, masked=False, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(B, n, m, dtype=F64, generator=g) * 2
    mask = None
    if masked:  # problem 0: its last row and first column masked entirely
        mask = torch.ones(B, n, m, dtype=torch.bool)
        mask[0, -1, :] = False
        mask[0, :, 0] = False
        mask[1, 1, 2] = False
    f0 = torch.randn(B, n, dtype=F64, generator=g)
    g0 = torch.randn(m, dtype=F64, generator=g)  # broadcast over the batch
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(S.to(dtype)), to(mask), to(f0), to(g0)


def _close(got, want, tol=1e-11):
    for name in ("plan", "f", "g", "error"):
        torch.testing.assert_close(getattr(got, name).double().cpu(),
                                   getattr(want, name).double().cpu(), rtol=tol, atol=tol,
                                   msg=name)
    assert torch.equal(got.steps.cpu(), want.steps.cpu())


@pytest.mark.parametrize("start", ["row", "col"])
@pytest.mark.parametrize("steps, tol", [(0, 0.0), (1, 0.0), (2, 0.0), (7, 0.0), (60, 1e-6)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("which", ["both", "f0", "g0"])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_the_reference_started_there(device, which, masked, steps, tol, start):
    S, mask, f0, g0 = _problem(device, masked=masked)
    init = (f0 if which != "g0" else None, g0 if which != "f0" else None)
    got = so.sinkhorn(S, mask=mask, steps=steps, start=start, tol=tol, init=init,
                      return_potentials=True)
    want = sinkhorn_reference(S.cpu(), mask=None if mask is None else mask.cpu(), steps=steps,
                              start=start, tol=tol,
                              init=tuple(None if x is None else x.cpu() for x in init))
    _close(got, want)


@pytest.mark.parametrize("start", ["row", "col"])
@pytest.mark.parametrize("first", [3, 4])
@pytest.mark.parametrize("device", DEVICES)
def test_continues_a_run(device, first, start):
    S, _, _, _ = _problem(device, seed=1)
    a = torch.rand(3, 5, dtype=F64, device=device) + 0.5
    b = torch.rand(3, 4, dtype=F64, device=device) + 0.5
    b = b * a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True)
    whole = so.sinkhorn(S, a, b, steps=first + 5, start=start, return_potentials=True)
    head = so.sinkhorn(S, a, b, steps=first, start=start, return_potentials=True)
    flipped = start if first % 2 == 0 else {"row": "col", "col": "row"}[start]
    tail = so.sinkhorn(S, a, b, steps=5, start=flipped, init=(head.f, head.g),
                       return_potentials=True)
    for name in ("plan", "f", "g", "error"):
        torch.testing.assert_close(getattr(tail, name), getattr(whole, name), rtol=1e-12,
                                   atol=1e-12, msg=name)


def test_converged_potentials_stop_at_once():
    S, _, _, _ = _problem("cpu", seed=2)
    done = so.sinkhorn(S, steps=2000, tol=1e-9, return_potentials=True)
    assert bool((done.steps < 2000).all())
    again = so.sinkhorn(S, steps=2000, tol=1e-8, init=(done.f, done.g), return_potentials=True)
    assert torch.equal(again.steps, torch.ones_like(again.steps))  # stops before step 1
    torch.testing.assert_close(again.plan, done.plan, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_within_twice_the_references_error(device, dtype):
    S, _, f0, g0 = _problem(device, B=4, n=6, m=6, seed=3)
    truth = sinkhorn_reference(S.cpu(), steps=9, init=(f0.cpu(), g0.cpu()))
    low = S.to(dtype)
    got = so.sinkhorn(low, steps=9, init=(f0.to(dtype), g0), return_potentials=True)
    ref = sinkhorn_reference(low.cpu(), steps=9, init=(f0.to(dtype).cpu(), g0.cpu()))
    assert got.plan.dtype == dtype and got.f.dtype == torch.float32
    for name in ("plan", "f", "g"):
        ours = (getattr(got, name).double().cpu() - getattr(truth, name)).abs().max()
        theirs = (getattr(ref, name).double() - getattr(truth, name)).abs().max()
        assert ours <= 2 * theirs + 1e-6, (name, float(ours), float(theirs))


@pytest.mark.parametrize("grad", ["unrolled", "implicit"])
def test_gradients_of_scores_and_initial_potentials(grad):
    S, _, f0, g0 = _problem("cpu", B=2, n=3, m=3, seed=4)
    args = [t.clone().requires_grad_() for t in (S, f0, g0)]

    def fn(S, f0, g0):
        r = so.sinkhorn(S, steps=6, init=(f0, g0), grad=grad, return_potentials=True)
        return r.plan, r.f, r.g

    if grad == "unrolled":
        assert torch.autograd.gradcheck(fn, args)
    else:  # the fixed point does not depend on where it started: finite, and S's only
        plan = so.sinkhorn(args[0], steps=400, init=(args[1], args[2]), grad=grad)
        gs, gf, gg = torch.autograd.grad((plan * torch.randn_like(plan)).sum(), args)
        assert torch.isfinite(gs).all()
        assert gf.abs().max() < 1e-6 and gg.abs().max() < 1e-6


def test_bad_init_is_a_clear_error():
    S, _, f0, g0 = _problem("cpu")
    cases = [
        ((f0,), TypeError, "expected init to be a pair .* got a tuple of length 1"),
        ((f0.tolist(), None), TypeError, "expected init's f0 to be a torch.Tensor"),
        ((None, g0.long()), TypeError, "expected init's g0 of a floating dtype, got Long"),
        ((f0[:, :2], None), ValueError, r"expected init's f0 broadcastable to \[3, 5\], got "
                                        r"\[3, 2\]"),
        ((None, torch.zeros(2, 3, 4, dtype=F64)), ValueError, "g0 broadcastable"),
    ]
    for init, error, match in cases:
        with pytest.raises(error, match=match):
            so.sinkhorn(S, steps=3, init=init)
    # The operator's own dtype rules, on the scores and marginals as they came.
    with pytest.raises(TypeError, match="sinkhorn: expected scores of dtype"):
        so.sinkhorn(S.long(), steps=3, init=(f0, g0))
    with pytest.raises(TypeError, match=r"expected a of dtype BFloat16 or Float "
                                        r"\(the scores dtype or its accumulation dtype\), got "
                                        r"Half"):
        so.sinkhorn(S.bfloat16(), torch.ones(3, 5, dtype=torch.float16),
                    torch.full((4,), 1.25), steps=3, init=(f0, g0))
    bad = f0.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="expected init's f0 finite, got 1 non-finite"):
        so.sinkhorn(S, steps=3, init=(bad, None), validate=True)


def test_torch_compile_fullgraph_dynamic():
    torch._dynamo.reset()
    fn = lambda S, f0, g0: so.sinkhorn(S, steps=5, init=(f0, g0), return_potentials=True)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for seed, (B, n, m) in enumerate([(3, 5, 4), (2, 6, 3)]):
        S, _, f0, g0 = _problem("cpu", B=B, n=n, m=m, seed=seed)
        got, want = compiled(S, f0, g0), fn(S, f0, g0)
        for x, w in zip(got, want):
            torch.testing.assert_close(x, w, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


def test_nan_scores_spoil_their_problem_as_without_init():
    S, mask, f0, g0 = _problem("cpu", masked=True)
    S = S.clone()
    S[0, 1, 1] = float("nan")  # problem 0 also has an empty row and column
    plain = so.sinkhorn(S, mask=mask, steps=4, return_potentials=True)
    warm = so.sinkhorn(S, mask=mask, steps=4, init=(torch.zeros_like(f0), torch.zeros_like(g0)),
                       return_potentials=True)
    for name in ("plan", "f", "g"):
        torch.testing.assert_close(getattr(warm, name), getattr(plain, name), equal_nan=True,
                                   rtol=0, atol=0, msg=name)
    assert torch.isnan(warm.f[0]).all() and torch.isfinite(warm.f[1:]).all()
