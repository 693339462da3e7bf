"""rms_projection (sinkhorn_ops/_rms_projection.py): RMSNorm(x) φ with a written-out backward,
against autograd through the plain formula."""
import pytest
import torch

from sinkhorn_ops._rms_projection import rms_projection

from conftest import DEVICES, assert_flash_rule


def plain(x, phi, eps):
    return (x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)) @ phi


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 8), (1, 1)])
def test_gradcheck_float64(device, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    phi = torch.randn(shape[-1], 7, dtype=torch.float64, device=device, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: rms_projection(a, b, 1e-6), (x, phi))


def _value_and_grads(fn, x, phi, up):
    x = x.detach().requires_grad_()
    phi = phi.detach().requires_grad_()
    out = fn(x, phi, 1e-6)
    return (out,) + torch.autograd.grad(out, (x, phi), up)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_the_plain_formula(device, dtype):
    torch.manual_seed(1)
    x = torch.randn(64, 4 * 32, dtype=torch.float64, device=device) * 3
    x[3] = 0  # a zero token: r = eps^(-1/2), finite
    phi = torch.randn(4 * 32, 24, dtype=torch.float64, device=device)
    up = torch.randn(64, 24, dtype=torch.float64, device=device)
    truth = _value_and_grads(plain, x, phi, up)
    low = [t.to(dtype) for t in (x, phi, up)]
    ours = _value_and_grads(rms_projection, *low)
    ref = _value_and_grads(plain, *low)
    for name, a, r, t in zip(("y", "dx", "dphi"), ours, ref, truth):
        assert torch.isfinite(a).all()
        if dtype == torch.float64:
            torch.testing.assert_close(a, t, rtol=1e-12, atol=1e-12)
        else:
            assert_flash_rule(a, r, t, floor=1e-6 * t.abs().max().item(), name=name)


def test_gradient_of_one_input_only():
    torch.manual_seed(2)
    x = torch.randn(6, 10, dtype=torch.float64)
    phi = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(rms_projection(x, phi, 1e-6).sum(), phi)
    (ref,) = torch.autograd.grad(plain(x, phi, 1e-6).sum(), phi)
    torch.testing.assert_close(g, ref)
    x.requires_grad_()
    (g,) = torch.autograd.grad(rms_projection(x, phi.detach(), 1e-6).sum(), x)
    (ref,) = torch.autograd.grad(plain(x, phi.detach(), 1e-6).sum(), x)
    torch.testing.assert_close(g, ref)


def test_bad_phi_names_the_function():
    with pytest.raises(ValueError, match=r"rms_projection: expected phi of shape \(10, K\)"):
        rms_projection(torch.randn(2, 10), torch.randn(9, 3), 1e-6)


def test_compile_fullgraph():
    torch.manual_seed(3)
    x = torch.randn(8, 16, requires_grad=True)
    phi = torch.randn(16, 5, requires_grad=True)
    fn = torch.compile(lambda a, b: rms_projection(a, b, 1e-6), fullgraph=True, backend="aot_eager")
    out = fn(x, phi)
    torch.testing.assert_close(out, plain(x, phi, 1e-6))
    g = torch.autograd.grad(out.sum(), (x, phi))
    ref = torch.autograd.grad(plain(x, phi, 1e-6).sum(), (x, phi))
    for a, b in zip(g, ref):
        torch.testing.assert_close(a, b)


def test_autocast_like_the_plain_formula():
    """Under autocast the matmul runs in bf16 as in the plain formula: the result (the fp32
    norm's promotion) and the gradients are fp32, and within twice the plain formula's error."""
    torch.manual_seed(4)
    x = torch.randn(32, 64, requires_grad=True)
    phi = torch.randn(64, 6, requires_grad=True)
    results = []
    for fn in (rms_projection, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x, phi, 1e-6)
        results.append((out,) + torch.autograd.grad(out.sum(), (x, phi)))
    truth = _value_and_grads(plain, x.double(), phi.double(), torch.ones(32, 6, dtype=torch.float64))
    for name, a, r, t in zip(("y", "dx", "dphi"), *results, truth):
        assert a.dtype == torch.float32
        assert_flash_rule(a, r, t, floor=1e-6 * t.abs().max().item(), name=name)


def _saved_tensors(fn):
    """fn()'s result and the tensors autograd saved while computing it."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_x_is_computed_in_phis_dtype_and_saved_as_it_came(dtype):
    """x in bf16/fp16 with an fp32 phi: the same values and gradients as for x converted by
    hand, and no fp32 copy of x among the saved tensors (x itself is)."""
    torch.manual_seed(3)
    x = torch.randn(16, 40, dtype=torch.float64).to(dtype).requires_grad_()
    phi = torch.randn(40, 6, requires_grad=True)
    up = torch.randn(16, 6)
    y, saved = _saved_tensors(lambda: rms_projection(x, phi, 1e-6))
    assert not any(t.dtype == torch.float32 and t.numel() == x.numel() for t in saved)
    assert any(t.data_ptr() == x.data_ptr() for t in saved)
    dx, dphi = torch.autograd.grad(y, (x, phi), up)
    xf = x.detach().float().requires_grad_()
    y_ref = rms_projection(xf, phi, 1e-6)
    dx_ref, dphi_ref = torch.autograd.grad(y_ref, (xf, phi), up)
    assert y.dtype == torch.float32 and dx.dtype == dtype
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(dphi, dphi_ref, rtol=0, atol=0)
    torch.testing.assert_close(dx, dx_ref.to(dtype), rtol=0, atol=0)


def test_double_backward():
    """The backward is made of differentiable ATen ops (csrc/ops/rms_projection.cpp)."""
    torch.manual_seed(5)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    phi = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda a, b: rms_projection(a, b, 1e-6), (x, phi))


def test_bad_arguments():
    x, phi = torch.randn(3, 5), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"rms_projection: expected phi of shape \(5, K\)"):
        rms_projection(x, phi[:4], 1e-6)
    with pytest.raises(TypeError, match=r"rms_projection: expected floating x and phi, got Long"):
        torch.ops.sinkhorn_ops.rms_projection(x.long(), phi, 1e-6)
    with pytest.raises(ValueError, match=r"rms_projection: expected phi of shape"):
        torch.ops.sinkhorn_ops.rms_projection(x, phi.t(), 1e-6)
    with pytest.raises(TypeError, match=r"rms_projection: expected x in phi's dtype \(Float, in "
                                        r"which it computes\) or a lower precision, got Double"):
        rms_projection(x.double(), phi, 1e-6)
    with pytest.raises(ValueError, match=r"rms_projection: expected a finite eps >= 0, got -1"):
        rms_projection(x, phi, -1.0)
    with pytest.raises(ValueError, match=r"rms_projection: expected phi on x's device cpu, got meta"):
        rms_projection(x, phi.to("meta"), 1e-6)


def test_compile_traces_it():
    torch.manual_seed(6)
    x = torch.randn(7, 12, requires_grad=True)
    phi = torch.randn(12, 5, requires_grad=True)
    fn = lambda a, b: rms_projection(a, b, 1e-6).square().sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, phi), (x, phi))
    want = torch.autograd.grad(fn(x, phi), (x, phi))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
