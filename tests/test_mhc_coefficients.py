"""mHC's fused coefficients (torch.ops.sinkhorn_ops.mhc_coefficients, sinkhorn_ops.mhc_coefficients):
the mappings of RMSNorm(x) [φ_pre | φ_post | φ_res] with the norm's statistic folded into the
mappings kernel, against RMSNorm written out here and test_mhc_mappings' per-token reference,
forward and the gradients of x, of each φ and of every weight, in float64, fp32 and with bf16
streams, zero tokens, unused outputs, bad arguments, opcheck, autocast, torch.compile, and the
layer's use of it."""
import pytest
import torch
from conftest import DEVICES, load_ops
from test_mhc import make_layer, make_streams
from test_mhc_mappings import EPS, reference as mappings_reference, worst

ops = load_ops()

NORM_EPS = 1e-6
PHIS = ("phi_pre", "phi_post", "phi_res")


def reference(x, phis, weights, iters, variant, norm_eps=NORM_EPS):
    """RMSNorm(x) φ (no gain) then the mappings, in phi's dtype."""
    x = x.to(phis[0].dtype)
    proj = (x @ torch.cat(phis, dim=-1)) * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps)
    return mappings_reference(proj, weights, iters, variant)


def make_case(n, batch=(3, 7), C=5, *, dtype=torch.float64, x_dtype=None, device="cpu", seed=0,
              scale=1.0):
    """x ~ scale N(0, 1) of shape (*batch, nC), φ ~ N(0, 1/nC) and the six weights (gates away
    from 0, random biases); float64 draws cast to dtype (x to x_dtype)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    D = n * C
    x = rnd(*batch, D) * scale
    phis = [rnd(D, n) / D ** 0.5, rnd(D, n) / D ** 0.5, rnd(D, n * n) / D ** 0.5]
    weights = [torch.tensor(v, dtype=torch.float64) for v in (0.7, -0.4, 1.3)]
    weights += [rnd(n), rnd(n), rnd(n, n) + 2 * torch.eye(n)]
    cast = lambda t, dt: t.to(device=device, dtype=dt).requires_grad_(True)
    return (cast(x, x_dtype or dtype), [cast(p, dtype) for p in phis],
            [cast(w, dtype) for w in weights])


def fused(iters=20, variant="paper"):
    return lambda x, p, w: ops.mhc_coefficients(x, *p, *w, iters, variant=variant, eps=EPS)


def composite(iters=20, variant="paper"):
    return lambda x, p, w: reference(x, p, w, iters, variant)


def outputs_and_grads(fn, x, phis, weights, seed=5):
    """fn's three outputs and the gradients of x, the φ and the weights of a random linear
    loss."""
    out = fn(x, phis, weights)
    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in out]
    grads = torch.autograd.grad(out, [x, *phis, *weights], upstream)
    return [o.detach() for o in out], list(grads)


@pytest.mark.parametrize("variant", ["paper", "v4"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("device", DEVICES)
def test_float64_forward_and_every_gradient(n, variant, device):
    case = make_case(n, device=device)
    got = outputs_and_grads(fused(20, variant), *case)
    want = outputs_and_grads(composite(20, variant), *case)
    assert worst(got[0], want[0]) < 1e-12
    assert worst(got[1], want[1]) < 1e-10
    x, phis, _ = case
    assert got[1][0].shape == x.shape and [g.shape for g in got[1][1:4]] == [p.shape for p in phis]


@pytest.mark.parametrize("variant", ["paper", "v4"])
@pytest.mark.parametrize("device", DEVICES)
def test_float32_within_twice_torchs_error(variant, device):
    """fp32: the error against float64 truth is at most twice that of the same formulas run in
    fp32 by PyTorch (+ a small absolute floor)."""
    kw = dict(batch=(150,), C=64, scale=3.0)
    truth = outputs_and_grads(composite(20, variant), *make_case(4, **kw))
    case32 = make_case(4, dtype=torch.float32, device=device, **kw)
    ours = outputs_and_grads(fused(20, variant), *case32)
    torchs = outputs_and_grads(composite(20, variant), *case32)
    for part in (0, 1):
        for k, (got, base, want) in enumerate(zip(ours[part], torchs[part], truth[part])):
            ours_err = (got.double().cpu() - want).abs().max().item()
            torch_err = (base.double().cpu() - want).abs().max().item()
            assert ours_err <= 2 * torch_err + 1e-6 * max(want.abs().max().item(), 1), (
                part, k, ours_err, torch_err)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_streams_compute_in_fp32(device):
    """bf16 x with fp32 φ: everything runs in fp32 on x's values (the reference on x.float()),
    dL/dx comes back in bf16, and no fp32 copy of x is saved."""
    x, phis, weights = make_case(4, C=32, dtype=torch.float32, x_dtype=torch.bfloat16,
                                 device=device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = outputs_and_grads(fused(), x, phis, weights)
    assert not [t.shape for t in saved if t.dtype == torch.float32 and t.numel() >= x.numel()]
    xf = x.detach().float().requires_grad_(True)
    want = outputs_and_grads(composite(), xf, phis, weights)
    assert all(o.dtype == torch.float32 for o in got[0])
    assert got[1][0].dtype == torch.bfloat16
    assert worst(got[0], want[0]) < 1e-5
    for k, (g, w) in enumerate(zip(got[1], want[1])):
        w = w.to(g.dtype) if k == 0 else w  # dL/dx rounds to bf16
        torch.testing.assert_close(g, w, rtol=1e-2 if k == 0 else 1e-4, atol=1e-5, msg=str(k))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens_are_finite(device):
    """A token whose streams are all zeros (mean(x²) = 0, r = norm_eps^(-1/2)): its projections
    are 0 and every output and gradient stays finite and equal to the reference's."""
    x, phis, weights = make_case(3, batch=(6,), device=device)
    with torch.no_grad():
        x[2] = 0
        x[4, ::2] = 0
    got = outputs_and_grads(fused(), x, phis, weights)
    want = outputs_and_grads(composite(), x, phis, weights)
    assert all(torch.isfinite(t).all() for t in got[0] + got[1])
    assert worst(got[0], want[0]) < 1e-12 and worst(got[1], want[1]) < 1e-9


@pytest.mark.parametrize("used", [(True, False, False), (False, True, False), (False, False, True),
                                  (True, False, True)])
def test_unused_outputs(used):
    """Outputs left out of the loss reach the backward undefined: gradients are the composite's,
    exact zeros where nothing flows."""
    x, phis, weights = make_case(3)

    def loss(fn):
        out = fn(x, phis, weights)
        return sum((o * (k + 1)).sum() for k, (o, u) in enumerate(zip(out, used)) if u)

    inputs = [x, *phis, *weights]
    got = torch.autograd.grad(loss(fused()), inputs, allow_unused=True)
    want = torch.autograd.grad(loss(composite()), inputs, allow_unused=True)
    for g, w in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, atol=1e-12, rtol=0)


def test_empty_batch_iters_bounds_and_raw_outputs():
    x, phis, weights = make_case(2, batch=(0, 3))
    out, grads = outputs_and_grads(fused(), x, phis, weights)
    assert [tuple(o.shape) for o in out] == [(0, 3, 2), (0, 3, 2), (0, 3, 2, 2)]
    assert all((g == 0).all() for g in grads)
    x, phis, weights = make_case(2, batch=(5,))
    for iters in (1, 32):
        torch.testing.assert_close(ops.mhc_coefficients(x, *phis, *weights, iters),
                                   reference(x, phis, weights, iters, "paper"))
    # The op's last two outputs: the raw projections x φ and the norms ||x||, not differentiable.
    *_, proj, norm = torch.ops.sinkhorn_ops.mhc_coefficients(x, *phis, *weights, NORM_EPS, 20,
                                                             EPS, "paper")
    torch.testing.assert_close(proj, x.detach() @ torch.cat(phis, -1).detach())
    torch.testing.assert_close(norm, x.detach().norm(dim=-1))
    assert not proj.requires_grad and not norm.requires_grad


def test_beyond_the_kernel_runs_the_composite():
    """n = 9, iters = 40 and the implicit gradient: rms_projection and the mappings' PyTorch
    formulas, the same values."""
    for n, iters, grad in ((9, 20, "unrolled"), (3, 40, "unrolled"), (3, 20, "implicit")):
        x, phis, weights = make_case(n, batch=(4,))
        got = ops.mhc_coefficients(x, *phis, *weights, iters, grad=grad)
        torch.testing.assert_close(got, reference(x, phis, weights, iters, "paper"), atol=1e-9,
                                   rtol=0)


def test_bad_arguments():
    x, p, w = make_case(4, batch=(2,), dtype=torch.float32)
    op = torch.ops.sinkhorn_ops.mhc_coefficients.default
    names = ["x", *PHIS, "alpha_pre", "alpha_post", "alpha_res", "b_pre", "b_post", "b_res",
             "norm_eps", "iters", "eps", "variant"]
    good = (x, *p, *w, NORM_EPS, 20, EPS, "paper")

    def call(**change):
        args = list(good)
        for name, value in change.items():
            args[names.index(name)] = value
        return op(*args)

    m = "mhc_coefficients: expected "
    with pytest.raises(TypeError, match=m + r"x floating, in phi's dtype \(Float\) or a lower precision, got Double"):
        call(x=x.double())
    with pytest.raises(TypeError, match=m + r"x floating.*got Long"):
        call(x=torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(TypeError, match=m + r"phi_pre of dtype float32 or float64.*BFloat16"):
        call(phi_pre=p[0].bfloat16())
    with pytest.raises(TypeError, match=m + r"phi_res of phi_pre's dtype Float, got Double"):
        call(phi_res=p[2].double())
    with pytest.raises(ValueError, match=m + r"phi_post of shape \(D, n\) = \(20, 4\) for x of shape \[2, 20\] and n = 4, got \[20, 3\]"):
        call(phi_post=p[1][:, :3])
    with pytest.raises(ValueError, match=m + r"phi_pre of shape \(D, n\) = \(19, 4\) for x of shape \[2, 19\]"):
        call(x=x[:, :19])
    with pytest.raises(ValueError, match=m + r"x of shape \(\.\.\., D\) with D >= 1, got \[2, 0\]"):
        call(x=x[:, :0])
    with pytest.raises(ValueError, match=m + r"b_res of shape \(n, n\) with 1 <= n <= 8"):
        call(b_res=torch.zeros(9, 9))
    with pytest.raises(TypeError, match=m + r"b_pre of phi's dtype Float, got Double"):
        call(b_pre=w[3].double())
    with pytest.raises(ValueError, match=m + r"b_post of shape \[4\], got \[3\]"):
        call(b_post=torch.zeros(3))
    with pytest.raises(ValueError, match=m + r"alpha_res to hold one value"):
        call(alpha_res=torch.ones(2))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=m + r"a finite norm_eps > 0"):
            call(norm_eps=bad)
    with pytest.raises(ValueError, match=m + r"1 <= iters <= 32, got 33"):
        call(iters=33)
    with pytest.raises(ValueError, match=m + r'variant "paper" or "v4", got "v5"'):
        call(variant="v5")
    with pytest.raises(ValueError, match=m + r'a finite eps > 0 for variant "v4", got 0'):
        call(variant="v4", eps=0.0)
    back = torch.ops.sinkhorn_ops.mhc_coefficients_backward.default
    *_, proj, norm = op(*good)
    det = [a.detach() if isinstance(a, torch.Tensor) else a for a in good]
    args = det[:4] + [proj, norm] + det[4:]
    mb = "mhc_coefficients_backward: expected "
    with pytest.raises(ValueError, match=mb + r"proj \(the forward's raw projections\) of shape \[2, 24\], got \[2, 23\]"):
        back(None, None, None, *args[:4], proj[:, :23], *args[5:])
    with pytest.raises(TypeError, match=mb + r"proj \(the forward's raw projections\) of phi's dtype Float, got Double"):
        back(None, None, None, *args[:4], proj.double(), *args[5:])
    with pytest.raises(ValueError, match=mb + r"norm of shape \[2\], got \[3\]"):
        back(None, None, None, *args[:5], torch.ones(3), *args[6:])
    with pytest.raises(ValueError, match=mb + r"grad_res of shape \[2, 4, 4\], got \[2, 16\]"):
        back(None, None, torch.zeros(2, 16), *args)
    # The functional's and the layer's own checks.
    with pytest.raises(ValueError, match=r"mhc_coefficients: expected a finite norm_eps > 0, got 0"):
        ops.mhc_coefficients(x, *p, *w, norm_eps=0)
    with pytest.raises(TypeError, match=r"mhc_coefficients: expected phi_res to be a torch.Tensor"):
        ops.mhc_coefficients(x, p[0], p[1], None, *w)
    with pytest.raises(ValueError, match=r"mhc_coefficients: expected phi_pre of shape \(D, 9\)"):
        ops.mhc_coefficients(torch.zeros(2, 18), torch.zeros(18, 8), torch.zeros(18, 9),
                             torch.zeros(18, 81), *w[:3], torch.zeros(9), torch.zeros(9),
                             torch.zeros(9, 9))
    with pytest.raises(ValueError, match=r"ManifoldConstrainedHyperConnections: expected a finite norm_eps > 0"):
        ops.nn.ManifoldConstrainedHyperConnections(4, 8, norm_eps=0.0)


def test_double_backward_goes_through_the_aten_form():
    """Second order (tests/test_second_order.py checks the values by gradgradcheck)."""
    x, phis, weights = make_case(2, batch=(3,))
    x.requires_grad_()
    out = ops.mhc_coefficients(x, *phis, *weights)
    (g,) = torch.autograd.grad(out[2].square().sum(), x, create_graph=True)
    assert g.grad_fn is not None
    (h,) = torch.autograd.grad(g.sin().sum(), x)
    assert torch.isfinite(h).all() and h.abs().max() > 0


def test_opcheck():
    x, phis, weights = make_case(3, batch=(6,), dtype=torch.float32)
    op = torch.ops.sinkhorn_ops.mhc_coefficients.default
    for variant in ("paper", "v4"):
        args = (x, *phis, *weights, NORM_EPS, 7, EPS, variant)
        torch.library.opcheck(op, args)
        det = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        *_, proj, norm = op(*det)
        grads = (torch.randn(6, 3), None, torch.randn(6, 3, 3))
        back_args = grads + tuple(det[:4] + [proj, norm] + det[4:])
        torch.library.opcheck(torch.ops.sinkhorn_ops.mhc_coefficients_backward.default,
                              back_args)
        torch.library.opcheck(torch.ops.sinkhorn_ops.mhc_coefficients_backward.default,
                              back_args + (False, True, False))


def test_backward_computes_only_what_is_asked_for():
    x, phis, weights = make_case(4, batch=(9,))
    back = torch.ops.sinkhorn_ops.mhc_coefficients_backward.default
    det = [t.detach() for t in (x, *phis, *weights)]
    *_, proj, norm = torch.ops.sinkhorn_ops.mhc_coefficients.default(*det, NORM_EPS, 20, EPS,
                                                                     "paper")
    grads = (torch.randn(9, 4, dtype=torch.float64), None,
             torch.randn(9, 4, 4, dtype=torch.float64))
    args = grads + tuple(det[:4] + [proj, norm] + det[4:]) + (NORM_EPS, 20, EPS, "paper")
    full = back(*args)
    for mask in ((True, False, False), (False, True, False), (False, False, True),
                 (False, False, False)):
        got = back(*args, *mask)
        for want, g, asked in zip(full, got, mask):
            if asked:
                assert torch.equal(g, want)
            else:
                assert g.shape == (0,)


def _backward_matmuls(x, phis, weights):
    out = ops.mhc_coefficients(x, *phis, *weights)
    loss = out[0].sum() + out[1].square().sum() + out[2].sin().sum()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    return sum(e.name == "aten::mm" for e in prof.events())


@pytest.mark.parametrize("frozen", ["phi", "x", "weights", "phi and weights"])
def test_frozen_inputs_skip_their_gradients(frozen):
    x, phis, weights = make_case(4, batch=(5, 3))
    want = outputs_and_grads(fused(), x, phis, weights)[1]
    x, phis, weights = make_case(4, batch=(5, 3))
    frozen_tensors = {"phi": phis, "x": [x], "weights": weights,
                      "phi and weights": phis + weights}[frozen]
    for t in frozen_tensors:
        t.requires_grad_(False)
    # The matmuls of the backward: dL/dx (T, D) and dL/dphi (D, 2n + n^2), one each.
    assert _backward_matmuls(x, phis, weights) == 2 - ("phi" in frozen) - (frozen == "x")
    for t in (x, *phis, *weights):
        t.grad = None
    live = [t for t in (x, *phis, *weights) if t.requires_grad]
    out = ops.mhc_coefficients(x, *phis, *weights)
    gen = torch.Generator().manual_seed(5)
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in out]
    got = torch.autograd.grad(out, live, upstream)
    expected = [w for t, w in zip((x, *phis, *weights), want) if t.requires_grad]
    for g, w in zip(got, expected):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_does_not_lower_the_projection(device):
    """Under bf16 autocast the op still computes x φ in fp32: the same values as without."""
    x, phis, weights = make_case(4, dtype=torch.float32, device=device)
    want = ops.mhc_coefficients(x, *phis, *weights)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = ops.mhc_coefficients(x, *phis, *weights)
        grads = torch.autograd.grad(got[2].square().sum(), [x, *phis])
    want_grads = torch.autograd.grad(want[2].square().sum(), [x, *phis])
    for g, w in zip(list(got) + list(grads), list(want) + list(want_grads)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_compile_fullgraph_dynamic():
    def loss(x, *tensors):
        pre, post, res = ops.mhc_coefficients(x, *tensors, 20)
        return pre.sum() + post.square().sum() + (res * res).sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend="aot_eager")
    for tokens in (5, 9):
        x, phis, weights = make_case(4, batch=(tokens,), dtype=torch.float32)
        inputs = [x, *phis, *weights]
        got = torch.autograd.grad(compiled(*inputs), inputs)
        want = torch.autograd.grad(loss(*inputs), inputs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_runs_the_fused_coefficients(device):
    """The layer's mappings come from one Coefficients node, and each φ's .grad is a contiguous
    tensor of its own (AccumulateGrad copies the backward's views of one matmul)."""
    layer = make_layer(4, device=device)
    x = make_streams(4, device=device)
    maps = layer.mappings(x)
    assert "Coefficients" in maps.res.grad_fn.name()
    layer(x).square().sum().backward()
    for name in PHIS:
        grad = getattr(layer, name).grad
        assert grad is not None and grad.is_contiguous() and grad.abs().sum() > 0, name
    assert len({getattr(layer, name).grad.data_ptr() for name in PHIS}) == 3


@pytest.mark.parametrize("alpha", [float("inf"), float("nan")])
def test_non_finite_gate_of_an_unused_output_stays_out(alpha):
    """α_res inf or NaN with H_res left out of the loss: dL/dR's res columns are exact zeros (not
    inf · 0), so dL/dx = dL/dR φᵀ - c x and every other gradient stay finite, as the composite's."""
    x, phis, weights = make_case(3, batch=(5,))
    with torch.no_grad():
        weights[2].fill_(alpha)
    inputs = [x, *phis, *weights]
    pre, post, _ = ops.mhc_coefficients(*inputs)
    got = torch.autograd.grad(pre.sum() + 2 * post.sum(), inputs)
    want_pre, want_post, _ = reference(x, phis, weights, 20, "paper")
    want = torch.autograd.grad(want_pre.sum() + 2 * want_post.sum(), inputs, allow_unused=True)
    for k, (g, w) in enumerate(zip(got, want)):
        assert torch.isfinite(g).all(), k
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, atol=1e-12, rtol=0,
                                   msg=str(k))
