"""mHC's fused mappings (torch.ops.sinkhorn_ops.mhc_mappings, sinkhorn_ops.mhc_mappings): H_pre,
H_post and H_res from the normalised projections, against the literal per-token formulas of
MATH.md section 4 written here (test_mhc.py's Sinkhorn references), forward and the gradient of
proj and of every weight, in float64 and fp32, both variants, n from 1 to 8, wide logits (the
paper's log-domain twin), missing upstream gradients, bad arguments, opcheck, torch.compile, and
the layer's fused path against its composite one."""
import pytest
import torch
from conftest import DEVICES, load_ops
from test_mhc import make_layer, make_streams, run, sinkhorn_knopp_reference, v4_sinkhorn_reference

ops = load_ops()
from sinkhorn_ops.nn import ManifoldConstrainedHyperConnections

EPS = 1e-6


def reference(proj, weights, iters, variant, eps=EPS):
    """MATH.md section 4 for each token, in proj's dtype."""
    a_pre, a_post, a_res, b_pre, b_post, b_res = weights
    n = b_res.shape[-1]
    pre, post, res = proj[..., :n], proj[..., n:2 * n], proj[..., 2 * n:]
    h_pre = torch.sigmoid(a_pre * pre + b_pre)
    h_post = 2 * torch.sigmoid(a_post * post + b_post)
    logits = a_res * res.reshape(*proj.shape[:-1], n, n) + b_res
    if variant == "v4":
        return h_pre + eps, h_post, v4_sinkhorn_reference(logits, iters, eps).transpose(-1, -2)
    return h_pre, h_post, sinkhorn_knopp_reference(logits, iters)


def make_case(n, batch=(3, 11), *, scale=1.0, dtype=torch.float64, device="cpu", seed=0):
    """proj ~ scale N(0, 1) and the six weights (gates away from 0, random biases), float64
    leaves cast to dtype."""
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(*batch, 2 * n + n * n, generator=gen, dtype=torch.float64) * scale
    weights = [torch.tensor(v, dtype=torch.float64) for v in (0.7, -0.4, 1.3)]
    weights += [torch.randn(n, generator=gen, dtype=torch.float64),
                torch.randn(n, generator=gen, dtype=torch.float64),
                torch.randn(n, n, generator=gen, dtype=torch.float64) + 2 * torch.eye(n)]
    cast = lambda t: t.to(device=device, dtype=dtype).requires_grad_(True)
    return cast(proj), [cast(w) for w in weights]


def outputs_and_grads(fn, proj, weights, seed=5):
    """fn's three outputs and the gradients of proj and the weights of a random linear loss."""
    out = fn(proj, weights)
    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in out]
    grads = torch.autograd.grad(out, [proj, *weights], upstream)
    return [o.detach() for o in out], list(grads)


def fused(iters, variant):
    return lambda p, w: ops.mhc_mappings(p, *w, iters, variant=variant, eps=EPS)


def worst(got, want):
    return max((g.double().cpu() - w.double().cpu()).abs().max().item() for g, w in zip(got, want))


@pytest.mark.parametrize("variant", ["paper", "v4"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("device", DEVICES)
def test_float64_forward_and_every_gradient(n, variant, device):
    proj, weights = make_case(n, device=device)
    got = outputs_and_grads(fused(20, variant), proj, weights)
    want = outputs_and_grads(lambda p, w: reference(p, w, 20, variant), proj, weights)
    assert worst(got[0], want[0]) < 1e-12
    assert worst(got[1], want[1]) < 1e-10
    assert got[1][1].shape == () and got[1][6].shape == (n, n)


@pytest.mark.parametrize("variant", ["paper", "v4"])
@pytest.mark.parametrize("device", DEVICES)
def test_float32_within_twice_torchs_error(variant, device):
    """fp32: the error against float64 truth is at most twice that of the same formulas run in
    fp32 by PyTorch (+ a small absolute floor)."""
    proj, weights = make_case(4, batch=(200,), scale=2.0)
    truth = outputs_and_grads(lambda p, w: reference(p, w, 20, variant), proj, weights)
    p32, w32 = make_case(4, batch=(200,), scale=2.0, dtype=torch.float32, device=device)
    ours = outputs_and_grads(fused(20, variant), p32, w32)
    torchs = outputs_and_grads(lambda p, w: reference(p, w, 20, variant), p32, w32)
    for part in (0, 1):
        for got, base, want in zip(ours[part], torchs[part], truth[part]):
            ours_err = (got.double().cpu() - want).abs().max().item()
            torch_err = (base.double().cpu() - want).abs().max().item()
            assert ours_err <= 2 * torch_err + 1e-6 * max(want.abs().max().item(), 1), (
                part, ours_err, torch_err)


@pytest.mark.parametrize("device", DEVICES)
def test_wide_logits_take_the_log_domain(device):
    """Logits spanning far more than the linear domain's 32 (the paper's variant runs those
    problems in the log domain): still the reference, and finite."""
    proj, weights = make_case(4, batch=(64,), scale=60.0, device=device)
    got = outputs_and_grads(fused(20, "paper"), proj, weights)
    want = outputs_and_grads(lambda p, w: reference(p, w, 20, "paper"), proj, weights)
    assert all(torch.isfinite(t).all() for t in got[0] + got[1])
    assert worst(got[0], want[0]) < 1e-10
    assert worst(got[1], want[1]) < 1e-7 * max(g.abs().max().item() for g in want[1])


@pytest.mark.parametrize("used", [(True, False, False), (False, True, False), (False, False, True),
                                  (True, False, True)])
def test_unused_outputs(used):
    """Outputs left out of the loss reach the backward undefined (no materialised zeros): the
    gradients are those of the composite, exact zeros where an output was not used."""
    proj, weights = make_case(3)

    def loss(fn):
        out = fn(proj, weights)
        return sum((o * (k + 1)).sum() for k, (o, u) in enumerate(zip(out, used)) if u)

    got = torch.autograd.grad(loss(fused(20, "paper")), [proj, *weights], allow_unused=True)
    want = torch.autograd.grad(loss(lambda p, w: reference(p, w, 20, "paper")), [proj, *weights],
                               allow_unused=True)
    for g, w in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, atol=1e-12, rtol=0)


def test_non_finite_projections_of_an_unused_output_stay_out():
    """A NaN or inf among one token's H_res projections, with a loss on H_pre and H_post only:
    as autograd of the composite, the gradients are finite (zeros for the res group)."""
    proj, weights = make_case(3, batch=(5,))
    with torch.no_grad():
        proj[1, 6] = float("nan")
        proj[3, 7] = float("inf")
    pre, post, res = ops.mhc_mappings(proj, *weights)
    grads = torch.autograd.grad(pre.sum() + 2 * post.sum(), [proj, *weights])
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][:, 6:] == 0).all() and grads[3] == 0 and (grads[6] == 0).all()
    want = reference(proj, weights, 20, "paper")
    want_g = torch.autograd.grad(want[0].sum() + 2 * want[1].sum(), [proj, *weights],
                                 allow_unused=True)
    for g, w in zip(grads, want_g):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, atol=1e-12, rtol=0)


def test_empty_batch_and_iters_bounds():
    proj, weights = make_case(2, batch=(0, 3))
    out, grads = outputs_and_grads(fused(20, "paper"), proj, weights)
    assert [tuple(o.shape) for o in out] == [(0, 3, 2), (0, 3, 2), (0, 3, 2, 2)]
    assert all((g == 0).all() for g in grads[1:])
    for iters in (1, 32):
        proj, weights = make_case(2, batch=(5,))
        got = ops.mhc_mappings(proj, *weights, iters)
        torch.testing.assert_close(got, reference(proj, weights, iters, "paper"))


def test_beyond_the_kernel_runs_the_composite():
    """n = 9, iters = 40 and the implicit gradient run the same formulas in PyTorch."""
    for n, iters, grad in ((9, 20, "unrolled"), (3, 40, "unrolled"), (3, 20, "implicit")):
        proj, weights = make_case(n, batch=(4,))
        got = ops.mhc_mappings(proj, *weights, iters, grad=grad)
        torch.testing.assert_close(got, reference(proj, weights, iters, "paper"), atol=1e-9,
                                   rtol=0)


def test_bad_arguments():
    proj, w = make_case(4, batch=(2,), dtype=torch.float32)
    op = torch.ops.sinkhorn_ops.mhc_mappings.default
    good = (proj, *w, 20, EPS, "paper")

    def call(**change):
        args = list(good)
        names = ["proj", "alpha_pre", "alpha_post", "alpha_res", "b_pre", "b_post", "b_res",
                 "iters", "eps", "variant"]
        for name, value in change.items():
            args[names.index(name)] = value
        return op(*args)

    with pytest.raises(TypeError, match=r"mhc_mappings: expected proj of dtype float32 or float64.*BFloat16"):
        call(proj=proj.bfloat16())
    with pytest.raises(ValueError, match=r"mhc_mappings: expected proj of shape \(\.\.\., 2n \+ n\^2\) = \(\.\.\., 24\)"):
        call(proj=proj[..., :20])
    with pytest.raises(ValueError, match=r"mhc_mappings: expected b_res of shape \(n, n\) with 1 <= n <= 8"):
        call(b_res=torch.zeros(9, 9))
    with pytest.raises(ValueError, match=r"mhc_mappings: expected b_res of shape \(n, n\)"):
        call(b_res=torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"mhc_mappings: expected 1 <= iters <= 32, got 0"):
        call(iters=0)
    with pytest.raises(ValueError, match=r"mhc_mappings: expected 1 <= iters <= 32, got 33"):
        call(iters=33)
    with pytest.raises(ValueError, match=r'mhc_mappings: expected variant "paper" or "v4", got "v5"'):
        call(variant="v5")
    with pytest.raises(ValueError, match=r'mhc_mappings: expected a finite eps > 0 for variant "v4", got 0'):
        call(variant="v4", eps=0.0)
    with pytest.raises(ValueError, match=r"mhc_mappings: expected alpha_res to hold one value"):
        call(alpha_res=torch.ones(2))
    with pytest.raises(TypeError, match=r"mhc_mappings: expected b_pre of dtype Float, got Double"):
        call(b_pre=w[3].double())
    with pytest.raises(ValueError, match=r"mhc_mappings: expected b_post of shape \[4\], got \[3\]"):
        call(b_post=torch.zeros(3))
    back = torch.ops.sinkhorn_ops.mhc_mappings_backward.default
    with pytest.raises(ValueError, match=r"mhc_mappings_backward: expected grad_res of shape \[2, 4, 4\], got \[2, 16\]"):
        back(None, None, torch.zeros(2, 16), *good)
    with pytest.raises(TypeError, match=r"mhc_mappings_backward: expected grad_pre of dtype Float"):
        back(torch.zeros(2, 4, dtype=torch.float64), None, None, *good)
    # The functional's own checks, before any op.
    with pytest.raises(ValueError, match=r"mhc_mappings: expected grad in \('unrolled',\) for variant 'v4'"):
        ops.mhc_mappings(proj, *w, variant="v4", grad="implicit")
    with pytest.raises(ValueError, match=r"mhc_mappings: expected iters to be an int >= 1"):
        ops.mhc_mappings(proj, *w, 0)


def test_double_backward_goes_through_the_aten_form():
    """Second order (tests/test_second_order.py checks the values by gradgradcheck)."""
    proj, weights = make_case(2, batch=(3,))
    proj.requires_grad_()
    out = ops.mhc_mappings(proj, *weights)
    (g,) = torch.autograd.grad(out[2].square().sum(), proj, create_graph=True)
    (h,) = torch.autograd.grad(g.sin().sum(), proj)
    assert torch.isfinite(h).all() and h.abs().max() > 0


def test_opcheck():
    proj, weights = make_case(3, batch=(6,), dtype=torch.float32)
    for variant in ("paper", "v4"):
        args = (proj, *weights, 7, EPS, variant)
        torch.library.opcheck(torch.ops.sinkhorn_ops.mhc_mappings.default, args)
        det = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        grads = (torch.randn(6, 3), None, torch.randn(6, 3, 3))
        torch.library.opcheck(torch.ops.sinkhorn_ops.mhc_mappings_backward.default, grads + det)


def test_compile_fullgraph_dynamic():
    def loss(proj, *weights):
        pre, post, res = ops.mhc_mappings(proj, *weights, 20)
        return pre.sum() + post.square().sum() + (res * res).sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend="aot_eager")
    for tokens in (5, 9):
        proj, weights = make_case(4, batch=(tokens,), dtype=torch.float32)
        got = torch.autograd.grad(compiled(proj, *weights), [proj, *weights])
        want = torch.autograd.grad(loss(proj, *weights), [proj, *weights])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


class Composite(ManifoldConstrainedHyperConnections):
    """The same layer with residual_matrix overridden (identically), which sends mappings()
    through the composite path."""

    def residual_matrix(self, logits):
        return super().residual_matrix(logits)


@pytest.mark.parametrize("variant", ["paper", "v4"])
@pytest.mark.parametrize("device", DEVICES)
def test_layer_fused_equals_composite(variant, device):
    layer = make_layer(4, variant=variant, device=device)
    other = make_layer(4, variant=variant, device=device)
    other.__class__ = Composite
    # An override set on an instance is honoured too (it runs the composite path).
    third = make_layer(4, variant=variant, device=device)
    third.residual_matrix = lambda logits: 0 * logits + 1.0 / 4
    assert torch.equal(third.mappings(make_streams(4, device=device)).res,
                       torch.full((3, 5, 4, 4), 0.25, dtype=torch.float64, device=device))
    x = make_streams(4, device=device)
    assert "Coefficients" in layer.mappings(x).res.grad_fn.name()
    assert "Coefficients" not in other.mappings(x).res.grad_fn.name()
    out, grads = run(layer, x, layer)
    out2, grads2 = run(other, x, other)
    torch.testing.assert_close(out, out2, atol=1e-12, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], grads2[name], atol=1e-11, rtol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_gradients_accumulate_and_step(device):
    """The six weights' gradients come from one sum (views of one tensor, as cuDNN's RNN weight
    gradients): a second backward accumulates into each without touching the others, zero_grad
    without set_to_none zeroes them, and the foreach and fused optimisers step on them."""
    layer = make_layer(4, device=device)
    x = make_streams(4, device=device)
    names = ("alpha_pre", "alpha_post", "alpha_res", "b_pre", "b_post", "b_res")

    def grads():
        return {k: getattr(layer, k).grad.clone() for k in names}

    run_once = lambda: layer(x).square().sum().backward()
    run_once()
    once = grads()
    assert all(once[k].abs().sum() > 0 for k in names), once
    run_once()
    for k in names:
        torch.testing.assert_close(getattr(layer, k).grad, 2 * once[k], rtol=1e-12, atol=0, msg=k)
    layer.zero_grad(set_to_none=False)
    assert all(getattr(layer, k).grad.abs().sum() == 0 for k in names)
    run_once()
    for k in names:
        torch.testing.assert_close(getattr(layer, k).grad, once[k], rtol=1e-12, atol=0, msg=k)
    before = {k: getattr(layer, k).detach().clone() for k in names}
    for kw in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        torch.optim.AdamW(layer.parameters(), lr=1e-2, **kw).step()
    for k in names:
        assert not torch.equal(getattr(layer, k).detach(), before[k]), k


def test_layer_saves_no_fp32_copy_of_bf16_streams():
    """The bf16 layer's autograd keeps the streams as they came: no saved fp32 tensor as large
    as x (the coefficient projection used to save one, twice x's size)."""
    layer = make_layer(4, dtype=torch.bfloat16)  # model.to(torch.bfloat16)
    x = make_streams(4, dtype=torch.bfloat16, shape=(6, 5))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    big = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.numel() >= x.numel()]
    assert not big, big
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_layer_under_autocast(device):
    """fp32 layer and streams under bf16 autocast: the projection's matmul and the branch run in
    bf16, the mappings in fp32; the output keeps x's dtype and is close to the fp32 layer's."""
    layer = make_layer(4, dtype=torch.float32, device=device)
    x = make_streams(4, dtype=torch.float32, device=device)
    want = layer(x)
    with torch.autocast(device, dtype=torch.bfloat16):
        maps = layer.mappings(x)
        out = layer(x)
    assert all(t.dtype == torch.float32 for t in maps)
    assert out.dtype == torch.float32
    assert (out - want).abs().max().item() < 0.1 * want.abs().max().item()
    out.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
