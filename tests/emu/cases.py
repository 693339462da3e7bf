"""The emulated CUDA kernels (torch.ops.sinkhorn_emu, see build.py) against the CPU operator.

Each case runs one operator of sinkhorn_emu and the same operator of sinkhorn_ops on the same CPU
inputs (same dtype), and compares every output within the dtype's tolerance. The CPU operator is
itself tested against the float64 reference, so a pass here means the CUDA kernel computes the
contract. CASES covers every CUDA path and both sides of its size limits: the tiny paths
(n, m <= 8), the block paths with and without shared-memory staging, the large-problem forward
(n * m >= 2^20: square, short and wide, tall and narrow) and the composite backward, the fused mHC
Sinkhorns (V4 and the paper's, both domains) and the stream mixings.

``python tests/emu/cases.py [substring]`` builds and loads the library, runs the cases whose name
contains the substring, and prints a line per failure; test_cuda_emulated.py runs them in pytest,
and again in subprocesses under the environment switches (forced block paths, no staging, the
reverse thread order), which the kernels read once per process.
"""
import math
import os
import sys

import torch

NEG_INF = float("-inf")
# Same-dtype comparisons, by the dtype of each output (the plan and grad_scores in the scores'
# dtype, the potentials, error and marginal gradients in the accumulation dtype): the two sides
# differ only in the order of their reductions, which low-precision outputs see as at most a
# rounding step or two (bf16: 2^-8, f16: 2^-11).
RTOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_close(got, want, what, floor=1e-3, atol=0.0):
    """|got - want| <= RTOL * (|want| + floor * max|want|) + atol, elementwise, and the same
    non-finite entries. floor: the share of the largest entry below which entries count as
    small (cancellations in gradients); atol: an absolute allowance (sums of many terms)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape,
                                                                 got.dtype, want.dtype)
    rtol = RTOL[want.dtype]
    got, want = got.double(), want.double()
    same_pattern = torch.equal(torch.isfinite(got), torch.isfinite(want)) and torch.equal(
        torch.isnan(got), torch.isnan(want))
    assert same_pattern, f"{what}: the non-finite entries differ"
    ok = torch.isfinite(want)
    if not ok.any():
        return
    g, w = got[ok], want[ok]
    allowed = rtol * (w.abs() + floor * w.abs().max()) + atol + 1e-300
    ratio = ((g - w).abs() / allowed).max().item()
    assert ratio <= 1, f"{what}: difference {ratio:.3g} x the allowed (rtol {rtol:g})"


def problem(B, n, m, dtype, seed, masked=False, given=False, nonfinite=False):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(B, n, m, generator=g, dtype=torch.float64) * 2
    if nonfinite:  # a NaN score in problem 0, a +inf in problem 1, two +inf in one row of 2
        S[0, n - 1, m // 3] = float("nan")  # not on the masked row n // 2
        S[1, 0, m - 1] = float("inf")
        S[2, n - 1, 0] = S[2, n - 1, m // 2] = float("inf")
    if masked:
        S[..., 0, 0] = NEG_INF
        if n > 1:
            S[0, n // 2, :] = NEG_INF  # an empty row
        if m > 1:
            S[-1, :, m // 2] = NEG_INF  # an empty column
    a = b = None
    if given:
        a = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.5
        b = torch.rand(B, m, generator=g, dtype=torch.float64) + 0.5
        b = b * (a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True))
        a, b = a.to(acc_of(dtype)), b.to(acc_of(dtype))
    return S.to(dtype), a, b


def emu():
    return torch.ops.sinkhorn_emu


def check_forward(B, n, m, dtype, steps=9, start="row", tol=0.0, masked=False, given=False,
                  seed=0, nonfinite=False):
    S, a, b = problem(B, n, m, dtype, seed, masked, given, nonfinite)
    args = (S, a, b, None, steps, start, tol)
    got = emu().sinkhorn(*args)
    want = torch.ops.sinkhorn_ops.sinkhorn(*args)
    # With tol, a low-precision problem may stop a step apart; its plan then differs by ~tol.
    steps_gap = (got[3] - want[3]).abs().max().item() if B else 0
    assert steps_gap <= (0 if dtype == torch.float64 or tol == 0 else 2), (got[3], want[3])
    if steps_gap:  # a step apart: the plans differ by about tol
        assert_close(got[0], want[0], "plan", atol=50 * tol)
        return
    assert_close(got[0], want[0], "plan")
    # Potentials are log-domain values: their error is absolute, about eps x the scores' size.
    finite = S.double()[torch.isfinite(S)]
    size = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    for k, name in ((1, "f"), (2, "g")):
        assert_close(got[k], want[k], name, atol=RTOL[got[k].dtype] * size)
    # An L1 sum over the rows or the columns of exp(LSE + potential), each term off by about
    # eps x the scores' size, relatively.
    eps = torch.finfo(got[4].dtype).eps
    assert_close(got[4], want[4], "error", atol=4 * max(n, m) * eps * size)


def check_backward(B, n, m, dtype, steps=9, start="row", masked=False, given=False,
                   potentials=False, seed=0):
    S, a, b = problem(B, n, m, dtype, seed, masked, given)
    # Problems that stopped early, after 1 to `steps` steps (the forward's early stopping).
    steps_used = 1 + torch.arange(B) % steps
    g = torch.Generator().manual_seed(seed + 1)
    W = torch.randn(B, n, m, generator=g, dtype=torch.float64).to(dtype)
    gf = gg = None
    if potentials:
        gf = torch.randn(B, n, generator=g, dtype=torch.float64).to(acc_of(dtype))
        gg = torch.randn(B, m, generator=g, dtype=torch.float64).to(acc_of(dtype))
    args = (W, gf, gg, S, a, b, None, steps_used, steps, start)
    got = emu().sinkhorn_backward_unrolled(*args)
    want = torch.ops.sinkhorn_ops.sinkhorn_backward_unrolled(*args)
    for name, x, y in zip(("grad_scores", "grad_a", "grad_b"), got, want):
        assert_close(x, y, name, floor=0.05)


def _unaligned(t):
    """A contiguous copy of t whose data starts one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    return flat.copy_(t.reshape(-1)).view(t.shape)


def check_mhc(kind, B, n, iters, dtype=torch.float32, scale=1.0, eps=1e-6, seed=0,
              unaligned=False):
    """unaligned: logits and grad off 16-byte boundaries (the kernels' element-wise loads)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, n, n, generator=g, dtype=torch.float64) * scale).to(dtype)
    if scale > 100:  # the paper kernel's log-domain twin, with a masked entry in problem 0
        x[0, 0, 0] = NEG_INF
    grad = torch.randn(B, n, n, generator=g, dtype=torch.float64).to(dtype)
    if unaligned:
        x, grad = _unaligned(x), _unaligned(grad)
        assert x.data_ptr() % 16 and grad.data_ptr() % 16
    extra = (eps,) if kind == "v4" else ()
    name = "mhc_v4_sinkhorn" if kind == "v4" else "mhc_sinkhorn"
    for suffix, args in (("", (x, iters) + extra), ("_backward", (grad, x, iters) + extra)):
        got = getattr(emu(), name + suffix)(*args)
        want = getattr(torch.ops.sinkhorn_ops, name + suffix)(*args)
        assert_close(got, want, name + suffix, floor=0.05)


def check_mappings(variant, T, n, iters=20, dtype=torch.float32, scale=1.0, seed=0,
                   unaligned=False, grads=(True, True, True)):
    """mHC's fused mappings, forward and backward; grads: which upstream gradients are given
    (the others are None, zeros to the kernel); unaligned: proj and the gradients off 16-byte
    boundaries (the element-wise loads)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    proj = rnd(T, 2 * n + n * n) * scale
    weights = [torch.tensor(v, dtype=dtype) for v in (0.7, -0.4, 1.3)]
    weights += [rnd(n), rnd(n), rnd(n, n)]
    upstream = [rnd(T, n), rnd(T, n), rnd(T, n, n)]
    if unaligned:
        proj, upstream = _unaligned(proj), [_unaligned(u) for u in upstream]
        assert proj.data_ptr() % 16
    upstream = [u if given else None for u, given in zip(upstream, grads)]
    tail = (iters, 1e-6, variant)
    for suffix, args in (("", (proj, *weights) + tail),
                         ("_backward", (*upstream, proj, *weights) + tail)):
        got = getattr(emu(), "mhc_mappings" + suffix)(*args)
        want = getattr(torch.ops.sinkhorn_ops, "mhc_mappings" + suffix)(*args)
        if suffix:  # (grad_proj, the six weights' gradients flattened): split for their bounds
            sizes = [1, 1, 1, n, n, n * n]
            got, want = ([r[0], *r[1].split(sizes)] for r in (got, want))
        atol = [0.0] * len(want)
        if suffix:  # the weights' gradients sum T tokens' terms, which may cancel
            gates = torch.tensor([0] * n + [1] * n + [2] * n * n)
            dz = want[0].double().abs() / torch.stack([w.double().abs() for w in weights[:3]])[gates]
            bound = [(dz * proj.double().abs())[:, gates == g].sum() for g in range(3)]
            bound += [dz[:, gates == g].sum(0).max() for g in range(3)]
            atol[1:] = [4 * RTOL[dtype] * b.item() for b in bound]
        for k, (u, v) in enumerate(zip(got, want)):
            assert_close(u, v, f"mhc_mappings{suffix}[{k}]", floor=0.05, atol=atol[k])


def check_coefficients(variant, T, n, C=6, dtype=torch.float32, x_dtype=None, iters=20, seed=0,
                       grads=(True, True, True)):
    """mHC's fused coefficients (the mappings kernel with the RMSNorm folded in), forward and
    backward; x in x_dtype (a lower precision is converted by the op), token 1 all zeros. The
    two sides share the ATen ops (norm, matmuls); the bounds follow the kernel's dL/dR, c and
    partials through them."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    D = n * C
    x = rnd(T, D) * 2
    x[1] = 0
    x = x.to(x_dtype or dtype)
    phis = [(rnd(D, k) / math.sqrt(D)).to(dtype) for k in (n, n, n * n)]
    weights = [torch.tensor(v, dtype=dtype) for v in (0.7, -0.4, 1.3)]
    weights += [rnd(n).to(dtype), rnd(n).to(dtype), rnd(n, n).to(dtype)]
    tail = (1e-6, iters, 1e-6, variant)
    args = (x, *phis, *weights) + tail
    got, want = emu().mhc_coefficients(*args), torch.ops.sinkhorn_ops.mhc_coefficients(*args)
    for k, (u, v) in enumerate(zip(got, want)):
        assert_close(u, v, f"mhc_coefficients[{k}]", floor=0.05)
    proj, norm = want[3], want[4]
    upstream = [rnd(T, n).to(dtype), rnd(T, n).to(dtype), rnd(T, n, n).to(dtype)]
    upstream = [u if given else None for u, given in zip(upstream, grads)]
    args = (*upstream, x, *phis, proj, norm, *weights) + tail
    got = emu().mhc_coefficients_backward(*args)
    want = torch.ops.sinkhorn_ops.mhc_coefficients_backward(*args)
    # Bounds from the CPU mappings backward on the normalised projections: dL/dy, then dL/dR
    # = r dL/dy and c = (dL/dy . y) r^2 / D, through |x|, |phi| and the weights' sums.
    r = torch.rsqrt(norm.double().square() / D + 1e-6).unsqueeze(-1)
    y = (proj.double() * r).to(dtype)
    grad_y, _ = torch.ops.sinkhorn_ops.mhc_mappings_backward(*upstream, y, *weights, iters,
                                                              1e-6, variant)
    grad_y, y = grad_y.double(), y.double()
    d_raw = (grad_y * r).abs()
    coef = (grad_y.abs() * y.abs()).sum(-1, keepdim=True) * r.square() / D
    ax, phi = x.double().abs(), torch.cat(phis, -1).double().abs()
    gates = torch.tensor([0] * n + [1] * n + [2] * n * n)
    alpha = torch.stack([w.double().abs() for w in weights[:3]])[gates]
    dz = grad_y.abs() / alpha
    flat = [(dz * y.abs())[:, gates == k].sum() for k in range(3)] + [dz.sum(0).max()]
    bound = [d_raw @ phi.T + coef * ax, ax.T @ d_raw, torch.stack(flat)]
    for k, (u, v) in enumerate(zip(got, want)):  # dL/dx, dL/d[phi_pre | phi_post | phi_res], flat
        atol = 16 * RTOL[dtype] * bound[k].max().item()
        if k == 0:
            atol += RTOL[v.dtype] * v.double().abs().max().item()  # dL/dx rounds to x's dtype
        assert_close(u, v, f"mhc_coefficients_backward[{k}]", floor=0.05, atol=atol)


def check_mix(T, n, C, dtype, seed=0, offset=0):
    """offset: each activation tensor starts that many elements into its storage (offset 1
    takes them off the 16-byte boundary the chunked kernels need)."""
    g = torch.Generator().manual_seed(seed)
    acc = acc_of(dtype)

    def rnd(*shape, dt=dtype):
        k = offset if dt == dtype else 0
        flat = torch.randn(math.prod(shape) + k, generator=g, dtype=torch.float64).to(dt)
        return flat[k:].view(shape)

    x, y, grad_pre, grad_post = rnd(T, n, C), rnd(T, C), rnd(T, C), rnd(T, n, C)
    h_pre, h_post, h_res = rnd(T, n, dt=acc), rnd(T, n, dt=acc), rnd(T, n, n, dt=acc)
    calls = [("mhc_pre_mix", (x, h_pre)), ("mhc_pre_mix_backward", (grad_pre, x, h_pre)),
             ("mhc_post_mix", (x, y, h_post, h_res)),
             ("mhc_post_mix_backward", (grad_post, x, y, h_post, h_res))]
    for name, args in calls:
        got = getattr(emu(), name)(*args)
        want = getattr(torch.ops.sinkhorn_ops, name)(*args)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for k, (u, v) in enumerate(zip(got, want)):
            assert_close(u, v, f"{name}[{k}]", floor=0.05)


F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
ALL = (F64, F32, F16, BF16)


def _cases():
    cases = []

    def add(name, fn, **kw):
        cases.append((name, fn, kw))

    # Tiny forward (a thread per problem, n, m <= 8; padded to 4 or 8), every dtype.
    for n, m in ((1, 1), (4, 4), (3, 7), (8, 8), (8, 1), (5, 4)):
        for dtype in ALL:
            for start in ("row", "col"):
                add(f"fwd-tiny-{n}x{m}-{dtype}-{start}", check_forward, B=133, n=n, m=m,
                    dtype=dtype, start=start, masked=True, seed=n * 10 + m)
        add(f"fwd-tiny-{n}x{m}-given-tol", check_forward, B=7, n=n, m=m, dtype=F64,
            steps=200, tol=1e-7, given=True)
    # Block forward: staged in shared memory (<= 96 KiB: 33x65 and 128x128 fp32, the latter over
    # the 48 KiB default), and not (200x300 fp32, 128x128 fp64: two such problems take the large
    # path by default, the block path under the forced-block variant); block sizes 32..512, with
    # columns shared by 2 to 16 threads (70x100, 128x128, 2000x20).
    for n, m in ((9, 12), (33, 65), (70, 100), (128, 128), (200, 300), (1, 700), (700, 1),
                 (4, 4100), (2000, 20), (37, 1100), (300, 2100)):
        for dtype in (F64, F32, BF16):
            add(f"fwd-block-{n}x{m}-{dtype}", check_forward, B=2, n=n, m=m, dtype=dtype,
                masked=True, seed=n + m)
        add(f"fwd-block-{n}x{m}-col-given-tol", check_forward, B=3, n=n, m=m, dtype=F64,
            steps=300, start="col", tol=1e-6, given=True)
        add(f"fwd-block-{n}x{m}-f16-tol", check_forward, B=2, n=n, m=m, dtype=F16, steps=60,
            tol=1e-3)
    # The large-problem forward at its natural size (n * m >= 2^20). The environment variant
    # SINKHORN_CUDA_FORWARD=large runs every fwd case on it, among them the short, wide 4x4100
    # (row pass in chunks), the tall, narrow 2000x20 (several threads a column), and 37x1100 and
    # 300x2100 (fused when SINKHORN_CUDA_FUSED=1, 1024 <= m <= 16384); a second variant adds
    # SINKHORN_CUDA_FUSED=1 and runs them all with fused iterations.
    add("fwd-natural-large-1024x1024", check_forward, B=1, n=1024, m=1024, dtype=F32, steps=3,
        start="col", masked=True)
    add("fwd-natural-large-1030x1030-f64-given-tol", check_forward, B=2, n=1030, m=1030,
        dtype=F64, steps=12, tol=1e-4, given=True)
    # Both sides of the boundaries: the large path at n * m = 2^20 (1023 x 1025 is one entry
    # short, on the block path with 34 problems, more than few: see below); under
    # SINKHORN_CUDA_FORWARD=large, the fusion at m = 1024 and m = 16384 (fp32; 8192 in fp64) and
    # the fused kernel's shapes (fused_shape: 128 | 256 threads at 2048 | 2049, 256 | 512 at
    # 4096 | 4097, 16 | 32 entries a thread at 8192 | 8193).
    add("fwd-natural-block-34x1023x1025", check_forward, B=34, n=1023, m=1025, dtype=F32,
        steps=2)
    # Few problems too large for shared memory also take the large path: at most a quarter as
    # many as SMs (132 in the emulation), each over the 96 KB staging limit (fp64 128 x 128 is
    # 128 KB). 33 problems go large, 34 stay on the block path; 64 x 64 fp64 (32 KB) stays there.
    add("fwd-natural-large-few-33x128x128-f64", check_forward, B=33, n=128, m=128, dtype=F64,
        steps=3)
    add("fwd-natural-block-many-34x128x128-f64", check_forward, B=34, n=128, m=128, dtype=F64,
        steps=3)
    add("fwd-natural-block-few-2x64x64-f64", check_forward, B=2, n=64, m=64, dtype=F64, steps=3)
    # Empty problems (every forced path must leave them alone), and an empty batch.
    for B, n, m in ((2, 0, 5), (2, 5, 0), (0, 3, 4)):
        add(f"fwd-empty-{B}x{n}x{m}", check_forward, B=B, n=n, m=m, dtype=F32, steps=4)
    for m in (1023, 1024, 2048, 2049, 4096, 4097, 8192, 8193, 16384, 16385):
        add(f"fwd-edge-3x{m}-f32", check_forward, B=2, n=3, m=m, dtype=F32, steps=5, seed=m)
    for m in (8192, 8193):
        add(f"fwd-edge-3x{m}-f64", check_forward, B=1, n=3, m=m, dtype=F64, steps=4, seed=m)
    # NaN and +inf scores (one problem each, and two +inf in one row) must spoil the same entries
    # as on the CPU, on every large pass (the fused pass's register LSE falls back to the online
    # pushes for them) and on the block path.
    for n, m in ((5, 2100), (40, 70)):
        add(f"fwd-nonfinite-4x{n}x{m}", check_forward, B=4, n=n, m=m, dtype=F32, steps=5,
            masked=True, nonfinite=True)
    # Unrolled backward: tiny (steps <= 64; float64 up to 4x4, larger float64 on the block path),
    # block, composite (large). Given marginals in float64 and bfloat16, the defaults in float32.
    for n, m in ((1, 1), (4, 4), (3, 7), (8, 8), (5, 4)):
        for dtype in (F64, F32, BF16):
            add(f"bwd-small-{n}x{m}-{dtype}", check_backward, B=131, n=n, m=m, dtype=dtype,
                masked=True, given=dtype != F32, potentials=True, seed=n + 3 * m)
        add(f"bwd-tiny-{n}x{m}-col-given-64", check_backward, B=5, n=n, m=m, dtype=F32,
            steps=64, start="col", given=True)
        add(f"bwd-{n}x{m}-65-steps", check_backward, B=5, n=n, m=m, dtype=F32, steps=65)
    for n, m in ((9, 12), (33, 65), (128, 128), (200, 300), (1, 700)):
        for dtype in (F64, F32, BF16):
            add(f"bwd-block-{n}x{m}-{dtype}", check_backward, B=2, n=n, m=m, dtype=dtype,
                masked=True, given=dtype != F32, potentials=True, seed=n * m)
        add(f"bwd-block-{n}x{m}-col-given", check_backward, B=2, n=n, m=m, dtype=F32,
            start="col", given=True, steps=8)
    add("bwd-natural-large-1024x1024", check_backward, B=1, n=1024, m=1024, dtype=F32, steps=4)
    # The composite's replay on the large path and its fused reverse steps at their natural size:
    # problems that ran 1, 2 and 3 steps, masked entries, given marginals, dL/df and dL/dg.
    add("bwd-natural-large-3x1000x1100-masked", check_backward, B=3, n=1000, m=1100, dtype=F32,
        steps=3, start="col", masked=True, given=True, potentials=True)
    # The fused mHC Sinkhorns: V4 (linear domain) and the paper's (linear, and the log-domain
    # twin on wide logits), n = 1..8, fp32 and fp64, 1 to 32 iterations.
    for kind in ("v4", "paper"):
        for n in (1, 2, 3, 4, 8):
            for dtype in (F32, F64):
                add(f"mhc-{kind}-{n}-{dtype}", check_mhc, kind=kind, B=300, n=n, iters=20,
                    dtype=dtype, seed=n)
            add(f"mhc-{kind}-{n}-iters-1", check_mhc, kind=kind, B=5, n=n, iters=1)
            add(f"mhc-{kind}-{n}-iters-32", check_mhc, kind=kind, B=5, n=n, iters=32)
        add(f"mhc-{kind}-wide", check_mhc, kind=kind, B=130, n=4, iters=20, scale=300.0)
        for dtype in (F32, F64):
            add(f"mhc-{kind}-4-{dtype}-unaligned", check_mhc, kind=kind, B=70, n=4, iters=20,
                dtype=dtype, unaligned=True)
    # mHC's fused mappings: both variants, n = 1..8, fp32 and fp64, 1 to 32 iterations, wide
    # logits (the paper's log-domain twin), unaligned rows, missing upstream gradients.
    for variant in ("paper", "v4"):
        for n in (1, 2, 3, 4, 8):
            for dtype in (F32, F64):
                add(f"mappings-{variant}-{n}-{dtype}", check_mappings, variant=variant, T=150,
                    n=n, dtype=dtype, seed=n)
            add(f"mappings-{variant}-{n}-iters-1", check_mappings, variant=variant, T=5, n=n,
                iters=1)
            add(f"mappings-{variant}-{n}-iters-32", check_mappings, variant=variant, T=5, n=n,
                iters=32)
        add(f"mappings-{variant}-4-unaligned", check_mappings, variant=variant, T=70, n=4,
            unaligned=True)
        for grads in ((True, False, False), (False, True, False), (False, False, True)):
            add(f"mappings-{variant}-4-grads-{''.join('1' if x else '0' for x in grads)}",
                check_mappings, variant=variant, T=20, n=4, grads=grads)
    add("mappings-paper-wide", check_mappings, variant="paper", T=130, n=4, scale=60.0)
    # The coefficients (the same kernels with the RMSNorm folded in): both variants, every n,
    # fp32 and fp64, bf16 streams, missing upstream gradients.
    for variant in ("paper", "v4"):
        for n in (1, 2, 4, 8):
            for dtype in (F32, F64):
                add(f"coefficients-{variant}-{n}-{dtype}", check_coefficients, variant=variant,
                    T=90, n=n, dtype=dtype, seed=n)
        add(f"coefficients-{variant}-4-bf16-streams", check_coefficients, variant=variant, T=40,
            n=4, x_dtype=torch.bfloat16)
        add(f"coefficients-{variant}-4-grads-001", check_coefficients, variant=variant, T=20, n=4,
            grads=(False, False, True))
    # The stream mixings, every n and dtype, C not a multiple of the vector width.
    for n in (1, 2, 3, 4, 8):
        for dtype in ALL:
            add(f"mix-{n}-{dtype}", check_mix, T=19, n=n, C=37, dtype=dtype, seed=n)
    add("mix-4-wide", check_mix, T=3, n=4, C=1031, dtype=F32)
    # C a multiple of every vector width (16-byte chunks a lane), one stride and several; and
    # the same with the tensors off the 16-byte boundary, which must take the channel loop.
    for n in (1, 2, 3, 4, 5, 8):
        for dtype in ALL:
            add(f"mix-chunked-{n}-{dtype}", check_mix, T=11, n=n, C=72, dtype=dtype, seed=n)
    for dtype in ALL:
        add(f"mix-chunked-wide-{dtype}", check_mix, T=3, n=4, C=1032, dtype=dtype)
        add(f"mix-chunked-offset-{dtype}", check_mix, T=5, n=4, C=72, dtype=dtype, offset=1)
    return cases


CASES = _cases()


def main(argv):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import build

    import sinkhorn_ops  # noqa: F401 (loads the CPU operator)

    build.load()
    pattern = argv[1] if len(argv) > 1 else ""
    ran = failed = 0
    for name, fn, kw in CASES:
        if pattern not in name:
            continue
        ran += 1
        try:
            fn(**kw)
        except Exception as exc:  # report every failure, not just the first
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
    print(f"{ran - failed} of {ran} cases passed")
    return 1 if failed or not ran else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
