"""torch.func and compiled autograd over the operators' C++ autograd (csrc/ops/autograd_node.h).

The operators record PyTorch-style autograd nodes, so torch.func's reverse-mode transforms (grad,
vjp, jacrev, and vmap of them, e.g. per-sample gradients) give the same gradients as
loss.backward(); nested transforms (second derivatives, forward over reverse) match the same
transforms of the reference; compositions autograd cannot see through raise a clear
NotImplementedError naming the operator; compiled autograd traces the nodes' backwards.
"""

import warnings

import pytest
import torch
from torch import func

import sinkhorn_ops as so
from sinkhorn_ops import nn as snn
from conftest import DEVICES

F64 = torch.float64


@pytest.fixture(autouse=True)
def _quiet_vmap_fallback():
    # PyTorch's per-sample fallback warns about speed (each test that cares asserts none ran).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        yield


def _autograd_grads(fn, *args):
    leaves = [a.detach().clone().requires_grad_() for a in args]
    return torch.autograd.grad(fn(*leaves), leaves)


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        assert w.abs().max() > 0  # a gradient that could be wrong


def _ot_problem(device, B=3, n=4, m=5):
    g = torch.Generator().manual_seed(0)
    S = torch.randn(B, n, m, dtype=F64, generator=g).to(device)
    a = torch.rand(B, n, dtype=F64, generator=g).to(device) + 0.5
    b = torch.rand(m, dtype=F64, generator=g).to(device) + 0.5
    b = b * a.sum(-1, keepdim=True) / b.sum()
    W = torch.randn(B, n, m, dtype=F64, generator=g).to(device)
    return S, a, b, W


@pytest.mark.parametrize("grad", ["unrolled", "implicit"])
@pytest.mark.parametrize("device", DEVICES)
def test_grad_and_vjp_match_backward(grad, device):
    S, a, b, W = _ot_problem(device)

    def loss(S, a, b):
        r = so.sinkhorn(S, a, b, steps=30, grad=grad, return_potentials=True)
        return (r.plan * W).sum() + r.f.square().sum() + r.g.sin().sum()

    want = _autograd_grads(loss, S, a, b)
    _assert_same(func.grad(loss, argnums=(0, 1, 2))(S, a, b), want)
    # b of shape (m,) broadcast over the batch: its gradient is summed back to (m,).
    assert want[2].shape == b.shape
    out, pullback = func.vjp(lambda S, a, b: so.sinkhorn(S, a, b, steps=30, grad=grad), S, a, b)
    torch.testing.assert_close(out, so.sinkhorn(S, a, b, steps=30))
    got = pullback(W)
    want = _autograd_grads(lambda S, a, b: (so.sinkhorn(S, a, b, steps=30, grad=grad) * W).sum(),
                           S, a, b)
    _assert_same(got, want)


def test_jacrev_matches_autograd_jacobian():
    S = torch.randn(3, 3, dtype=F64)
    f = lambda S: so.sinkhorn(S, steps=7)  # noqa: E731
    got = func.jacrev(f)(S)
    want = torch.autograd.functional.jacobian(f, S)
    assert got.shape == (3, 3, 3, 3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _fallbacks(fn, *args, namespace="sinkhorn_ops"):
    """fn(*args) and the operators (of `namespace`, or of any for "") that ran PyTorch's
    per-sample vmap fallback."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args)
    return out, {str(w.message).split("batching rule for ")[1].split(". ")[0]
                 for w in caught if f"batching rule for {namespace}" in str(w.message)}


@pytest.mark.parametrize("grad", ["unrolled", "implicit"])
@pytest.mark.parametrize("device", DEVICES)
def test_per_sample_gradients_with_vmap_of_grad(grad, device):
    S, a, b, W = _ot_problem(device, B=4)
    b = b[0]  # (m,), shared by the samples
    a = a * b.sum() / a.sum(-1, keepdim=True)

    def loss(S, a, W):  # one sample: a (n, m) problem, b shared
        r = so.sinkhorn(S, a, b, steps=10, grad=grad, return_potentials=True)
        return (r.plan * W).sum() + r.g.sin().sum()

    (got_s, got_a), fallbacks = _fallbacks(func.vmap(func.grad(loss, argnums=(0, 1))), S, a, W)
    assert not fallbacks  # one call of each operator for the batch, not one per sample
    for i in range(4):
        want = _autograd_grads(loss, S[i], a[i], W[i])
        torch.testing.assert_close(got_s[i], want[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_a[i], want[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_moves_and_broadcasts_the_vmapped_dimension(device):
    g = torch.Generator().manual_seed(4)
    S = torch.randn(2, 5, 3, 4, dtype=F64, generator=g)  # vmapped over dim 1 (5 samples)
    a = torch.rand(3, dtype=F64, generator=g) + 0.5  # not vmapped, broadcast over the batch
    b = torch.rand(5, 4, dtype=F64, generator=g) + 0.5  # vmapped over dim 0
    b = b * a.sum() / b.sum(-1, keepdim=True)
    S, a, b = S.to(device), a.to(device), b.to(device)
    f = lambda S, b: so.sinkhorn(S, a, b, steps=8, return_potentials=True)  # noqa: E731
    got, fallbacks = _fallbacks(func.vmap(f, in_dims=(1, 0)), S, b)
    assert not fallbacks
    for v in range(5):
        want = f(S[:, v], b[v])
        for x, w in zip(got, want):
            torch.testing.assert_close(x[v], w, rtol=1e-12, atol=1e-12)
    L = torch.randn(3, 6, 4, 4, dtype=F64, generator=g).to(device)
    x = torch.randn(6, 3, 4, 5, dtype=F64, generator=g).to(device)
    h = torch.rand(4, dtype=F64, generator=g).to(device)
    for fn, args, dims in [
        (lambda L: so.mhc_sinkhorn(L, 20), (L,), (1,)),
        (lambda L: so.mhc_v4_sinkhorn(L, 20), (L,), (1,)),
        (lambda x: so.mhc_branch_input(x, h), (x,), (0,)),
        (lambda x, L: so.mhc_combine(x, x[..., 0, :], h, L[0]), (x, L), (0, 1)),
    ]:
        got, fallbacks = _fallbacks(func.vmap(fn, in_dims=dims), *args)
        assert not fallbacks
        for v in range(6):
            want = fn(*(t.select(d, v) for t, d in zip(args, dims)))
            torch.testing.assert_close(got[v], want, rtol=1e-12, atol=1e-12)


def test_vmap_over_mhc_weights_runs_one_call_per_sample():
    # An ensemble: the shared weights vmapped (no single call can take them).
    torch.manual_seed(5)
    n, E = 4, 3
    proj = torch.randn(7, 2 * n + n * n, dtype=F64)
    weights = [torch.rand(E, dtype=F64), torch.rand(E, dtype=F64), torch.rand(E, dtype=F64),
               torch.randn(E, n, dtype=F64), torch.randn(E, n, dtype=F64),
               torch.randn(E, n, n, dtype=F64)]
    got = func.vmap(lambda *w: so.mhc_mappings(proj, *w))(*weights)
    for e in range(E):
        want = so.mhc_mappings(proj, *(w[e] for w in weights))
        for x, w in zip(got, want):
            torch.testing.assert_close(x[e], w, rtol=1e-12, atol=1e-12)


def test_per_sample_gradients_of_the_mhc_layer():
    torch.manual_seed(6)
    n, C = 4, 6
    layer = snn.ManifoldConstrainedHyperConnections(
        n, C, torch.nn.Linear(C, C, dtype=F64), alpha_init=0.3, dtype=F64)
    x = torch.randn(5, 3, n, C, dtype=F64)  # 5 samples of 3 tokens
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(params, x):
        return func.functional_call(layer, params, (x,)).sin().sum()

    got, fallbacks = _fallbacks(func.vmap(func.grad(loss), in_dims=(None, 0)), params, x)
    assert not fallbacks  # the weight gradients' own rules (sinkhorn_ops/_vmap_mhc_weights.py)
    for i in range(5):
        want = func.grad(loss)(params, x[i])
        for k in params:
            torch.testing.assert_close(got[k][i], want[k], rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("grad", ["unrolled", "implicit"])
def test_hessian_of_the_mhc_layer_runs_no_fallback(grad):
    """torch.func.hessian of the layer (the implicit Sinkhorn's layer runs rms_projection, whose
    backward vmaps inside jacrev): every operator and every op of the nodes' backwards batches,
    and the result is reverse over reverse's."""
    torch.manual_seed(8)
    layer = snn.ManifoldConstrainedHyperConnections(
        2, 3, torch.nn.Linear(3, 3, dtype=F64), alpha_init=0.3, dtype=F64, iters=30, grad=grad)
    x = torch.randn(2, 2, 3, dtype=F64)
    f = lambda x: layer(x).sin().sum()  # noqa: E731
    got, fallbacks = _fallbacks(func.hessian(f), x, namespace="")
    assert not fallbacks, fallbacks
    torch.testing.assert_close(got, torch.autograd.functional.hessian(f, x), rtol=1e-10,
                               atol=1e-12)


def test_gradient_of_per_sample_gradients_of_the_mhc_layer():
    """A transform around the weight gradients' vmap rules (the gradient of the per-sample
    gradients' squared norms, as a DP-style penalty takes it) against a loop over the samples:
    the rules recompute the coefficients' projections from x, which carries their history."""
    torch.manual_seed(7)
    n, C = 3, 4
    layer = snn.ManifoldConstrainedHyperConnections(
        n, C, torch.nn.Linear(C, C, dtype=F64), alpha_init=0.3, dtype=F64)
    x = torch.randn(4, 2, n, C, dtype=F64)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(params, x):
        return func.functional_call(layer, params, (x,)).sin().sum()

    def penalty(x, per_sample):
        grads = per_sample(x)
        return sum(g.square().sum() for g in grads.values())

    vmapped = lambda x: func.vmap(func.grad(loss), in_dims=(None, 0))(params, x)  # noqa: E731
    looped = lambda x: {k: torch.stack([func.grad(loss)(params, s)[k] for s in x])  # noqa: E731
                        for k in params}
    got = func.grad(penalty)(x, vmapped)
    want = func.grad(penalty)(x, looped)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["paper", "v4"])
def test_vmap_of_the_mhc_weight_gradients(variant):
    """The mappings' and coefficients' backwards under vmap (sums over each sample's tokens):
    one fused call, against one call per sample; absent upstream gradients, projections shared
    by the samples, every combination of the outputs asked for, and gates of shape (1, 1)."""
    g = torch.Generator().manual_seed(60)
    rnd = lambda *s: torch.randn(*s, dtype=F64, generator=g)  # noqa: E731
    ops = torch.ops.sinkhorn_ops
    n, T, C, V = 3, 4, 5, 6
    w = [torch.full((1, 1), 0.3, dtype=F64), torch.tensor(-0.2, dtype=F64),
         torch.tensor(0.5, dtype=F64), rnd(n), rnd(n), rnd(n, n)]
    grads = [rnd(V, T, n), rnd(V, T, n), rnd(V, T, n, n)]
    proj = rnd(V, T, 2 * n + n * n)

    def check(fn, args, in_dims):
        got, fallbacks = _fallbacks(func.vmap(fn, in_dims=in_dims), *args)
        assert not fallbacks
        for v in range(V):
            want = fn(*(a.select(d, v) if d is not None else a for a, d in zip(args, in_dims)))
            for x, y in zip(got, want):
                assert y.numel() == 0 or y.abs().max() > 1e-3
                torch.testing.assert_close(x[v], y, rtol=1e-11, atol=1e-12)

    mappings = lambda gp, gq, gr, p: ops.mhc_mappings_backward(gp, gq, gr, p, *w, 3, 1e-3,  # noqa: E731
                                                               variant)
    check(mappings, (*grads, proj), (0, 0, 0, 0))
    check(lambda gr, p: mappings(None, None, gr, p), (grads[2], proj), (0, 0))
    check(mappings, (*grads, proj[0]), (0, 0, 0, None))  # jacrev-like: proj shared
    x = rnd(V, T, n * C)
    phi = [rnd(n * C, n), rnd(n * C, n), rnd(n * C, n * n)]
    _, _, _, raw, norm = ops.mhc_coefficients(x, *phi, *w, 1e-6, 3, 1e-3, variant)
    for flags in [(True, True, True), (True, False, True), (False, True, False),
                  (False, False, True)]:
        def coefficients(gp, gq, gr, x, raw, norm, flags=flags):
            return ops.mhc_coefficients_backward(gp, gq, gr, x, *phi, raw, norm, *w, 1e-6, 3,
                                                 1e-3, variant, *flags)
        check(coefficients, (*grads, x, raw, norm), (0,) * 6)
    check(lambda gp, x, raw, norm: ops.mhc_coefficients_backward(
        gp, None, None, x, *phi, raw, norm, *w, 1e-6, 3, 1e-3, variant), (grads[0], x, raw, norm),
        (0, 0, 0, 0))
    # A gate without upstream gradient gets exact zeros, even over non-finite projections.
    bad = proj.clone()
    bad[..., :n] = float("inf")
    got = func.vmap(lambda gr, p: mappings(None, None, gr, p))(grads[2], bad)
    assert torch.isfinite(got[1]).all() and (got[1][:, [0, 3, 4, 5]] == 0).all()
    # An ensemble (vmapped weights and phi): one call per sample, by the rules themselves.
    ws = [t.expand(V, *t.shape) * (1 + 0.1 * rnd(V).view(-1, *[1] * t.dim())) for t in w]
    check(lambda p, *ws: ops.mhc_mappings_backward(*(t[0] for t in grads), p, *ws, 3, 1e-3,
                                                   variant), (proj[0], *ws), (None,) + (0,) * 6)
    phis = [p.expand(V, *p.shape) + 0.1 * rnd(V, *p.shape) for p in phi]
    check(lambda *a: ops.mhc_coefficients_backward(
        *(t[0] for t in grads), x[0], *a[:3], raw[0], norm[0], *a[3:], 1e-6, 3, 1e-3, variant,
        True, False), (*phis, *ws), (0,) * 9)


@pytest.mark.parametrize("device", DEVICES)
def test_mhc_operators_under_grad(device):
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, dtype=F64, generator=g).to(device)  # noqa: E731
    n, C, T = 4, 3, 5
    L, Wh = rnd(T, n, n), rnd(T, n, n)
    x, h_pre, y, h_post, h_res = rnd(T, n, C), rnd(T, n), rnd(T, C), rnd(T, n), rnd(T, n, n)
    cases = {
        "mhc_sinkhorn": (lambda L: (so.mhc_sinkhorn(L, 20) * Wh).sum(), (L,)),
        "mhc_v4_sinkhorn": (lambda L: (so.mhc_v4_sinkhorn(L, 20) * Wh).sum(), (L,)),
        "mhc_branch_input": (lambda x, h: so.mhc_branch_input(x, h).sin().sum(), (x, h_pre)),
        "mhc_combine": (lambda x, y, hp, hr: so.mhc_combine(x, y, hp, hr).sin().sum(),
                        (x, y, h_post, h_res)),
    }
    for name, (fn, args) in cases.items():
        argnums = tuple(range(len(args)))
        _assert_same(func.grad(fn, argnums=argnums)(*args), _autograd_grads(fn, *args))


@pytest.mark.parametrize("variant", ["paper", "v4"])
def test_mhc_layer_parameters_under_functional_call(variant):
    torch.manual_seed(2)
    n, C = 4, 6
    layer = snn.ManifoldConstrainedHyperConnections(
        n, C, torch.nn.Linear(C, C, dtype=F64), variant=variant, alpha_init=0.3, dtype=F64)
    x = torch.randn(7, n, C, dtype=F64)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(params, x):
        return func.functional_call(layer, params, (x,)).sin().sum()

    got_p, got_x = func.grad(loss, argnums=(0, 1))(params, x)
    x_leaf = x.clone().requires_grad_()
    layer.zero_grad()
    loss(dict(layer.named_parameters()), x_leaf).backward()
    for k, p in layer.named_parameters():
        torch.testing.assert_close(got_p[k], p.grad, rtol=1e-12, atol=1e-12, msg=k)
    torch.testing.assert_close(got_x, x_leaf.grad, rtol=1e-12, atol=1e-12)
    # The mappings' fused node (not the composite) ran under the transform.
    assert "Coefficients" in layer.mappings(x_leaf).res.grad_fn.name()


def test_rms_projection_differentiates_twice_under_func():
    x = torch.randn(3, 8, dtype=F64)
    phi = torch.randn(8, 5, dtype=F64)
    op = torch.ops.sinkhorn_ops.rms_projection
    f = lambda x: op(x, phi, 1e-6).sin().sum()  # noqa: E731
    got = func.hessian(f)(x[0:1])
    want = torch.autograd.functional.hessian(f, x[0:1])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_sinkhorn_differentiates_twice_under_func():
    """Nested torch.func transforms through the operator, against the same transforms of the
    float64 reference (plain PyTorch): grad of grad, vjp of grad, jacrev of jacrev (vmap over
    the inner vjps) and jacfwd of jacrev."""
    from sinkhorn_ops.reference import sinkhorn_reference

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(12, dtype=F64, generator=gen)
    W = torch.randn(2, 2, 3, dtype=F64, generator=gen) * 3
    ours = lambda t: (so.sinkhorn(t.view(2, 2, 3), steps=3) * W).sin().sum()  # noqa: E731
    ref = lambda t: (sinkhorn_reference(t.view(2, 2, 3), steps=3).plan * W).sin().sum()  # noqa: E731
    e = torch.randn(12, dtype=F64, generator=gen)
    for name, transform in [
        ("grad of grad", lambda f: func.grad(lambda t: func.grad(f)(t).sin().sum())(t)),
        ("vjp of grad", lambda f: func.vjp(func.grad(f), t)[1](e)[0]),
        ("jacrev of jacrev", lambda f: func.jacrev(func.jacrev(f))(t)),
        ("jacfwd of jacrev", lambda f: func.jacfwd(func.jacrev(f))(t)),
    ]:
        got, want = transform(ours), transform(ref)
        assert want.abs().max() > 1e-3, name
        assert not got.requires_grad, f"{name}: a graph leaked out of the transform"
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=name)


def test_forward_over_reverse_of_an_mhc_backward():
    """jacfwd of jacrev (torch.func.hessian) through the V4 Sinkhorn: its backward's ATen form
    carries the tangents; it agrees with reverse over reverse (more in test_second_order.py)."""
    t = torch.randn(8, dtype=F64)
    fn = lambda t: so.mhc_v4_sinkhorn(t.view(2, 2, 2), 3).sin().sum()  # noqa: E731
    fr = func.hessian(fn)(t)
    rr = func.jacrev(func.jacrev(fn))(t)
    assert rr.abs().max() > 1e-3
    torch.testing.assert_close(fr, rr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rr, torch.autograd.functional.hessian(fn, t))


def test_saved_variables_behave_like_pytorchs():
    S = torch.randn(2, 3, 3, dtype=F64, requires_grad=True)
    for grad in ("unrolled", "implicit"):
        P = so.sinkhorn(S, steps=5, grad=grad)
        assert P.grad_fn.name() == "SinkhornBackward"
        P.sum().backward(retain_graph=True)
        P.sum().backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            P.sum().backward()
    # Saved-tensor hooks see the saved variables (the implicit mode saves its output, the plan).
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        P = so.sinkhorn(S, steps=5, grad="implicit")
        H = so.mhc_sinkhorn(S, 5)
    assert packed == [S.shape, S.shape]
    (g_p,) = torch.autograd.grad((P * H).sum(), S)
    assert torch.isfinite(g_p).all()
    # An in-place change of a saved input (unrolled) or of the saved plan (implicit) is caught.
    for grad, change in (("unrolled", "input"), ("implicit", "output")):
        X = S * 1.0
        P = so.sinkhorn(X, steps=5, grad=grad)
        (X if change == "input" else P).mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            P.sum().backward()
    # Without a leaf that requires grad, or under no_grad, nothing is recorded.
    assert so.sinkhorn(S.detach(), steps=5).grad_fn is None
    with torch.no_grad():
        assert so.mhc_sinkhorn(S, 5).grad_fn is None


@pytest.mark.parametrize("grad", ["unrolled", "implicit"])
def test_compiled_autograd_traces_the_nodes(grad):
    torch._dynamo.reset()
    S, a, b, W = _ot_problem("cpu")
    L = torch.randn(5, 4, 4, dtype=F64)
    torch.manual_seed(3)
    layer = snn.ManifoldConstrainedHyperConnections(4, 6, torch.nn.Linear(6, 6, dtype=F64),
                                                    alpha_init=0.3, dtype=F64)
    x = torch.randn(5, 4, 6, dtype=F64)
    phi = torch.randn(6, 3, dtype=F64)

    def step(S, a, b, L, x):
        r = so.sinkhorn(S, a, b, steps=10, return_potentials=True, grad=grad)
        loss = (r.plan * W).sum() + r.f.sum() + (so.mhc_sinkhorn(L, 10) * L).sum()
        loss = loss + (so.mhc_v4_sinkhorn(L, 10) * L).sum() + layer(x).sin().sum()
        loss = loss + torch.ops.sinkhorn_ops.rms_projection(x[:, 0], phi, 1e-6).sin().sum()
        loss.backward()

    def run():
        layer.zero_grad()
        leaves = [t.clone().requires_grad_() for t in (S, a, b, L, x)]
        step(*leaves)
        return [t.grad for t in leaves] + [p.grad.clone() for p in layer.parameters()]

    want = run()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
        got = run()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


def test_vmap_and_per_sample_gradients_under_torch_compile():
    torch._dynamo.reset()
    S = torch.randn(5, 3, 4)
    fwd = func.vmap(lambda s: so.sinkhorn(s, steps=5))
    torch.testing.assert_close(torch.compile(fwd, fullgraph=True)(S), fwd(S))
    L = torch.randn(5, 2, 4, 4)
    per_sample = func.vmap(func.grad(lambda l: so.mhc_sinkhorn(l, 20).sin().sum()))
    torch.testing.assert_close(torch.compile(per_sample)(L), per_sample(L))
    torch._dynamo.reset()


@pytest.mark.parametrize("grad", ["unrolled", "implicit"])
def test_sinkhorn_attention_parameters_under_functional_call(grad):
    torch.manual_seed(9)
    attn = snn.SinkhornMultiheadAttention(8, 2, batch_first=True, dtype=F64, steps=4, grad=grad)
    x = torch.randn(3, 5, 8, dtype=F64)
    params = {k: v.detach() for k, v in attn.named_parameters()}

    def loss(params, x):
        return func.functional_call(attn, params, (x, x, x))[0].sin().sum()

    got = func.grad(loss)(params, x)
    attn.zero_grad()
    loss(dict(attn.named_parameters()), x).backward()
    for k, p in attn.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-12, atol=1e-12, msg=k)
    # Per-sample gradients: one sequence at a time.
    per_sample = func.vmap(func.grad(lambda p, x: loss(p, x[None])), in_dims=(None, 0))(params, x)
    for k in params:
        torch.testing.assert_close(per_sample[k].sum(0), got[k], rtol=1e-10, atol=1e-12, msg=k)


def test_compiled_autograd_ignores_hooks_active_only_during_backward():
    # Saved-tensor hooks around backward() alone pack nothing in eager mode; compiled autograd's
    # functional form of a node must not pack its saved tensors through them either.
    torch._dynamo.reset()
    L = torch.randn(3, 4, 4, dtype=F64)
    W = torch.randn(4, 4, dtype=F64)
    packed = []

    def pack(t):
        packed.append(t.dtype)
        return t.to(torch.bfloat16)

    def run(compiled):
        leaf = L.clone().requires_grad_()
        loss = (so.mhc_sinkhorn(leaf, 5) * W).sum() + so.sinkhorn(leaf, steps=4).sin().sum()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t.to(F64)):
            if compiled:
                with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager")):
                    loss.backward()
            else:
                loss.backward()
        return leaf.grad

    want = run(False)
    for _ in range(2):  # a cache miss, then a hit
        torch.testing.assert_close(run(True), want, rtol=1e-12, atol=1e-12)
    assert packed == []
    torch._dynamo.reset()
