"""The fused DeepSeek-V4 mHC Sinkhorn (torch.ops.sinkhorn_ops.mhc_v4_sinkhorn and its backward,
csrc/mhc_v4_math.h) against the published formula run in PyTorch in float64: forward and
gradient for every n the kernel takes, float64 and float32, extreme logits, batch shapes, the
fallback beyond the kernel's limits, bad arguments, opcheck and torch.compile."""
import pytest
import torch
from conftest import DEVICES, assert_close, assert_flash_rule, load_ops

ops = load_ops()
from sinkhorn_ops import _mhc_v4_ops  # noqa: E402  (after load_ops, which builds the extension)
# DeepSeek-V4's formula as the MATH.md section 1 table states it, in x's dtype.
from test_mhc import v4_sinkhorn_reference as published  # noqa: E402


def fused(x, iters=20, eps=1e-6):
    return torch.ops.sinkhorn_ops.mhc_v4_sinkhorn.default(x, iters, eps)


def value_and_grad(fn, x, weight):
    x = x.detach().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad((out * weight).sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("device", DEVICES)
def test_float64_forward_and_gradient(n, device):
    torch.manual_seed(n)
    x = torch.randn(37, n, n, dtype=torch.float64, device=device) * 3
    w = torch.randn_like(x)
    for iters, eps in ((20, 1e-6), (1, 1e-6), (2, 1e-3), (7, 1e-2), (32, 1e-6)):
        out, grad = value_and_grad(lambda t: ops.mhc_v4_sinkhorn(t, iters, eps), x, w)
        ref, ref_grad = value_and_grad(lambda t: published(t, iters, eps), x, w)
        assert_close(out, ref, atol=1e-14, rtol=1e-12, name=f"comb n={n} iters={iters}")
        assert_close(grad, ref_grad, atol=1e-12, rtol=1e-10, name=f"grad n={n} iters={iters}")


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("device", DEVICES)
def test_float32_within_twice_pytorchs_own_error(n, device):
    torch.manual_seed(10 + n)
    x64 = torch.randn(512, n, n, dtype=torch.float64, device=device) * 2
    w64 = torch.randn_like(x64)
    truth, truth_grad = value_and_grad(published, x64, w64)
    x, w = x64.float(), w64.float()
    out, grad = value_and_grad(ops.mhc_v4_sinkhorn, x, w)
    ref, ref_grad = value_and_grad(published, x, w)
    assert out.dtype == grad.dtype == torch.float32
    assert_flash_rule(out, ref, truth, floor=1e-7, name="fp32 comb")
    assert_flash_rule(grad, ref_grad, truth_grad, floor=1e-6 * truth_grad.abs().max().item(),
                      name="fp32 grad")


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_logits_run_in_float32(device):
    x = torch.randn(6, 4, 4, device=device)
    for dtype in (torch.float16, torch.bfloat16):
        out = ops.mhc_v4_sinkhorn(x.to(dtype))
        assert out.dtype == torch.float32
        assert_close(out, fused(x.to(dtype).float()), atol=0, name=str(dtype))


@pytest.mark.parametrize("scale", [30.0, 1e3, 1e4])
@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits_stay_finite_and_exact(scale, device):
    """Large logits make the softmax one-hot and most entries exactly eps-sized; nothing
    overflows (the softmax is max-shifted) and nothing divides by zero (eps > 0)."""
    torch.manual_seed(3)
    x = torch.randn(64, 4, 4, dtype=torch.float64, device=device) * scale
    w = torch.randn_like(x)
    out, grad = value_and_grad(ops.mhc_v4_sinkhorn, x, w)
    ref, ref_grad = value_and_grad(published, x, w)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert_close(out, ref, atol=1e-13, rtol=1e-11, name="comb")
    assert_close(grad, ref_grad, atol=1e-10, rtol=1e-8, name="grad")
    out32, grad32 = value_and_grad(ops.mhc_v4_sinkhorn, x.float(), w.float())
    assert torch.isfinite(out32).all() and torch.isfinite(grad32).all()


@pytest.mark.parametrize("device", DEVICES)
def test_batch_shapes_strides_and_empty(device):
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64, device=device)
    out = ops.mhc_v4_sinkhorn(x)
    assert out.shape == x.shape
    assert_close(out, published(x), atol=1e-14, rtol=1e-12, name="4-d batch")
    xt = x.transpose(-1, -2)  # not contiguous
    assert_close(ops.mhc_v4_sinkhorn(xt), published(xt), atol=1e-14, rtol=1e-12, name="strided")
    single = ops.mhc_v4_sinkhorn(x[0, 0])  # no batch dimension
    assert_close(single, published(x[0, 0]), atol=1e-14, rtol=1e-12, name="(n, n)")
    empty = torch.randn(0, 4, 4, device=device, requires_grad=True)
    out = ops.mhc_v4_sinkhorn(empty)
    out.sum().backward()
    assert out.shape == (0, 4, 4) and empty.grad.shape == (0, 4, 4)


def test_beyond_the_kernel_runs_the_loop():
    x = torch.randn(5, 9, 9, dtype=torch.float64, requires_grad=True)
    assert_close(ops.mhc_v4_sinkhorn(x), published(x), atol=0, name="n = 9")
    y = torch.randn(5, 4, 4, dtype=torch.float64)
    assert_close(ops.mhc_v4_sinkhorn(y, iters=40), published(y, 40), atol=0, name="iters = 40")
    assert _mhc_v4_ops.MAX_N == 8 and _mhc_v4_ops.MAX_ITERS == 32


def test_rows_and_columns_after_20_iterations():
    """The last normalisation is over columns: they sum to 1 - eps / (sum + eps); the rows
    within the convergence error."""
    x = torch.randn(4096, 4, 4)
    out = ops.mhc_v4_sinkhorn(x)
    assert (out >= 0).all()
    assert (out.sum(-2) - 1).abs().max() < 1e-5
    assert (out.sum(-1) - 1).abs().max() < 1e-3


def test_bad_arguments():
    x = torch.randn(4, 4)
    op = torch.ops.sinkhorn_ops.mhc_v4_sinkhorn.default
    back = torch.ops.sinkhorn_ops.mhc_v4_sinkhorn_backward.default
    cases = [
        (lambda: op(x.half(), 20, 1e-6), TypeError, "mhc_v4_sinkhorn: expected logits of dtype float32 or float64.*Half"),
        (lambda: op(torch.randn(4, 3), 20, 1e-6), ValueError, r"mhc_v4_sinkhorn: expected logits of shape \(\.\.\., n, n\), got \[4, 3\]"),
        (lambda: op(torch.randn(4), 20, 1e-6), ValueError, r"shape \(\.\.\., n, n\)"),
        (lambda: op(torch.randn(9, 9), 20, 1e-6), ValueError, "1 <= n <= 8.*got n = 9"),
        (lambda: op(x, 0, 1e-6), ValueError, "1 <= iters <= 32, got 0"),
        (lambda: op(x, 33, 1e-6), ValueError, "1 <= iters <= 32, got 33"),
        (lambda: op(x, 20, 0.0), ValueError, "finite eps > 0, got 0"),
        (lambda: op(x, 20, float("nan")), ValueError, "finite eps > 0, got nan"),
        (lambda: back(x.double(), x, 20, 1e-6), TypeError, "mhc_v4_sinkhorn_backward: expected grad of the logits' dtype Float, got Double"),
        (lambda: back(torch.randn(3, 4, 4), x, 20, 1e-6), ValueError, r"expected grad of the logits' shape \[4, 4\], got \[3, 4, 4\]"),
        (lambda: ops.mhc_v4_sinkhorn(x, eps=-1.0), ValueError, "mhc_v4_sinkhorn: expected a finite eps > 0, got -1.0"),
        (lambda: ops.mhc_v4_sinkhorn(x, iters=0), ValueError, "iters"),
    ]
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fn()


def test_double_backward_goes_through_the_aten_form():
    """Second order (tests/test_second_order.py checks the values by gradgradcheck)."""
    x = torch.randn(2, 4, 4, requires_grad=True)
    (g,) = torch.autograd.grad(ops.mhc_v4_sinkhorn(x).pow(2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sin().sum(), x)
    assert torch.isfinite(h).all() and h.abs().max() > 0


def test_opcheck():
    x = torch.randn(6, 4, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.sinkhorn_ops.mhc_v4_sinkhorn.default, (x, 20, 1e-6))
    torch.library.opcheck(torch.ops.sinkhorn_ops.mhc_v4_sinkhorn_backward.default,
                          (torch.randn(6, 4, 4), x.detach(), 20, 1e-6))


def check_compiled_matches_eager(fn):
    """torch.compile(fullgraph, dynamic shapes) of sum(fn(x)²) against eager, value and gradient,
    for two batch sizes of 4×4 problems."""
    compiled = torch.compile(lambda t: fn(t).square().sum(), fullgraph=True, dynamic=True,
                             backend="aot_eager")
    for batch in (8, 13):
        x = torch.randn(batch, 4, 4, requires_grad=True)
        val = compiled(x)
        val.backward()
        ref, ref_grad = value_and_grad(fn, x, 2 * fn(x).detach())
        assert_close(val.detach(), ref.square().sum(), atol=1e-6, rtol=1e-6, name="value")
        assert_close(x.grad, ref_grad, atol=1e-6, rtol=1e-5, name="grad")


def test_compile_fullgraph_dynamic():
    check_compiled_matches_eager(lambda t: ops.mhc_v4_sinkhorn(t, 20))


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("device", DEVICES)
def test_the_paper_variant_is_v4_of_the_transpose_without_eps(n, device):
    """mhc_sinkhorn(H, k) = mhc_v4_sinkhorn(Hᵀ, k, eps → 0)ᵀ: V4's row softmax of Hᵀ is the
    paper's first column normalisation of exp(H), and each later normalisation of Hᵀ along one
    axis is the paper's along the other. Two independent kernels (the log-domain operator and
    the linear-domain V4 one) must agree, values and gradients. (mhc_sinkhorn's own fused
    kernel is this identity; tests/test_mhc_paper_kernel.py checks it.)"""
    torch.manual_seed(10 + n)
    x = torch.randn(29, n, n, dtype=torch.float64, device=device) * 2
    w = torch.randn_like(x)
    for iters in (1, 3, 20):
        paper, paper_grad = value_and_grad(lambda t: ops.sinkhorn(t, steps=2 * iters, start="col"),
                                           x, w)
        v4, v4_grad = value_and_grad(lambda t: ops.mhc_v4_sinkhorn(t.mT, iters, 1e-300).mT, x, w)
        assert_close(v4, paper, atol=1e-13, rtol=1e-12, name=f"H n={n} iters={iters}")
        assert_close(v4_grad, paper_grad, atol=1e-11, rtol=1e-10, name=f"grad n={n} iters={iters}")
