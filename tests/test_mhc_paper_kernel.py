"""The fused mHC paper Sinkhorn (torch.ops.sinkhorn_ops.mhc_sinkhorn and its backward: the V4
kernel of csrc/mhc_v4_math.h on the transpose with eps = 0, and its log-domain twin for the
problems the linear domain cannot take) against the paper's loop in PyTorch float64 and against
the log-domain operator (sinkhorn with steps = 2 iters, start = "col"): values and gradients,
both domains and the switch between them, masked and non-finite logits, batch shapes, bad
arguments, opcheck, torch.compile, and that mhc_sinkhorn routes to it."""
import pytest
import torch
from conftest import DEVICES, assert_close, assert_flash_rule, load_ops
from torch.utils._python_dispatch import TorchDispatchMode

ops = load_ops()
from test_mhc import sinkhorn_knopp_reference as paper_loop  # noqa: E402
from test_mhc_v4 import check_compiled_matches_eager, value_and_grad  # noqa: E402

INF = float("inf")


def fused(x, iters=20):
    return torch.ops.sinkhorn_ops.mhc_sinkhorn.default(x, iters)


def operator(x, iters=20):
    """The same iterations on the general log-domain operator (an independent kernel)."""
    return ops.sinkhorn(x, steps=2 * iters, start="col")


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("device", DEVICES)
def test_float64_forward_and_gradient(n, device):
    torch.manual_seed(n)
    x = torch.randn(37, n, n, dtype=torch.float64, device=device) * 3
    w = torch.randn_like(x)
    for iters in (1, 2, 7, 20, 32):
        out, grad = value_and_grad(lambda t: fused(t, iters), x, w)
        ref, ref_grad = value_and_grad(lambda t: paper_loop(t, iters), x, w)
        assert_close(out, ref, atol=1e-14, rtol=1e-12, name=f"H n={n} iters={iters}")
        assert_close(grad, ref_grad, atol=1e-12, rtol=1e-10, name=f"grad n={n} iters={iters}")


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("scale", [1.0, 40.0])  # the linear domain, and the log domain
@pytest.mark.parametrize("device", DEVICES)
def test_float32_within_twice_pytorchs_own_error(n, scale, device):
    torch.manual_seed(10 + n)
    x64 = torch.randn(512, n, n, dtype=torch.float64, device=device) * scale
    w64 = torch.randn_like(x64)
    truth, truth_grad = value_and_grad(paper_loop, x64, w64)
    x, w = x64.float(), w64.float()
    out, grad = value_and_grad(fused, x, w)
    ref, ref_grad = value_and_grad(paper_loop, x, w)
    assert out.dtype == grad.dtype == torch.float32
    assert_flash_rule(out, ref, truth, floor=1e-7, name="fp32 H")
    assert_flash_rule(grad, ref_grad, truth_grad, floor=1e-6 * truth_grad.abs().max().item(),
                      name="fp32 grad")


@pytest.mark.parametrize("scale", [20.0, 60.0, 1e3, 1e5])
@pytest.mark.parametrize("device", DEVICES)
def test_wide_logits_match_the_operator(scale, device):
    """Logits spanning more than kLinearSpread = 32 run the log domain: entries far below
    FLT_MIN in the linear domain, where it would divide 0 by 0. In float64 against the
    operator (log-domain throughout); in float32 against the float64 truth, under the
    twice-PyTorch's-own-error rule, as the fp32 operator loses digits of its own here."""
    torch.manual_seed(3)
    x = torch.randn(64, 4, 4, dtype=torch.float64, device=device) * scale
    w = torch.randn_like(x)
    truth, truth_grad = value_and_grad(fused, x, w)
    ref, ref_grad = value_and_grad(operator, x, w)
    assert torch.isfinite(truth).all() and torch.isfinite(truth_grad).all()
    tol = 1e-13 + 1e-15 * scale  # a potential of size `scale` holds ulp(scale) of error
    assert_close(truth, ref, atol=tol, name=f"H scale={scale}")
    assert_close(truth_grad, ref_grad, atol=tol * max(1.0, ref_grad.abs().max().item()),
                 rtol=1e-10, name=f"grad scale={scale}")
    out, grad = value_and_grad(fused, x.float(), w.float())
    lowp, lowp_grad = value_and_grad(paper_loop, x.float(), w.float())
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert_flash_rule(out, lowp, truth, floor=1e-6, name=f"fp32 H scale={scale}")
    # At large scales the problems are one-hot and the true gradient ~0 (1e-18 at 1e5), which
    # the loop gets exactly from exp underflowing to 0; the floor allows an fp32 ulp of the
    # incoming gradient w, what rounding g - exp(z) * sum(g) at exp(z) ~ 1 leaves.
    floor = max(1e-5 * truth_grad.abs().max().item(), 1e-7 * w.abs().max().item())
    assert_flash_rule(grad, lowp_grad, truth_grad, floor=floor, name=f"fp32 grad scale={scale}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_each_problem_is_its_own_whatever_its_neighbours(dtype, device):
    """Problems of both domains interleaved in one batch (so SIMD groups mix them) give exactly
    what each gives alone, and the switch at spread 32 is seamless: problems just under and
    just over it agree with the operator to the same precision."""
    torch.manual_seed(4)
    base = torch.rand(48, 4, 4, dtype=torch.float64, device=device)
    base = (base - base.amin((-1, -2), keepdim=True)) / (base.amax((-1, -2), keepdim=True)
                                                        - base.amin((-1, -2), keepdim=True))
    spread = torch.tensor([1.0, 31.9, 32.1, 200.0], dtype=torch.float64, device=device).repeat(12)
    x = (base * spread.view(-1, 1, 1)).to(dtype)
    w = torch.randn_like(x)
    out, grad = value_and_grad(fused, x, w)
    for b in range(0, 48, 5):
        alone, alone_grad = value_and_grad(fused, x[b:b + 1], w[b:b + 1])
        assert torch.equal(out[b:b + 1], alone) and torch.equal(grad[b:b + 1], alone_grad), b
    ref, ref_grad = value_and_grad(operator, x, w)
    if dtype == torch.float64:
        assert_close(out, ref, atol=1e-12, name="H")
        assert_close(grad, ref_grad, atol=1e-12 * ref_grad.abs().max().item(), rtol=1e-12,
                     name="grad")
    else:  # the fp32 operator loses digits at spread 200: judge both against float64
        truth, truth_grad = value_and_grad(operator, x.double(), w.double())
        assert_flash_rule(out, ref, truth, floor=1e-6, name="fp32 H")
        assert_flash_rule(grad, ref_grad, truth_grad, floor=1e-5 * truth_grad.abs().max().item(),
                          name="fp32 grad")


@pytest.mark.parametrize("device", DEVICES)
def test_masked_and_non_finite_logits_follow_the_operator(device):
    """-inf entries are masked as in the operator (default marginals: a line with no finite
    entry stays 0, the live lines keep the operator's targets); +inf or NaN make their own
    problem NaN and no other."""
    torch.manual_seed(5)
    x = torch.randn(8, 4, 4, dtype=torch.float64, device=device) * 2
    x[1, 0, 2] = -INF  # one masked entry
    x[2, 1, :] = -INF  # a dead row
    x[3, :, 3] = -INF  # a dead column
    x[4, 0, :] = -INF  # a dead row and a dead column
    x[4, :, 1] = -INF
    x[5] = -INF        # everything masked
    w = torch.randn_like(x)
    for dtype in (torch.float64, torch.float32):
        out, grad = value_and_grad(fused, x.to(dtype), w.to(dtype))
        ref, ref_grad = value_and_grad(operator, x.to(dtype), w.to(dtype))
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), dtype
        assert_close(out, ref, atol=tol, name=f"{dtype} H")
        assert_close(grad, ref_grad, atol=tol, rtol=tol, name=f"{dtype} grad")
        assert (out[2, 1] == 0).all() and (out[3, :, 3] == 0).all() and (out[5] == 0).all()
    y = torch.randn(4, 4, 4, device=device)
    y[1, 2, 3], y[2, 0, 0] = INF, float("nan")
    out = fused(y)
    assert out[1].isnan().all() and out[2].isnan().all()
    assert_close(out[[0, 3]], fused(y[[0, 3]]), atol=0, name="untouched problems")
    # A NaN or +inf alone in a masked row and column still spreads over its problem, at every
    # position (the NaN must not be lost in a line max).
    for bad in (float("nan"), INF):
        z = torch.randn(16, 4, 4, dtype=torch.float64, device=device)
        for p in range(16):
            i, j = divmod(p, 4)
            z[p, i, :] = -INF
            z[p, :, j] = -INF
            z[p, i, j] = bad
        assert fused(z).isnan().all() and fused(z.float()).isnan().all(), bad
        assert operator(z).isnan().all(), bad


@pytest.mark.parametrize("device", DEVICES)
def test_batch_shapes_strides_and_empty(device):
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64, device=device)
    assert_close(fused(x), paper_loop(x), atol=1e-14, rtol=1e-12, name="4-d batch")
    xt = x.transpose(-1, -2)  # not contiguous
    assert_close(fused(xt), paper_loop(xt), atol=1e-14, rtol=1e-12, name="strided")
    assert_close(fused(x[0, 0]), paper_loop(x[0, 0]), atol=1e-14, rtol=1e-12, name="(n, n)")
    empty = torch.randn(0, 4, 4, device=device, requires_grad=True)
    out = fused(empty)
    out.sum().backward()
    assert out.shape == (0, 4, 4) and empty.grad.shape == (0, 4, 4)


def test_rows_sum_to_one_and_columns_converge():
    """The last step is over rows: they sum to 1 to rounding; the columns within the
    convergence error of 20 iterations."""
    out = fused(torch.randn(4096, 4, 4))
    assert (out >= 0).all()
    assert (out.sum(-1) - 1).abs().max() < 1e-6
    assert (out.sum(-2) - 1).abs().max() < 1e-3


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def test_mhc_sinkhorn_routes_to_the_fused_kernel_where_it_applies():
    def ops_of(fn):
        with _RecordOps() as rec:
            fn()
        return rec.names

    x = torch.randn(6, 4, 4, requires_grad=True)
    assert "sinkhorn_ops::mhc_sinkhorn" in ops_of(lambda: ops.mhc_sinkhorn(x))
    assert "sinkhorn_ops::mhc_sinkhorn_backward" in ops_of(
        lambda: ops.mhc_sinkhorn(x).sum().backward())
    for other in (lambda: ops.mhc_sinkhorn(x, grad="implicit"),
                  lambda: ops.mhc_sinkhorn(x, iters=33),
                  lambda: ops.mhc_sinkhorn(torch.randn(2, 9, 9))):
        names = ops_of(other)
        assert "sinkhorn_ops::sinkhorn" in names and "sinkhorn_ops::mhc_sinkhorn" not in names
    y = torch.randn(5, 4, 4, dtype=torch.float64)
    assert_close(ops.mhc_sinkhorn(y, iters=33), paper_loop(y, 33), atol=1e-13, name="iters = 33")


def test_bad_arguments():
    x = torch.randn(4, 4)
    op = torch.ops.sinkhorn_ops.mhc_sinkhorn.default
    back = torch.ops.sinkhorn_ops.mhc_sinkhorn_backward.default
    cases = [
        (lambda: op(x.half(), 20), TypeError, "mhc_sinkhorn: expected logits of dtype float32 or float64.*Half"),
        (lambda: op(torch.randn(4, 3), 20), ValueError, r"mhc_sinkhorn: expected logits of shape \(\.\.\., n, n\), got \[4, 3\]"),
        (lambda: op(torch.randn(9, 9), 20), ValueError, "mhc_sinkhorn: expected 1 <= n <= 8.*got n = 9"),
        (lambda: op(x, 0), ValueError, "mhc_sinkhorn: expected 1 <= iters <= 32, got 0"),
        (lambda: op(x, 33), ValueError, "1 <= iters <= 32, got 33"),
        (lambda: back(x.double(), x, 20), TypeError, "mhc_sinkhorn_backward: expected grad of the logits' dtype Float, got Double"),
        (lambda: back(torch.randn(3, 4, 4), x, 20), ValueError, r"mhc_sinkhorn_backward: expected grad of the logits' shape \[4, 4\], got \[3, 4, 4\]"),
    ]
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fn()


def test_double_backward_differentiates_the_operator_it_equals():
    """Second order through the log-domain operator with 2 iters steps from the columns
    (tests/test_second_order.py checks it against the reference)."""
    x = torch.randn(2, 4, 4, requires_grad=True)
    (g,) = torch.autograd.grad(fused(x).pow(2).sum(), x, create_graph=True)
    assert "MhcSinkhornBackwardBackward" in g.grad_fn.name()
    (h,) = torch.autograd.grad(g.sin().sum(), x)
    assert torch.isfinite(h).all() and h.abs().max() > 0


def test_opcheck():
    x = torch.randn(6, 4, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.sinkhorn_ops.mhc_sinkhorn.default, (x, 20))
    torch.library.opcheck(torch.ops.sinkhorn_ops.mhc_sinkhorn_backward.default,
                          (torch.randn(6, 4, 4), x.detach(), 20))


def test_compile_fullgraph_dynamic():
    check_compiled_matches_eager(ops.mhc_sinkhorn)
