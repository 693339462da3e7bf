"""The fused mHC stream mixings (torch.ops.sinkhorn_ops.mhc_pre_mix / mhc_post_mix and their
backwards, csrc/mhc_mix_math.h) against the formulas of MATH.md section 4 written here in PyTorch:
values and every gradient in float64, the low-precision dtypes against float64 truth (twice
PyTorch's own error), channel counts around the SIMD width, broadcasting, bad arguments, opcheck
and torch.compile."""
import pytest
import torch
from conftest import DEVICES, assert_close, assert_flash_rule, load_ops

ops = load_ops()


def pre_reference(x, h_pre):
    return (h_pre.unsqueeze(-1) * x).sum(-2)


def post_reference(x, y, h_post, h_res):
    return (h_res.unsqueeze(-1) * x.unsqueeze(-3)).sum(-2) + h_post.unsqueeze(-1) * y.unsqueeze(-2)


def make(n, c, device, dtype=torch.float64, batch=(3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, c, generator=g, dtype=torch.float64)
    y = torch.randn(*batch, c, generator=g, dtype=torch.float64)
    hp = torch.rand(*batch, n, generator=g, dtype=torch.float64)
    hq = 2 * torch.rand(*batch, n, generator=g, dtype=torch.float64)
    hr = torch.rand(*batch, n, n, generator=g, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (x.to(device, dtype), y.to(device, dtype), hp.to(device, acc), hq.to(device, acc),
            hr.to(device, acc))


def grads(fn, inputs, upstream):
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad((out * upstream).sum(), leaves)


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("c", [1, 7, 16, 33, 100])
@pytest.mark.parametrize("device", DEVICES)
def test_float64_values_and_gradients(n, c, device):
    x, y, hp, hq, hr = make(n, c, device, seed=n * 100 + c)
    up_pre = torch.randn_like(y)
    out, got = grads(ops.mhc_branch_input, (x, hp), up_pre)
    ref, want = grads(pre_reference, (x, hp), up_pre)
    assert_close(out, ref, atol=1e-13, rtol=1e-12, name="pre")
    for name, a, b in zip(("dx", "dh_pre"), got, want):
        assert_close(a, b, atol=1e-12, rtol=1e-11, name=f"pre {name}")
    up_post = torch.randn_like(x)
    out, got = grads(ops.mhc_combine, (x, y, hq, hr), up_post)
    ref, want = grads(post_reference, (x, y, hq, hr), up_post)
    assert_close(out, ref, atol=1e-13, rtol=1e-12, name="post")
    for name, a, b in zip(("dx", "dy", "dh_post", "dh_res"), got, want):
        assert_close(a, b, atol=1e-12, rtol=1e-11, name=f"post {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_within_twice_pytorchs_error(dtype, device):
    n, c = 4, 300
    truth = make(n, c, device, batch=(64,), seed=1)
    low = make(n, c, device, dtype=dtype, batch=(64,), seed=1)
    up_pre = torch.randn(64, c, dtype=torch.float64, device=device)
    up_post = torch.randn(64, n, c, dtype=torch.float64, device=device)
    floor = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    for fn, ref_fn, idx, up in ((ops.mhc_branch_input, pre_reference, (0, 2), up_pre),
                                (ops.mhc_combine, post_reference, (0, 1, 3, 4), up_post)):
        t_out, t_grads = grads(ref_fn, [truth[i] for i in idx], up)
        # PyTorch's own error: the reference formula run on the low-precision inputs in their
        # dtype (the mappings cast to it, as the unfused path does).
        low_in = [low[i].to(dtype) for i in idx]
        r_out, r_grads = grads(ref_fn, low_in, up.to(dtype))
        out, got = grads(fn, [low[i] for i in idx], up.to(dtype))
        assert out.dtype == dtype
        assert_flash_rule(out, r_out, t_out, floor=floor, name=f"{fn.__name__} {dtype}")
        for k, (a, r, t) in enumerate(zip(got, r_grads, t_grads)):
            scale = t.abs().max().item()
            assert_flash_rule(a, r, t, floor=floor * scale, name=f"{fn.__name__} grad {k}")


def low_precision_rounding_case(dtype, device, channels=85):
    """(x, h, want) with x of shape (4, 1, channels) in dtype: specials (±0, ±inf, NaN, the
    largest and smallest normal values, a subnormal), random values and ties of the rounding;
    want = round(h x) from fp32 by torch's own conversion. With n = 1 the pre mix is that one
    fp32 product, so the kernel must match it bit for bit."""
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), info.max,
                            -info.max, info.tiny, -info.tiny, info.tiny / 4, 1.0,
                            1.0 + info.eps, 1.0 + 3 * info.eps])
    g = torch.Generator().manual_seed(5)
    rest = torch.randn(4 * channels - special.numel(), generator=g) * 4
    x = torch.cat([special, rest]).to(dtype).view(4, 1, channels)
    # fp32 products with ties, and a NaN whose payload is all ones (its products keep it on
    # the CPU): rounded as a number, it would carry into the sign and read -0.
    nan_payload = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    h = torch.cat([torch.tensor([1.5, 1.0 / 3.0, 0.75 + 2.0 ** -20]), nan_payload]).view(4, 1)
    want = (h.unsqueeze(-1) * x.float()).to(dtype)[:, 0]
    return x.to(device), h.to(device), want.to(device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_rounding_is_torchs(dtype, device):
    """The kernels' conversions (SIMD ones on the CPU) read and round exactly as torch does,
    over whole vectors and the tail (85 channels)."""
    x, h, want = low_precision_rounding_case(dtype, device)
    assert_same_bits(ops.mhc_branch_input(x, h), want)


def assert_same_bits(got, want):
    """Bit for bit (the sign of zero included), except that NaNs need only be NaNs: the F16C
    instructions keep payload bits that torch's fp16 conversion drops."""
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaNs in different places"
    bits = torch.int16
    mismatch = (got.view(bits) != want.view(bits)) & ~nan
    assert not mismatch.any(), (f"{int(mismatch.sum())} values differ, e.g. "
                                f"{got[mismatch][:4].tolist()} != {want[mismatch][:4].tolist()}")


@pytest.mark.parametrize("device", DEVICES)
def test_broadcast_mappings_and_strided_streams(device):
    x, y, hp, hq, hr = make(4, 24, device, batch=(2, 3))
    shared = hr[0, 0]  # one (n, n) matrix for every token
    assert_close(ops.mhc_combine(x, y, hq, shared),
                 post_reference(x, y, hq, shared.expand(2, 3, 4, 4)), atol=1e-13, name="h_res")
    streams = x.transpose(0, 1)  # not contiguous
    assert_close(ops.mhc_branch_input(streams, hp.transpose(0, 1)),
                 pre_reference(streams, hp.transpose(0, 1)), atol=1e-13, name="strided")
    h = torch.randn(2, 24, device=device, dtype=torch.float64)
    expanded = h.unsqueeze(-2).expand(2, 4, 24)  # expand_streams: a stride-0 view
    leaf = h.clone().requires_grad_(True)
    ops.mhc_branch_input(leaf.unsqueeze(-2).expand(2, 4, 24), hp[0, :2]).sum().backward()
    assert_close(leaf.grad, hp[0, :2].sum(-1, keepdim=True).expand(2, 24), atol=1e-13,
                 name="grad through expand")
    assert_close(ops.mhc_branch_input(expanded, hp[0, :2]), pre_reference(expanded, hp[0, :2]),
                 atol=1e-13, name="expanded")


def test_empty_shapes():
    for shape in ((0, 4, 8), (3, 4, 0)):
        x = torch.randn(shape, requires_grad=True)
        h = torch.rand(shape[0], 4, requires_grad=True)
        out = ops.mhc_branch_input(x, h)
        out.sum().backward()
        assert out.shape == (shape[0], shape[2]) and torch.equal(h.grad, torch.zeros_like(h))


def test_beyond_the_kernel_runs_pytorch():
    x, y, hp, hq, hr = make(9, 5, "cpu")
    assert_close(ops.mhc_combine(x, y, hq, hr), post_reference(x, y, hq, hr), atol=1e-13,
                 name="n = 9")


def test_bad_arguments():
    x = torch.randn(2, 4, 8)
    pre = torch.ops.sinkhorn_ops.mhc_pre_mix.default
    post = torch.ops.sinkhorn_ops.mhc_post_mix.default
    back = torch.ops.sinkhorn_ops.mhc_post_mix_backward.default
    h4, r4, y = torch.rand(2, 4), torch.rand(2, 4, 4), torch.randn(2, 8)
    cases = [
        (lambda: pre(x.int(), h4), TypeError, "mhc_pre_mix: expected x of dtype float32, float64, float16 or bfloat16, got Int"),
        (lambda: pre(torch.randn(8), h4), ValueError, r"mhc_pre_mix: expected x of shape \(\.\.\., n, C\)"),
        (lambda: pre(torch.randn(2, 9, 8), torch.rand(2, 9)), ValueError, "1 <= n <= 8 streams"),
        (lambda: pre(x, h4.double()), TypeError, "mhc_pre_mix: expected h_pre of dtype Float, got Double"),
        (lambda: pre(x, torch.rand(2, 3)), ValueError, r"mhc_pre_mix: expected h_pre of shape \[2, 4\], got \[2, 3\]"),
        (lambda: post(x, torch.randn(2, 7), h4, r4), ValueError, r"mhc_post_mix: expected y of shape \[2, 8\], got \[2, 7\]"),
        (lambda: post(x, y.double(), h4, r4), TypeError, "expected y of dtype Float, got Double"),
        (lambda: post(x, y, h4, torch.rand(2, 4, 3)), ValueError, r"expected h_res of shape \[2, 4, 4\]"),
        (lambda: back(torch.randn(2, 8), x, y, h4, r4), ValueError, r"mhc_post_mix_backward: expected grad of shape \[2, 4, 8\], got \[2, 8\]"),
    ]
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fn()


def test_double_backward_goes_through_the_aten_form():
    """Second order (tests/test_second_order.py checks the values by gradgradcheck)."""
    x = torch.randn(2, 4, 8, requires_grad=True)
    h = torch.rand(2, 4)
    (g,) = torch.autograd.grad(ops.mhc_branch_input(x, h).square().sum(), x, create_graph=True)
    (hx,) = torch.autograd.grad(g.sin().sum(), x)
    assert torch.isfinite(hx).all() and hx.abs().max() > 0


def test_opcheck():
    x, y, hp, hq, hr = make(4, 19, "cpu", dtype=torch.float32, batch=(6,))
    for t in (x, y, hp, hq, hr):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.sinkhorn_ops.mhc_pre_mix.default, (x, hp))
    torch.library.opcheck(torch.ops.sinkhorn_ops.mhc_post_mix.default, (x, y, hq, hr))
    torch.library.opcheck(torch.ops.sinkhorn_ops.mhc_pre_mix_backward.default,
                          (y.detach(), x.detach(), hp.detach()))
    torch.library.opcheck(torch.ops.sinkhorn_ops.mhc_post_mix_backward.default,
                          (x.detach(), x.detach(), y.detach(), hq.detach(), hr.detach()))


def test_compile_fullgraph_dynamic():
    def layer(x, y, hq, hr, hp):
        return ops.mhc_combine(x, y, hq, hr).square().sum() + ops.mhc_branch_input(x, hp).sum()

    fn = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for tokens in (5, 9):
        inputs = [t.requires_grad_(True) for t in make(4, 12, "cpu", dtype=torch.float32,
                                                        batch=(tokens,), seed=tokens)]
        hp = inputs.pop(2)
        fn(*inputs, hp).backward()
        leaves = [t.detach().requires_grad_(True) for t in (*inputs, hp)]
        layer(*leaves).backward()
        for a, b in zip((*inputs, hp), leaves):
            assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, name="compiled grad")
