"""The implicit backward (MATH.md section 2.2) on plans whose support is split or nearly split.

H = [[diag(r), P], [Pᵀ, diag(c)]] has a null direction (1, −1) per connected component of the
plan's support, not one. A block-diagonal mask splits the support; so does a peaked plan whose
small entries underflow (float32 below 1e-38). The gradient of such a problem is each
component's own: the upstream dL/df, dL/dg projected per component, dL/da and dL/db in each
component's min-norm gauge. And a Schur matrix that is singular to working precision must not
give NaN gradients from finite scores."""

import pytest
import torch
from conftest import (assert_close, generator, implicit_oracle, load_ops, random_scores,
                      run_python)

sinkhorn_ops = load_ops()
IMPLICIT = ["implicit", "implicit_dense", "implicit_cg"]
TIGHT_CG = {"cg_tol": 1e-12, "cg_max_iter": 2000}


def run_grads(S, a, b, W, u, v, **kwargs):
    """(dL/dS, dL/da, dL/db) of L = <W, P> + <u, f> + <v, g> (absent terms dropped)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (S, a, b)]
    out = sinkhorn_ops.sinkhorn(*leaves, return_potentials=True, **kwargs)
    loss = (out.plan.double() * W).sum()
    if u is not None:
        loss = loss + (out.f.double() * u).sum() + (out.g.double() * v).sum()
    present = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(loss, present, materialize_grads=True))
    return tuple(None if t is None else next(got) for t in leaves)


def block_problem(sizes, *, seed, device, scramble):
    """Scores on a block-diagonal support (blocks of the given square sizes), each block's
    marginals of equal mass, with the rows and columns optionally permuted at random (so that
    a component's rows and columns are not contiguous). Returns S, a, b, mask and, for each
    block, its row and column indices."""
    n = sum(sizes)
    gen = generator(seed)
    S = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    b = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    mask = torch.zeros(n, n, dtype=torch.bool)
    blocks, start = [], 0
    for size in sizes:
        idx = torch.arange(start, start + size)
        mask[start:start + size, start:start + size] = True
        b[idx] *= a[idx].sum() / b[idx].sum()
        blocks.append(idx)
        start += size
    rows = torch.randperm(n, generator=gen) if scramble else torch.arange(n)
    cols = torch.randperm(n, generator=gen) if scramble else torch.arange(n)
    inv_r, inv_c = torch.argsort(rows), torch.argsort(cols)
    S, mask, a, b = S[rows][:, cols], mask[rows][:, cols], a[rows], b[cols]
    blocks = [(inv_r[idx].sort().values, inv_c[idx].sort().values) for idx in blocks]
    to = lambda t: t.to(device)
    return to(S), to(a), to(b), to(mask), [(to(r), to(c)) for r, c in blocks]


def ring_mask(n, device):
    """The support (i, i), (i, i + 1 mod n): one cycle through all 2n rows and columns, a
    connected support of diameter n (the longest chains for label propagation)."""
    mask = torch.eye(n, dtype=torch.bool)
    return (mask | mask.roll(1, dims=1)).to(device)


@pytest.mark.parametrize("grad", IMPLICIT)
@pytest.mark.parametrize("scramble", [False, True], ids=["contiguous", "permuted"])
def test_block_diagonal_gradients_are_each_blocks_own(device, grad, scramble):
    """Upstream potentials that are not balanced per block: each block's dL/dS, dL/da and
    dL/db equal those of the block solved alone (its own projection and min-norm gauge)."""
    S, a, b, mask, blocks = block_problem([3, 5, 4], seed=3, device=device, scramble=scramble)
    n = S.shape[-1]
    gen = generator(9)
    W = torch.randn(n, n, generator=gen, dtype=torch.float64).to(device)
    u = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    v = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    kwargs = {"steps": 600, "grad": grad, **TIGHT_CG}
    gS, ga, gb = run_grads(S, a, b, W, u, v, mask=mask, **kwargs)
    assert bool((gS[~mask] == 0).all())
    for i, (r, c) in enumerate(blocks):
        sub = lambda t: t.index_select(0, r).index_select(1, c)
        want = run_grads(sub(S), a[r], b[c], sub(W), u[r], v[c], **kwargs)
        assert_close(sub(gS), want[0], atol=1e-9, rtol=1e-8, name=f"{grad} block {i} scores")
        assert_close(ga[r], want[1], atol=1e-9, rtol=1e-8, name=f"{grad} block {i} a")
        assert_close(gb[c], want[2], atol=1e-9, rtol=1e-8, name=f"{grad} block {i} b")


@pytest.mark.parametrize("grad", ["implicit_dense", "implicit_cg"])
def test_long_cycles_are_found(device, grad):
    """Two rings of 40 rows and columns each, rows and columns permuted: the components are
    two long cycles (the case that needs the most propagation), and each ring's gradients are
    its own."""
    n = 40
    mask = torch.block_diag(ring_mask(n, "cpu"), ring_mask(n, "cpu"))
    gen = generator(5)
    rows, cols = torch.randperm(2 * n, generator=gen), torch.randperm(2 * n, generator=gen)
    mask = mask[rows][:, cols].to(device)
    S = torch.randn(2 * n, 2 * n, generator=gen, dtype=torch.float64).to(device)
    W = torch.randn(2 * n, 2 * n, generator=gen, dtype=torch.float64).to(device)
    u = torch.randn(2 * n, generator=gen, dtype=torch.float64).to(device)
    v = torch.randn(2 * n, generator=gen, dtype=torch.float64).to(device)
    kwargs = {"steps": 400, "grad": grad, **TIGHT_CG}
    gS, _, _ = run_grads(S, None, None, W, u, v, mask=mask, **kwargs)
    inv_r, inv_c = torch.argsort(rows).to(device), torch.argsort(cols).to(device)
    for half in (slice(0, n), slice(n, 2 * n)):
        r, c = inv_r[half].sort().values, inv_c[half].sort().values
        sub = lambda t: t.index_select(0, r).index_select(1, c)
        want = run_grads(sub(S), None, None, sub(W), u[r], v[c], mask=sub(mask), **kwargs)[0]
        assert_close(sub(gS), want, atol=1e-9, rtol=1e-8, name=f"{grad} ring {half}")


@pytest.mark.parametrize("grad", IMPLICIT)
def test_forward_mode_on_a_block_diagonal_support(device, grad):
    """jvp through the converged map with tangents of a and b that are not balanced per block:
    each block's plan tangent is that of the block alone."""
    S, a, b, mask, blocks = block_problem([4, 3], seed=11, device=device, scramble=True)
    n = S.shape[-1]
    gen = generator(12)
    dS, da, db = (torch.randn(s, generator=gen, dtype=torch.float64).to(device)
                  for s in [(n, n), (n,), (n,)])
    kwargs = {"steps": 600, "grad": grad, **TIGHT_CG}

    def plan(S, a, b, mask):
        return sinkhorn_ops.sinkhorn(S, a, b, mask=mask, **kwargs)

    _, dP = torch.func.jvp(lambda S, a, b: plan(S, a, b, mask), (S, a, b), (dS, da, db))
    assert torch.isfinite(dP).all()
    for i, (r, c) in enumerate(blocks):
        sub = lambda t: t.index_select(0, r).index_select(1, c)
        _, want = torch.func.jvp(lambda S, a, b: plan(S, a, b, None), (sub(S), a[r], b[c]),
                                 (sub(dS), da[r], db[c]))
        assert_close(sub(dP), want, atol=1e-9, rtol=1e-8, name=f"{grad} block {i} tangent")


# Peaked plans: scores of standard deviation `scale` (an entropic OT at a small temperature).
# At these scales many entries of the converged plan underflow (float32 near 1e-38, float64
# near 1e-308) and others join blocks of the support only through such entries.
PEAKED = [(torch.float32, 30.0), (torch.float32, 100.0), (torch.float64, 300.0)]
PEAKED_ATOL = {torch.float32: 5e-6, torch.float64: 5e-7}


def oracle(P, W):
    """MATH.md section 2.2 in float64 by a dense pseudo-inverse of H, from the plan the operator
    returned (conftest.implicit_oracle). Eigenvalues of H below 1e-10 of the largest count as
    null: their directions come from entries near the underflow threshold, where float64's own
    rounding decides (the default cut, about 5e-15, moved the answer by 2e-3 at scale 300 while
    every solver here agreed to 1e-7 with this one)."""
    return implicit_oracle(P, W, rtol=1e-10)[0]


@pytest.mark.parametrize("grad", IMPLICIT)
@pytest.mark.parametrize("dtype,scale", PEAKED, ids=str)
def test_peaked_plans_give_finite_gradients(device, grad, dtype, scale):
    """The Schur matrix of a peaked plan is singular to working precision: finite gradients
    whose rows and columns sum to zero (MATH.md 2.2), close to a float64 pseudo-inverse of
    the same plan. Before the ridge, float32 at scale 30 gave NaN on the dense solve."""
    S = random_scores((8, 12, 12), scale=scale, seed=21, dtype=dtype, device=device)
    W = random_scores((8, 12, 12), seed=22, device=device)
    S.requires_grad_(True)
    P = sinkhorn_ops.sinkhorn(S, steps=1000, grad=grad, **TIGHT_CG)
    assert bool((P == 0).any()), "the case needs underflowed entries"
    (gS,) = torch.autograd.grad((P.double() * W).sum(), S)
    assert torch.isfinite(gS).all(), f"{grad} {dtype}: {gS}"
    tol = PEAKED_ATOL[dtype]
    for dim in (-1, -2):
        assert_close(gS.sum(dim).double(), torch.zeros_like(gS.sum(dim), dtype=torch.float64),
                     atol=tol, name=f"sums over {dim}")
    assert_close(gS.double(), oracle(P.detach(), W), atol=tol, name=f"{grad} against pinv")


def slow_tree(levels):
    """A tree support on which label propagation is slowest among those found: built so that
    each round merges only a Fibonacci fraction of the classes (about 1.44 log2(n + m) rounds).
    Its nodes alternate between rows and edge-columns: every column joins two rows. Returns the
    (n, m) mask."""
    rows, fresh, edges, order = ["x", "y"], ["u"], [("x", "u"), ("u", "y")], ["x", "y", "u"]
    for t in range(levels):
        grown = [("s", t, r) for r in rows]
        edges = [e for r in rows for e in [(r, ("s", t, r))]
                 + [(("s", t, r), q if p == r else p) for p, q in edges if r in (p, q)]]
        rows, fresh, order = rows + fresh, grown, order + grown
    index = {node: i for i, node in enumerate(order)}
    mask = torch.zeros(len(order), len(edges), dtype=torch.bool)
    for j, (p, q) in enumerate(edges):
        mask[index[p], j] = mask[index[q], j] = True
    return mask


@pytest.mark.parametrize("grad", ["implicit_dense", "implicit_cg"])
def test_the_slowest_support_found_is_split_right(device, grad):
    """A slow tree (233 rows, 232 columns: 13 rounds of propagation) beside a 2 x 2 block, with
    upstream potentials: the tree's gradients are its own. With log2(n + m) + 2 rounds its labels
    did not settle, the problem fell back to one component and dL/da was off by 2e11."""
    tree = slow_tree(9)
    n, m = tree.shape[0] + 2, tree.shape[1] + 2
    mask = torch.zeros(n, m, dtype=torch.bool)
    mask[:-2, :-2], mask[-2:, -2:] = tree, True
    gen = generator(31)
    P0 = torch.where(mask, torch.rand(n, m, generator=gen, dtype=torch.float64) + 0.5, 0.0)
    S, a, b = P0.log(), P0.sum(1), P0.sum(0)  # the fixed point is P0 itself
    W = torch.randn(n, m, generator=gen, dtype=torch.float64)
    u = torch.randn(n, generator=gen, dtype=torch.float64)
    v = torch.randn(m, generator=gen, dtype=torch.float64)
    to = lambda *ts: [t.to(device) for t in ts]
    S, a, b, mask, W, u, v = to(S, a, b, mask, W, u, v)
    kwargs = {"steps": 5, "grad": grad, **TIGHT_CG}
    gS, ga, gb = run_grads(S, a, b, W, u, v, mask=mask, **kwargs)
    r, c = slice(0, n - 2), slice(0, m - 2)
    want = run_grads(S[r, c], a[r], b[c], W[r, c], u[r], v[c], mask=mask[r, c], **kwargs)
    assert_close(gS[r, c], want[0], atol=1e-8, rtol=1e-8, name=f"{grad} tree scores")
    assert_close(ga[r], want[1], atol=1e-8, rtol=1e-8, name=f"{grad} tree a")
    assert_close(gb[c], want[2], atol=1e-8, rtol=1e-8, name=f"{grad} tree b")


@pytest.mark.parametrize("grad", ["implicit_dense", "implicit_cg"])
@pytest.mark.parametrize("with_potentials", [False, True], ids=["plan", "plan+potentials"])
def test_hessian_on_a_block_diagonal_support(device, grad, with_potentials):
    """Second order (reverse over reverse and torch.func.hessian) on a split support: the
    block's Hessian is the block's alone. The differentiable solve inverts the Schur matrix; with
    one rank-one term for the whole support it kept a null direction per extra block and lost
    about 1e-3 (float64)."""
    gen = generator(17)
    n, m = 4, 6
    S = torch.randn(n, m, generator=gen, dtype=torch.float64).to(device)
    W = torch.randn(n, m, generator=gen, dtype=torch.float64).to(device)
    mask = torch.zeros(n, m, dtype=torch.bool)
    mask[:2, :3] = mask[2:, 3:] = True
    mask = mask.to(device)

    def loss_of(mask, W):
        def loss(S):
            out = sinkhorn_ops.sinkhorn(S, mask=mask, steps=3000, grad=grad,
                                        return_potentials=True, **TIGHT_CG)
            value = (out.plan * W).sum() + (out.plan.square() * W).sum()
            if with_potentials:
                value = value + (out.f[..., :1] + out.g[..., :1]).square().sum()
            return value
        return loss

    full = loss_of(mask, W)
    alone = torch.autograd.functional.hessian(loss_of(None, W[:2, :3]), S[:2, :3])
    for name, H in [("reverse over reverse", torch.autograd.functional.hessian(full, S)),
                    ("torch.func.hessian", torch.func.hessian(full)(S))]:
        block = H[:2, :3, :2, :3]
        assert_close(block, alone, atol=1e-10, rtol=1e-8, name=f"{grad} {name}")
        assert H[:2, :3, 2:, 3:].abs().max() < 1e-12, f"{grad} {name}: the blocks interact"


def test_dense_solve_does_not_hang_on_two_threads():
    """torch 2.13's batched LU on the CPU (MKL getrf) hangs with two or more threads for sides
    from about 160 ("Parameter 6 was incorrect on entry to SLASWP"), torch.linalg.solve and
    torch.linalg.inv too; the dense solve (grad="implicit" up to 256) factors by Cholesky
    instead, first order and second (whose inverse hung until it did too). In a subprocess with
    a timeout, since the failure is a hang."""
    script = (
        "import torch, sinkhorn_ops\n"
        "torch.set_num_threads(2)\n"
        "S = torch.randn(4, 200, 200, requires_grad=True)\n"
        "P = sinkhorn_ops.sinkhorn(S, steps=50, grad='implicit')\n"
        "(P * torch.randn_like(P)).sum().backward()\n"
        "assert torch.isfinite(S.grad).all()\n"
        "S = torch.randn(2, 200, 200, dtype=torch.float64, requires_grad=True)\n"
        "P = sinkhorn_ops.sinkhorn(S, steps=50, grad='implicit')\n"
        "(g,) = torch.autograd.grad((P * torch.randn_like(P)).sum(), S, create_graph=True)\n"
        "(h,) = torch.autograd.grad((g * torch.randn_like(g)).sum(), S)\n"
        "assert torch.isfinite(h).all()\n"
        "print('ok')\n")
    out = run_python(script, timeout=120)
    if out is None:
        pytest.fail("the implicit first or second order at side 200 on two threads hung")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("side", [128, 129], ids=["lu", "cholesky"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_both_dense_factorisations(device, side, dtype):
    """The dense solve factors by LU up to side 128 and by Cholesky above: on each side of that
    boundary, a split support gives each block its own gradient, and a peaked plan a finite one
    that matches the float64 pseudo-inverse."""
    cut = side // 3
    mask = torch.zeros(2, side, side, dtype=torch.bool)
    mask[:, :cut, :cut] = mask[:, cut:, cut:] = True
    mask = mask.to(device)
    S = random_scores((2, side, side), seed=51, dtype=dtype, device=device)
    W = random_scores((2, side, side), seed=52, device=device)
    kwargs = {"steps": 300, "grad": "implicit_dense"}
    atol = PEAKED_ATOL[dtype]
    gS = run_grads(S, None, None, W, None, None, mask=mask, **kwargs)[0]
    for block in (slice(0, cut), slice(cut, side)):
        want = run_grads(S[:, block, block], None, None, W[:, block, block], None, None,
                         **kwargs)[0]
        assert_close(gS[:, block, block], want, atol=atol, rtol=1e-6, name=f"{side} {block}")
    peaked = (S * (30.0 if dtype == torch.float32 else 300.0)).requires_grad_(True)
    P = sinkhorn_ops.sinkhorn(peaked, steps=500, grad="implicit_dense")
    (g,) = torch.autograd.grad((P.double() * W).sum(), peaked)
    assert torch.isfinite(g).all()
    # The pseudo-inverse's own cut decides more near-null directions at this size: measured
    # 5e-7 (float64) and 5.5e-6 (float32) on both factorisations alike.
    assert_close(g.double(), oracle(P.detach(), W), atol=4 * atol, name=f"{side} peaked")


@pytest.mark.parametrize("side", [128, 129], ids=["lu", "cholesky"])
def test_second_order_on_both_dense_factorisations(device, side):
    """The differentiable dense solve inverts by LU up to side 128 and by Cholesky above. On both
    sides of the boundary, float64: the Hessian-vector product reverse over reverse matches the
    central difference of the first-order gradient, and forward over reverse (torch.func.jvp of
    torch.func.grad, one tangent and two under vmap) matches reverse over reverse. Forward-mode
    AD of cholesky_inverse under vmap disagrees with reverse mode in torch 2.13; the inverse
    must not use it."""
    S = random_scores((1, side, side), seed=61, dtype=torch.float64, device=device)
    W = random_scores((1, side, side), seed=62, dtype=torch.float64, device=device)
    V = random_scores((2, 1, side, side), seed=63, dtype=torch.float64, device=device)

    def loss(S):
        P = sinkhorn_ops.sinkhorn(S, steps=400, grad="implicit_dense")
        return (P * W).sum() + (P.square() * W).sum() * side

    def gradient(S, create_graph=False):
        S = S.detach().requires_grad_()
        return torch.autograd.grad(loss(S), S, create_graph=create_graph)[0], S

    g, leaf = gradient(S, create_graph=True)
    (hvp,) = torch.autograd.grad((g * V[0]).sum(), leaf, retain_graph=True)
    h = 1e-4
    central = (gradient(S + h * V[0])[0] - gradient(S - h * V[0])[0]) / (2 * h)
    assert_close(hvp, central, atol=1e-7 * central.abs().max(), rtol=0,
                 name=f"{side} central difference")
    _, forward = torch.func.jvp(torch.func.grad(loss), (S,), (V[0],))
    assert_close(forward, hvp, atol=1e-10 * hvp.abs().max(), rtol=0, name=f"{side} jvp of grad")
    batched = torch.func.vmap(lambda v: torch.func.jvp(torch.func.grad(loss), (S,), (v,))[1])(V)
    assert_close(batched[0], hvp, atol=1e-10 * hvp.abs().max(), rtol=0,
                 name=f"{side} vmap of jvp")
    (second,) = torch.autograd.grad((g * V[1]).sum(), leaf)
    assert_close(batched[1], second, atol=1e-10 * hvp.abs().max(), rtol=0,
                 name=f"{side} vmap of jvp, second tangent")
