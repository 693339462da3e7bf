"""The forward operator against the float64 reference (MATH.md section 1): sizes, batch shapes,
steps, start axis, dtypes (FlashAttention's 2x rule), early stopping, invariances and masks."""

import math

import pytest
import torch
from conftest import (
    ACC_FLOOR,
    DEVICES,
    ERROR_FLOOR_PER_UNIT_MASS,
    LOW_PRECISION,
    PLAN_FLOOR,
    TOLERANCES,
    accumulation_dtype,
    assert_close,
    assert_flash_rule,
    assert_result_close,
    load_ops,
    ot_problem,
    random_marginals,
    random_scores,
)
from conftest import reference_cpu as reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sinkhorn_ops = load_ops()

# Odd sizes plus both sides of every kernel boundary: the CPU tiny path (n, m <= 16) and its
# 16-wide vector loops, the CUDA block-size buckets at n * m = 1024, 4096 and 16384.
SIZES = [
    (1, 1), (1, 5), (5, 1), (2, 3), (3, 2), (4, 4), (5, 16), (16, 5), (16, 17), (17, 16),
    (31, 33), (33, 31), (32, 32), (32, 33), (64, 64), (127, 3), (3, 127), (128, 128),
    (129, 128), (257, 16), (257, 257),
]  # fmt: skip


def run(scores, a=None, b=None, **kwargs):
    return sinkhorn_ops.sinkhorn(scores, a, b, return_potentials=True, **kwargs)


@pytest.mark.parametrize("n,m", SIZES)
@pytest.mark.parametrize("start", ["row", "col"])
@pytest.mark.parametrize("given_marginals", [False, True], ids=["default", "given"])
def test_matches_reference_float64(device, n, m, start, given_marginals):
    S = random_scores((2, n, m), scale=2.0, seed=n * 1000 + m, device=device)
    a, b = (
        random_marginals((2,), n, m, seed=n + m, device=device) if given_marginals else (None, None)
    )
    out = run(S, a, b, steps=40, start=start)
    assert out.plan.device == S.device and out.f.device == S.device
    assert_result_close(
        out, reference(S, a, b, steps=40, start=start), dtype=torch.float64, name=f"{n}x{m}"
    )


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 7, 40])
@pytest.mark.parametrize("start", ["row", "col"])
def test_steps(device, steps, start):
    S = random_scores((3, 31, 33), scale=2.0, seed=steps, device=device)
    a, b = random_marginals((3,), 31, 33, seed=steps, device=device)
    out = run(S, a, b, steps=steps, start=start)
    assert_result_close(
        out,
        reference(S, a, b, steps=steps, start=start),
        dtype=torch.float64,
        name=f"steps={steps}",
    )
    assert torch.equal(out.steps.cpu(), torch.full((3,), steps))


@pytest.mark.parametrize("batch", [(), (1,), (3,), (2, 3), (2, 1, 2)], ids=str)
@pytest.mark.parametrize("n,m", [(5, 7), (33, 16)])
def test_batch_shapes(device, batch, n, m):
    S = random_scores(batch + (n, m), seed=len(batch), device=device)
    a, b = random_marginals(batch, n, m, seed=3, device=device)
    for args in [(None, None), (a, b)]:
        out = run(S, *args, steps=7)
        assert out.plan.shape == S.shape
        assert out.f.shape == batch + (n,) and out.g.shape == batch + (m,)
        assert out.steps.shape == batch and out.error.shape == batch
        assert_result_close(
            out, reference(S, *args, steps=7), dtype=torch.float64, name=f"batch={batch}"
        )


def test_plain_return_is_the_plan(device):
    S = random_scores((2, 6, 5), seed=1, device=device)
    plan = sinkhorn_ops.sinkhorn(S, steps=9)
    assert isinstance(plan, torch.Tensor)
    full = sinkhorn_ops.sinkhorn(S, steps=9, return_potentials=True)
    assert torch.equal(plan, full.plan)
    assert type(full).__name__ == "SinkhornResult"
    assert full._fields == ("plan", "f", "g", "steps", "error")
    plan_, f, g, steps, error = full  # a plain tuple too
    for x, y in [(plan_, plan), (f, full.f), (g, full.g), (steps, full.steps), (error, full.error)]:
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("n,m", [(4, 4), (33, 31), (127, 64)])
@pytest.mark.parametrize("marginals", ["default", "acc_dtype", "same_dtype"])
def test_low_precision_flash_rule(device, dtype, n, m, marginals):
    """Error against the float64 truth <= 2 x the reference's own error in that dtype + floor."""
    S = random_scores((3, n, m), scale=2.0, seed=n + m, dtype=dtype, device=device)
    if marginals == "default":
        a = b = None
    else:
        mdtype = dtype if marginals == "same_dtype" else accumulation_dtype(dtype)
        a, b = random_marginals((3,), n, m, seed=n, dtype=mdtype, device=device)
    steps = 40
    out = run(S, a, b, steps=steps)
    assert out.plan.dtype == dtype
    assert out.f.dtype == out.g.dtype == out.error.dtype == accumulation_dtype(dtype)
    lowp = reference(S, a, b, steps=steps)
    wide = lambda t: None if t is None else t.double()
    truth = reference(S.double(), wide(a), wide(b), steps=steps)
    assert torch.equal(out.steps.cpu(), truth.steps)
    assert_flash_rule(out.plan, lowp.plan, truth.plan, floor=PLAN_FLOOR[dtype], name="plan")
    assert_flash_rule(out.f, lowp.f, truth.f, floor=ACC_FLOOR[dtype], name="f")
    assert_flash_rule(out.g, lowp.g, truth.g, floor=ACC_FLOOR[dtype], name="g")
    assert_flash_rule(
        out.error, lowp.error, truth.error, floor=ERROR_FLOOR_PER_UNIT_MASS * n, name="error"
    )
    # The last step (a column step) fixes the column sums up to the rounding of the plan.
    atol, rtol = TOLERANCES[dtype]
    target = truth.plan.sum(-2)
    assert_close(out.plan.double().sum(-2), target, atol=n * atol, rtol=rtol, name="column sums")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_one_row_step_is_softmax(device, dtype):
    S = random_scores((2, 3, 17, 29), scale=3.0, seed=5, dtype=dtype, device=device)
    plan = sinkhorn_ops.sinkhorn(S, steps=1, start="row")
    expected = torch.softmax(S.double(), dim=-1).to(dtype)
    atol, rtol = TOLERANCES[dtype]
    assert_close(plan, expected, atol=atol, rtol=rtol, name="softmax")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("start", ["row", "col"])
@pytest.mark.parametrize("n,m", [(12, 10), (40, 33)])
def test_early_stopping_per_problem(device, dtype, start, n, m):
    eps = [1.0, 0.3, 0.1, 0.04, 0.3]
    _, S, a, b = ot_problem((len(eps),), n, m, eps, seed=4, device=device)
    S, a, b = S.to(dtype), a.to(dtype), b.to(dtype)
    tol, steps = (1e-8 if dtype == torch.float64 else 1e-4), 400
    out = run(S, a, b, steps=steps, start=start, tol=tol)
    ref = reference(S, a, b, steps=steps, start=start, tol=tol)
    assert len(set(ref.steps.tolist())) >= 4, (
        f"test problems should stop at different steps: {ref.steps}"
    )
    assert int(ref.steps.max()) < steps
    assert_result_close(out, ref, dtype=dtype, name="early stop")
    assert bool((out.error.cpu() <= tol * a.sum(-1).cpu().to(out.error.dtype)).all())
    # Problems are independent: each alone stops where it stopped in the batch.
    for i in [0, 3]:
        alone = run(S[i], a[i], b[i], steps=steps, start=start, tol=tol)
        assert int(alone.steps) == int(out.steps[i])
        assert_close(alone.plan, out.plan[i], atol=0, name=f"problem {i} alone")


@pytest.mark.parametrize("n,m", [(4, 4), (5, 7)])
@pytest.mark.parametrize("steps,start", [(7, "row"), (15, "col"), (40, "col")])
def test_tiny_scaling_form_on_wide_scores_and_marginals(device, n, m, steps, start):
    """The tiny paths run most steps in the scaling form (K = exp(S + f (+) g) rescaled by
    multiplications). An entry of K that underflows (scores spanning over 80, marginals over 8
    decades) must not stay lost when later steps would scale it up: in fp32 the CPU path once
    returned a row 56x its marginal after a row step. Every problem against the float64
    reference on the same fp32-rounded inputs."""
    g = torch.Generator().manual_seed(n * 100 + steps)
    B = 2000
    S = torch.randn(B, n, m, generator=g) * 20
    a = torch.rand(B, n, generator=g) * 10 ** (torch.rand(B, n, generator=g) * 8 - 4)
    b = torch.rand(B, m, generator=g) * 10 ** (torch.rand(B, m, generator=g) * 8 - 4)
    b = b * a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True)
    W = torch.randn(B, n, m, generator=g, dtype=torch.float64)
    x = S.double().requires_grad_(True)
    want = reference(x, a.double(), b.double(), steps=steps, start=start).plan
    (want_grad,) = torch.autograd.grad((want * W).sum(), x)
    y = S.to(device).requires_grad_(True)
    got = sinkhorn_ops.sinkhorn(y, a.to(device), b.to(device), steps=steps, start=start)
    (got_grad,) = torch.autograd.grad((got * W.float().to(device)).sum(), y)
    got, got_grad, want = got.double().cpu(), got_grad.double().cpu(), want.detach()
    # fp32 potentials carry an absolute error of about eps x |S + f + g| (up to ~200 here).
    scale = want.abs().amax((-2, -1), keepdim=True)
    err = ((got - want).abs() / (want.abs() + 1e-30 * scale)).amax((-2, -1))
    assert err.max().item() <= 1e-3, ("plan", err.max().item(), err.argmax().item())
    # The backward replays the forward's steps (the CPU's in the scaling form too). Its terms
    # (P times the upstream, up to ~1e3) cancel to gradients as small as 1e-11: the rule is
    # FlashAttention's, per problem, against autograd through the reference in fp32.
    z = S.clone().requires_grad_(True)
    lowp = reference(z, a, b, steps=steps, start=start).plan
    (lowp_grad,) = torch.autograd.grad((lowp * W.float()).sum(), z)
    err = (got_grad - want_grad).abs().amax((-2, -1))
    ref_err = (lowp_grad.double() - want_grad).abs().amax((-2, -1))
    floor = 1e-6 * (want.abs().amax((-2, -1)) * W.abs().amax((-2, -1)))
    excess = err / (2 * ref_err + floor)
    assert excess.max().item() <= 1, ("grad", excess.max().item(), excess.argmax().item())


@pytest.fixture
def num_threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "batch,n,m",
    [
        (1, 300, 257),
        (1, 9, 4000),
        (3, 130, 70),
        (1, 16, 16),
        (15, 16, 9),
        (16, 4, 4),
        (17, 16, 16),
        (35, 5, 3),
    ],
)
def test_cpu_paths(num_threads, threads, batch, n, m):
    """The CPU solver splits work three ways: groups of 16 tiny problems (n, m <= 16, a partial
    last group), one problem per thread (B >= threads), threads inside one problem (B < threads).
    Problems of very different difficulty stop at different steps inside one group."""
    num_threads(threads)
    eps = torch.logspace(-1.5, 0, batch).tolist()
    _, S, a, b = ot_problem((batch,), n, m, eps, seed=batch + n)
    for given_marginals, tol, steps in [(True, 1e-7, 150), (False, 0.0, 12)]:
        args = (a, b) if given_marginals else (None, None)
        out = run(S, *args, steps=steps, tol=tol)
        ref = reference(S, *args, steps=steps, tol=tol)
        assert_result_close(out, ref, dtype=torch.float64, name=f"B={batch} {n}x{m} tol={tol}")
        if tol > 0 and batch > 2:
            assert len(set(ref.steps.tolist())) > 1, "problems should stop at different steps"


@pytest.mark.parametrize("steps", [0, 1, 5])
def test_early_stopping_edges(device, steps):
    _, S, a, b = ot_problem((3,), 5, 6, [1.0, 0.1, 0.5], seed=1, device=device)
    # A huge tolerance stops every problem at the first check (k = 1); steps = 0 runs nothing.
    for tol in [1e6, 1e-300]:
        out = run(S, a, b, steps=steps, tol=tol)
        ref = reference(S, a, b, steps=steps, tol=tol)
        assert_result_close(out, ref, dtype=torch.float64, name=f"tol={tol}")
    out = run(S, a, b, steps=steps, tol=1e6)
    assert torch.equal(out.steps.cpu(), torch.full((3,), min(steps, 1)))


def test_shift_invariance(device):
    S = random_scores((2, 9, 13), seed=2, device=device)
    row = random_scores((2, 9, 1), scale=20.0, seed=3, device=device)
    col = random_scores((2, 1, 13), scale=20.0, seed=4, device=device)
    for steps in [1, 4, 7]:
        base_row = run(S, steps=steps, start="row")
        base_col = run(S, steps=steps, start="col")
        # The first step absorbs a shift along its own axis exactly: the plan is unchanged and
        # the potential of that axis moves by minus the shift.
        shifted = run(S + row, steps=steps, start="row")
        assert_close(shifted.plan, base_row.plan, atol=1e-12, rtol=1e-10, name="row shift plan")
        assert_close(
            shifted.f, base_row.f - row.squeeze(-1), atol=1e-10, rtol=1e-10, name="row shift f"
        )
        shifted = run(S + col, steps=steps, start="col")
        assert_close(shifted.plan, base_col.plan, atol=1e-12, rtol=1e-10, name="col shift plan")
        assert_close(
            shifted.g, base_col.g - col.squeeze(-2), atol=1e-10, rtol=1e-10, name="col shift g"
        )
    converged = run(S, steps=400).plan
    assert_close(
        run(S + row + col, steps=400).plan, converged, atol=1e-10, name="both shifts at convergence"
    )


@pytest.mark.parametrize("start", ["row", "col"])
def test_permutation_equivariance(device, start):
    n, m = 11, 7
    S = random_scores((2, n, m), seed=8, device=device)
    a, b = random_marginals((2,), n, m, seed=8, device=device)
    gen = torch.Generator().manual_seed(0)
    p, q = torch.randperm(n, generator=gen).to(device), torch.randperm(m, generator=gen).to(device)
    out = run(S, a, b, steps=9, start=start, tol=1e-3)
    perm = run(S[:, p][:, :, q], a[:, p], b[:, q], steps=9, start=start, tol=1e-3)
    assert_close(perm.plan, out.plan[:, p][:, :, q], atol=1e-13, rtol=1e-12, name="plan")
    assert_close(perm.f, out.f[:, p], atol=1e-12, rtol=1e-12, name="f")
    assert_close(perm.g, out.g[:, q], atol=1e-12, rtol=1e-12, name="g")
    assert torch.equal(perm.steps, out.steps)
    assert_close(perm.error, out.error, atol=1e-12, rtol=1e-10, name="error")


@pytest.mark.parametrize("start", ["row", "col"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padding_masks_are_exact(device, start, dtype):
    n, m = 33, 17
    sizes = [(33, 17), (5, 9), (1, 3), (20, 1), (32, 16)]
    S = random_scores((len(sizes), n, m), seed=6, dtype=dtype, device=device)
    mask = torch.zeros(len(sizes), n, m, dtype=torch.bool)
    for i, (r, c) in enumerate(sizes):
        mask[i, :r, :c] = True
    mask = mask.to(device)
    out = run(S, mask=mask, steps=300, start=start)
    assert_result_close(
        out, reference(S, mask=mask, steps=300, start=start), dtype=dtype, name="masked"
    )
    atol, rtol = TOLERANCES[dtype]
    for i, (r, c) in enumerate(sizes):
        block = run(S[i, :r, :c], steps=300, start=start)
        assert_close(out.plan[i, :r, :c], block.plan, atol=atol, rtol=rtol, name=f"block {i}")
        assert bool((out.plan[i][~mask[i]] == 0).all()), f"problem {i}: masked entries are not zero"
        assert bool((out.f[i, r:] == 0).all() and (out.g[i, c:] == 0).all()), (
            f"problem {i}: dead potentials"
        )
        rows, cols = out.plan[i, :r, :c].double().sum(-1), out.plan[i, :r, :c].double().sum(-2)
        assert_close(rows, torch.ones_like(rows), atol=100 * atol, name=f"problem {i} rows")
        assert_close(cols, torch.full_like(cols, r / c), atol=100 * atol, name=f"problem {i} cols")


def test_mask_broadcasting_and_minus_inf(device):
    B, n, m = 3, 8, 10
    S = random_scores((B, n, m), seed=10, device=device)
    gen = torch.Generator().manual_seed(10)
    key_padding = (torch.arange(m) < torch.tensor([10, 6, 3])[:, None]).reshape(B, 1, m).to(device)
    shared = (torch.rand(n, m, generator=gen) > 0.3).to(device)
    causal = torch.ones(n, m, dtype=torch.bool).tril(diagonal=2).to(device)
    for name, mask in [("key padding", key_padding), ("shared", shared), ("banded", causal)]:
        out = run(S, mask=mask, steps=12)
        assert_result_close(out, reference(S, mask=mask, steps=12), dtype=torch.float64, name=name)
        as_inf = run(S.masked_fill(~mask, -math.inf), steps=12)
        assert_result_close(as_inf, out, dtype=torch.float64, name=f"{name} as -inf")
        assert bool(
            torch.isfinite(out.plan).all()
            and torch.isfinite(out.f).all()
            and torch.isfinite(out.g).all()
        )


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batch=st.lists(st.integers(1, 3), max_size=2).map(tuple),
    n=st.integers(1, 6),
    m=st.integers(1, 6),
    steps=st.integers(0, 12),
    start=st.sampled_from(["row", "col"]),
    given_marginals=st.booleans(),
    scale=st.floats(0.01, 8.0),
    tol=st.sampled_from([0.0, 0.0, 1e-2, 1e-6]),
    mask_density=st.sampled_from([None, 0.5, 0.8]),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("dev", DEVICES)
def test_property_matches_reference(
    dev, batch, n, m, steps, start, given_marginals, scale, tol, mask_density, seed
):
    S = random_scores(batch + (n, m), scale=scale, seed=seed, device=dev)
    a, b = random_marginals(batch, n, m, seed=seed, device=dev) if given_marginals else (None, None)
    mask = None
    if mask_density is not None and not given_marginals:
        gen = torch.Generator().manual_seed(seed)
        mask = (torch.rand(batch + (n, m), generator=gen) < mask_density).to(dev)
    kwargs = {"mask": mask, "steps": steps, "start": start, "tol": tol}
    out = run(S, a, b, **kwargs)
    assert_result_close(out, reference(S, a, b, **kwargs), dtype=torch.float64, name="property")
    assert bool(torch.isfinite(out.plan).all())


CUDA_PATH_SCRIPT = r"""
import torch, sinkhorn_ops
from sinkhorn_ops.reference import sinkhorn_reference
torch.manual_seed(0)
# Both sides of the tiny path's limits: padding to 4 (4x4, 3x4), to 8 (5x4, 8x8), none (9x8).
for n, m in [(4, 4), (3, 4), (5, 4), (8, 8), (8, 1), (9, 8)]:
    for kw in (dict(steps=40, start="col"), dict(steps=300, tol=1e-5)):
        S = torch.randn(300, n, m, dtype=torch.float64) * 2
        S[0, 0, :] = float("-inf")
        for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
            r = sinkhorn_ops.sinkhorn(S.to(dtype).cuda(), return_potentials=True, **kw)
            ref = sinkhorn_reference(S, **kw)
            err = (r.plan.double().cpu() - ref.plan).abs().max().item()
            assert err <= tol, (n, m, kw, dtype, err)
            assert (r.steps.cpu() - ref.steps).abs().max().item() <= (1 if kw.get("tol") else 0)
            # The backward: the tiny path takes max steps <= 64 (the first kw), the block path
            # the rest; both against autograd through the reference.
            if kw.get("tol"):
                continue
            W = torch.randn_like(S)
            x = S.clone().requires_grad_(True)
            want = torch.autograd.grad((sinkhorn_reference(x, **kw).plan * W).sum(), x)[0]
            y = S.to(dtype).cuda().requires_grad_(True)
            got = torch.autograd.grad((sinkhorn_ops.sinkhorn(y, **kw) * W.to(dtype).cuda()).sum(), y)[0]
            # Problem 0 has an empty row, where autograd through the reference gives NaN.
            scale = max(want[1:].abs().max().item(), 1e-3)  # 8 x 1 converges to a constant P
            gerr = (got[1:].double().cpu() - want[1:]).abs().max().item() / scale
            assert torch.isfinite(got).all(), (n, m, kw, dtype, "non-finite grad")
            assert gerr <= 10 * tol, (n, m, kw, dtype, "grad", gerr)
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("path", ["auto", "block"])
def test_cuda_tiny_and_block_paths_match_the_reference(path):
    """The CUDA tiny paths (n, m <= 8, a thread per problem; the backward also needs steps <= 64)
    and, forced by SINKHORN_CUDA_FORWARD=block and SINKHORN_CUDA_BACKWARD=block, the block paths
    on the same sizes. The variables are read once per process, hence the subprocess."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, SINKHORN_CUDA_FORWARD=path, SINKHORN_CUDA_BACKWARD=path)
    out = subprocess.run([sys.executable, "-c", CUDA_PATH_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


CUDA_STAGING_SCRIPT = r"""
import torch, sinkhorn_ops
from sinkhorn_ops.reference import sinkhorn_reference
torch.manual_seed(0)
# 33x65 .. 128x128 fp32 fit in shared memory (staged); 200x300 fp32 (234 KB) does not.
for n, m in [(33, 65), (70, 100), (128, 128), (200, 300)]:
    S = torch.randn(3, n, m, dtype=torch.float64) * 2
    S[0, 1, :] = float("-inf")
    W = torch.randn_like(S)
    kw = dict(steps=9, start="row")
    x = S.clone().requires_grad_(True)
    ref = sinkhorn_reference(x, **kw).plan
    want = torch.autograd.grad((ref * W).sum(), x)[0]
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.bfloat16, 5e-2)]:
        y = S.to(dtype).cuda().requires_grad_(True)
        plan = sinkhorn_ops.sinkhorn(y, **kw)
        got = torch.autograd.grad((plan * W.to(dtype).cuda()).sum(), y)[0]
        err = (plan.double().cpu() - ref.detach()).abs().max().item()
        gerr = ((got.double().cpu() - want)[1:].abs().max() / want[1:].abs().max()).item()
        assert err <= tol and gerr <= 10 * tol, (n, m, dtype, err, gerr)
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("smem", ["1", "0"])
def test_cuda_block_kernels_with_and_without_shared_memory_staging(smem):
    """The block kernels read S from shared memory when it fits; SINKHORN_CUDA_SMEM=0 makes them
    read global memory. Both against the reference, forward and backward, on both sides of the
    size limit (read once per process, hence the subprocess)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, SINKHORN_CUDA_SMEM=smem)
    out = subprocess.run([sys.executable, "-c", CUDA_STAGING_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,m,given,tol", [(1024, 1024, False, 0.0), (1100, 1000, True, 1e-5),
                                           (16, 65537, False, 0.0), (1 << 16, 20, True, 1e-5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_large_path_matches_the_cpu_operator(n, m, given, tol, dtype):
    """n * m >= 2^20 takes the CUDA large-problem paths (a few whole-GPU kernels per step, the
    backward composed of ATen ops): masks (an empty row and column), given marginals,
    per-problem early stopping, against the CPU operator in float64. The short, wide shape takes
    the row pass in chunks (65 of 1009 columns, the last one shorter); the tall, narrow one the
    column pass with several threads a column."""
    g = torch.Generator().manual_seed(n + m)
    S = torch.randn(2, n, m, generator=g, dtype=torch.float64) * 2
    S[0, 3, :] = float("-inf")
    S[1, :, 5] = float("-inf")
    a = b = None
    if given:
        a = torch.rand(2, n, generator=g, dtype=torch.float64) + 0.5
        b = torch.rand(2, m, generator=g, dtype=torch.float64) + 0.5
        b = b * (a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True))
    kw = dict(steps=300 if tol else 41, start="col", tol=tol)
    # The reference takes the scores as rounded to dtype: the comparison isolates the kernel.
    want = sinkhorn_ops.sinkhorn(S.to(dtype).double(), a, b, return_potentials=True, **kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    got = sinkhorn_ops.sinkhorn(S.to(dtype).cuda(), *(None if t is None else t.to(acc).cuda()
                                                      for t in (a, b)),
                                return_potentials=True, **kw)
    tol_plan = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    scale = want.plan.abs().max().item()
    assert (got.plan.double().cpu() - want.plan).abs().max().item() <= tol_plan * max(scale, 1)
    steps_gap = (got.steps.cpu() - want.steps).abs().max().item()
    assert steps_gap <= (0 if dtype == torch.float64 or not tol else 5), (got.steps, want.steps)
    if dtype == torch.float64:
        assert torch.allclose(got.error.cpu(), want.error, rtol=1e-6, atol=1e-9)
    if dtype == torch.bfloat16:
        return
    # The unrolled backward of large problems (ATen ops per step on CUDA) against the CPU kernel.
    W = torch.randn(2, n, m, generator=g, dtype=torch.float64)
    x = S.to(dtype).double().requires_grad_(True)
    want_grad = torch.autograd.grad((sinkhorn_ops.sinkhorn(x, a, b, **kw) * W).sum(), x)[0]
    y = S.to(dtype).cuda().requires_grad_(True)
    ac, bc = (None if t is None else t.to(acc).cuda() for t in (a, b))
    loss = (sinkhorn_ops.sinkhorn(y, ac, bc, **kw) * W.to(dtype).cuda()).sum()
    got_grad = torch.autograd.grad(loss, y)[0]
    rel = (got_grad.double().cpu() - want_grad).abs().max() / want_grad.abs().max()
    assert rel.item() <= (1e-9 if dtype == torch.float64 else 1e-3), rel
