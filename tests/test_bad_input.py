"""Argument checks (one table, every item), values that need validate=True, and the inputs at the
edge of the contract: empty dims, strides, masks that empty rows and columns, extreme logits."""

import math

import pytest
import torch
from conftest import (
    PLAN_FLOOR,
    TOLERANCES,
    assert_close,
    assert_flash_rule,
    assert_result_close,
    load_ops,
    random_marginals,
    random_scores,
)
from conftest import reference_cpu as reference

sinkhorn_ops = load_ops()

B, N, M = 2, 6, 4  # N / M exact in float16, so masses agree in every dtype


def run(scores, a=None, b=None, **kwargs):
    return sinkhorn_ops.sinkhorn(scores, a, b, return_potentials=True, **kwargs)


def _s(*shape, dtype=torch.float32):
    return lambda dev: torch.randn(shape, dtype=dtype, device=dev)


def _full(*shape, dtype=torch.float32, value=1.0):
    return lambda dev: torch.full(shape, value, dtype=dtype, device=dev)


def _b(*shape, dtype=torch.float32):
    return _full(
        *shape, dtype=dtype, value=N / M
    )  # the mass of _full(B, N): only one error at a time


def _mask(*shape, dtype=torch.bool):
    return lambda dev: torch.ones(shape, dtype=dtype, device=dev)


# id, scores, a, b, extra keyword arguments (tensors as device -> tensor), error type, argument.
BAD_ARGUMENTS = [
    ("scores_rank0", _s(), None, None, {}, ValueError, "scores"),
    ("scores_rank1", _s(5), None, None, {}, ValueError, "scores"),
    ("scores_int", lambda d: torch.ones(B, N, M, dtype=torch.int64, device=d), None, None, {}, TypeError, "scores"),
    ("scores_bool", lambda d: torch.ones(B, N, M, dtype=torch.bool, device=d), None, None, {}, TypeError, "scores"),
    ("scores_complex", _s(B, N, M, dtype=torch.complex64), None, None, {}, TypeError, "scores"),
    ("scores_not_tensor", lambda d: [[1.0, 2.0], [3.0, 4.0]], None, None, {}, TypeError, "scores"),
    ("a_last_dim", _s(B, N, M), _full(B, N - 1), _b(B, M), {}, ValueError, "a"),
    ("b_last_dim", _s(B, N, M), _full(B, N), _b(B, M + 1), {}, ValueError, "b"),
    ("a_batch", _s(B, N, M), _full(B + 1, N), _b(B, M), {}, ValueError, "a"),
    ("b_batch", _s(B, N, M), _full(B, N), _b(B + 1, M), {}, ValueError, "b"),
    ("a_extra_dims", _s(B, N, M), _full(3, B, N), _b(B, M), {}, ValueError, "a"),
    ("b_batch_4d", _s(3, B, N, M), _full(3, B, N), _b(2, B, M), {}, ValueError, "b"),
    ("a_rank0", _s(B, N, M), _full(), _b(B, M), {}, ValueError, "a"),
    ("a_dtype_f64_for_f32", _s(B, N, M), _full(B, N, dtype=torch.float64), _b(B, M), {}, TypeError, "a"),
    ("b_dtype_f32_for_f64", _s(B, N, M, dtype=torch.float64), _full(B, N, dtype=torch.float64), _b(B, M), {}, TypeError, "b"),
    ("a_dtype_bf16_for_f16", _s(B, N, M, dtype=torch.float16), _full(B, N, dtype=torch.bfloat16), _b(B, M, dtype=torch.float16), {}, TypeError, "a"),
    ("b_dtype_f16_for_f32", _s(B, N, M), _full(B, N), _b(B, M, dtype=torch.float16), {}, TypeError, "b"),
    ("a_int", _s(B, N, M), _full(B, N, dtype=torch.int64), _b(B, M), {}, TypeError, "a"),
    ("mask_float", _s(B, N, M), None, None, {"mask": _mask(B, N, M, dtype=torch.float32)}, TypeError, "mask"),
    ("mask_int", _s(B, N, M), None, None, {"mask": _mask(B, N, M, dtype=torch.int32)}, TypeError, "mask"),
    ("mask_shape", _s(B, N, M), None, None, {"mask": _mask(B, N, M + 1)}, ValueError, "mask"),
    ("mask_extra_dims", _s(B, N, M), None, None, {"mask": _mask(3, B, N, M)}, ValueError, "mask"),
    ("steps_negative", _s(B, N, M), None, None, {"steps": -1}, ValueError, "steps"),
    ("steps_float", _s(B, N, M), None, None, {"steps": 2.5}, TypeError, "steps"),
    ("tol_negative", _s(B, N, M), None, None, {"tol": -1e-3}, ValueError, "tol"),
    ("tol_nan", _s(B, N, M), None, None, {"tol": math.nan}, ValueError, "tol"),
    ("tol_inf", _s(B, N, M), None, None, {"tol": math.inf}, ValueError, "tol"),
    ("tol_str", _s(B, N, M), None, None, {"tol": "x"}, TypeError, "tol"),
    ("tol_none", _s(B, N, M), None, None, {"tol": None}, TypeError, "tol"),
    ("cg_tol_bool", _s(B, N, M), None, None, {"cg_tol": True}, TypeError, "cg_tol"),
    ("cg_max_iter_str", _s(B, N, M), None, None, {"cg_max_iter": "a"}, TypeError, "cg_max_iter"),
    ("cg_max_iter_float", _s(B, N, M), None, None, {"cg_max_iter": 1.7}, TypeError, "cg_max_iter"),
    ("start_rows", _s(B, N, M), None, None, {"start": "rows"}, ValueError, "start"),
    ("start_upper", _s(B, N, M), None, None, {"start": "ROW"}, ValueError, "start"),
    ("start_empty", _s(B, N, M), None, None, {"start": ""}, ValueError, "start"),
    ("a_on_meta", _s(B, N, M), lambda d: torch.ones(B, N, device="meta"), _b(B, M), {}, (ValueError, TypeError), "a"),
    ("b_on_meta", _s(B, N, M), _full(B, N), lambda d: torch.ones(B, M, device="meta"), {}, (ValueError, TypeError), "b"),
    ("mask_on_meta", _s(B, N, M), None, None, {"mask": lambda d: torch.ones(B, N, M, dtype=torch.bool, device="meta")}, (ValueError, TypeError), "mask"),
]  # fmt: skip


def _materialise(x, device):
    return x(device) if callable(x) else x


@pytest.mark.parametrize("validate", [False, True], ids=["plain", "validate"])
@pytest.mark.parametrize("case", BAD_ARGUMENTS, ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_argument(device, case, validate):
    _, scores, a, b, extra, error, argument = case
    kwargs = {k: _materialise(v, device) for k, v in extra.items()}
    with pytest.raises(error, match=rf"(?s)^sinkhorn: .*\b{argument}\b"):
        sinkhorn_ops.sinkhorn(
            _materialise(scores, device),
            _materialise(a, device),
            _materialise(b, device),
            validate=validate,
            **kwargs,
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("which", ["a", "b", "mask"])
def test_cpu_cuda_mismatch(which):
    S = torch.randn(B, N, M, device="cuda")
    args = {
        "a": torch.ones(B, N, device="cuda"),
        "b": torch.full((B, M), N / M, device="cuda"),
        "mask": None,
    }
    args[which] = torch.ones(B, N, M, dtype=torch.bool) if which == "mask" else args[which].cpu()
    with pytest.raises((ValueError, TypeError), match=rf"(?s)^sinkhorn: .*\b{which}\b"):
        sinkhorn_ops.sinkhorn(S, args["a"], args["b"], mask=args["mask"])


# Values only validate=True checks. Each case spoils problem 1 of three.
def _nan_scores(S, a, b):
    S[1, 2, 3] = math.nan


def _posinf_scores(S, a, b):
    S[1, 0, 0] = math.inf


def _zero_a(S, a, b):
    a[1, 2] = 0.0


def _negative_a(S, a, b):
    a[1, 0] = -1.0


def _inf_b(S, a, b):
    b[1, 3] = math.inf


def _nan_b(S, a, b):
    b[1, 1] = math.nan


def _zero_b(S, a, b):
    b[1, 4] = 0.0


def _mass_mismatch(S, a, b):
    b[1] *= 1.01


BAD_VALUES = [
    ("nan_scores", _nan_scores, "scores", False),
    ("posinf_scores", _posinf_scores, "scores", False),
    ("zero_a", _zero_a, "a", True),
    ("negative_a", _negative_a, "a", False),
    ("inf_b", _inf_b, "b", False),
    ("nan_b", _nan_b, "b", False),
    ("zero_b", _zero_b, "b", True),
    ("mass_mismatch", _mass_mismatch, "", True),
]


def _problem(device, dtype=torch.float64, n=6, m=7):
    S = random_scores((3, n, m), seed=1, dtype=dtype)
    a, b = random_marginals((3,), n, m, seed=1, dtype=dtype)
    return S, a, b


@pytest.mark.parametrize("case", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_validate_raises(device, case):
    _, spoil, argument, _ = case
    S, a, b = _problem(device)
    spoil(S, a, b)
    S, a, b = S.to(device), a.to(device), b.to(device)
    with pytest.raises(ValueError, match=rf"(?s)^sinkhorn: .*{argument}"):
        sinkhorn_ops.sinkhorn(S, a, b, validate=True)


@pytest.mark.parametrize("case", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
@pytest.mark.parametrize("tol", [0.0, 1e-6])
def test_without_validate_bad_values_are_contained(device, case, tol):
    """No crash; the other problems of the batch are unaffected; zero marginals and a mass
    mismatch still give a finite result whose last-fixed marginal is exact."""
    _, spoil, _, finite = case
    S, a, b = _problem(device)
    spoil(S, a, b)
    S, a, b = S.to(device), a.to(device), b.to(device)
    out = run(S, a, b, steps=25, tol=tol)
    for i in (0, 2):
        alone = run(S[i], a[i], b[i], steps=25, tol=tol)
        assert_result_close(
            type(out)(*(t[i] for t in out)), alone, dtype=torch.float64, name=f"problem {i}"
        )
    if finite:
        # A zero marginal gives the literal potential log 0 - LSE = -inf and a zero row; all
        # else is finite.
        for name, t in zip(out._fields, out):
            t = t.double()
            ok = torch.isfinite(t) | (torch.isneginf(t) if name in ("f", "g") else False)
            assert bool(ok.all()), f"{name} is not finite: {t}"
        ref = reference(S, a, b, steps=25, tol=tol)
        assert_result_close(out, ref, dtype=torch.float64, name="reference")
        # 25 steps from rows: the last is a row step, so row sums equal a, zeros included.
        assert_close(out.plan[1].sum(-1), a[1], atol=1e-12, rtol=1e-12, name="row sums")


def test_validate_accepts_valid_input(device):
    S, a, b = _problem(device)
    b = b * (1 + 1e-6)  # inside the relative 1e-4 mass tolerance
    S[0, 1, :3] = -math.inf  # -inf is a mask, not an error
    S, a, b = S.to(device), a.to(device), b.to(device)
    out = run(S, a, b, validate=True, steps=10)
    assert_result_close(out, run(S, a, b, steps=10), dtype=torch.float64, name="validate")
    mask = torch.ones(3, 6, 7, dtype=torch.bool, device=device)
    run(S.clone().fill_(1.0), mask=mask, validate=True, steps=2)  # defaults pass too


def test_masked_nan_is_ignored(device):
    S, _, _ = _problem(device)
    mask = torch.ones_like(S, dtype=torch.bool)
    mask[1, 2, 3] = False
    clean = run(S.to(device), mask=mask.to(device), steps=10)
    S[1, 2, 3] = math.nan
    dirty = run(S.to(device), mask=mask.to(device), steps=10, validate=True)
    assert_result_close(dirty, clean, dtype=torch.float64, name="masked NaN")


@pytest.mark.parametrize("kind", ["nan", "posinf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_inf_scores_do_not_leak(device, kind, dtype):
    S, _, _ = _problem(device, dtype=dtype, n=33, m=40)
    S[1, 5, 7] = math.nan if kind == "nan" else math.inf
    S = S.to(device)
    out = run(S, steps=15, tol=1e-4)
    for i in (0, 2):
        assert_result_close(
            type(out)(*(t[i] for t in out)),
            run(S[i], steps=15, tol=1e-4),
            dtype=dtype,
            name=f"problem {i}",
        )


@pytest.mark.parametrize("kind", ["nan", "posinf"])
@pytest.mark.parametrize("shape", [(3, 4, 4), (3, 33, 40), (2, 300, 260)], ids=str)
@pytest.mark.parametrize("start", ["row", "col"])
def test_nan_inf_score_makes_its_whole_problem_nan(device, kind, shape, start):
    """Without validate, a NaN or +inf score gives NaN over its problem's plan and potentials,
    never a finite plan that looks valid (before, a +inf score gave a plan entry of
    exp(88) = 1.7e38 in fp32, and a NaN one a single NaN entry)."""
    for dtype in (torch.float64, torch.float32):
        S = random_scores(shape, seed=2, dtype=dtype).to(device)
        S[1, 2, 3] = math.nan if kind == "nan" else math.inf
        out = run(S, steps=6, start=start)
        for name in ("plan", "f", "g"):
            t = getattr(out, name)
            assert bool(t[1].isnan().all()), f"{dtype} {name} of the spoiled problem: {t[1]}"
            assert bool(t[0].isfinite().all()), f"{dtype} {name} of a clean problem"


@pytest.mark.parametrize(
    "shape", [(0, 4, 5), (2, 0, 5), (2, 4, 0), (0, 0), (3, 0, 0), (2, 0, 3, 4)], ids=str
)
@pytest.mark.parametrize("given_marginals", [False, True], ids=["default", "given"])
@pytest.mark.parametrize("tol", [0.0, 1e-3])
def test_empty_dims(device, shape, given_marginals, tol):
    S = torch.zeros(shape, dtype=torch.float32, device=device)
    *batch, n, m = shape
    batch = tuple(batch)
    a, b = (
        (torch.ones(batch + (n,), device=device), torch.ones(batch + (m,), device=device))
        if given_marginals
        else (None, None)
    )
    if given_marginals and n != m:
        b = b * (n / m) if m else b
    out = run(S, a, b, steps=3, tol=tol)
    assert out.plan.shape == shape and out.plan.dtype == S.dtype
    assert out.f.shape == batch + (n,) and out.g.shape == batch + (m,)
    assert out.steps.shape == batch and out.error.shape == batch
    for name, t in zip(out._fields, out):
        assert t.device == S.device, name
        assert bool(torch.isfinite(t.double()).all()), f"{name} is not finite"
    assert_result_close(
        out, reference(S, a, b, steps=3, tol=tol), dtype=torch.float32, name="empty"
    )


@pytest.mark.parametrize(
    "layout", ["transposed", "sliced", "expanded", "expanded_marginals", "expanded_mask"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_strided_inputs_match_contiguous(device, layout, dtype):
    n, m = 9, 13
    if layout == "transposed":
        S = random_scores((3, m, n), seed=2, dtype=dtype, device=device).transpose(-1, -2)
    elif layout == "sliced":
        S = random_scores((3, 2 * n, 3 * m + 1), seed=2, dtype=dtype, device=device)[:, ::2, 1::3]
    else:
        S = random_scores((1, n, m), seed=2, dtype=dtype, device=device).expand(3, n, m)
    a, b = random_marginals((3,), n, m, seed=2, dtype=dtype, device=device)
    mask = None
    if layout == "expanded_marginals":
        a, b = a[:1].expand(3, n), b[0]  # stride 0, and b broadcast by the operator
    elif layout == "sliced":
        a = torch.stack([a, a], -1)[..., 0]  # stride 2
    elif layout == "expanded_mask":
        mask = (torch.arange(m, device=device) < 10).expand(3, n, m)
    assert not S.is_contiguous()
    out = run(S, a, b, mask=mask, steps=11)
    expected = run(
        S.contiguous(),
        a.expand(3, n).contiguous(),
        b.expand(3, m).contiguous(),
        mask=None if mask is None else mask.contiguous(),
        steps=11,
    )
    assert_result_close(out, expected, dtype=dtype, name=layout)
    assert_result_close(
        out, reference(S, a, b, mask=mask, steps=11), dtype=dtype, name=f"{layout} vs reference"
    )


@pytest.mark.parametrize("start", ["row", "col"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fully_masked_rows_and_columns(device, start, dtype):
    n, m = 6, 7
    S = random_scores((3, n, m), seed=3, dtype=dtype, device=device)
    mask = torch.ones(3, n, m, dtype=torch.bool)
    mask[:, [1, 4], :] = False  # two dead rows
    mask[:, :, 2] = False  # one dead column
    mask[2] = False  # a fully masked problem
    S[0, 3, :] = -math.inf  # a dead row given by the scores themselves
    mask = mask.to(device)
    out = run(S, mask=mask, steps=301, start=start)
    for name, t in zip(out._fields, out):
        assert bool(torch.isfinite(t.double()).all()), f"{name} is not finite"
    assert_result_close(
        out, reference(S, mask=mask, steps=301, start=start), dtype=dtype, name="dead rows"
    )
    plan = out.plan.double().cpu()
    assert bool(
        (plan[:, [1, 4], :] == 0).all() and (plan[:, :, 2] == 0).all() and (plan[2] == 0).all()
    )
    assert bool((plan[0, 3] == 0).all())
    assert bool(
        (out.f[:, [1, 4]] == 0).all() and (out.g[:, 2] == 0).all() and (out.f[2] == 0).all()
    )
    atol = 100 * TOLERANCES[dtype][0]
    for i, rows in [(0, [0, 2, 5]), (1, [0, 2, 3, 5])]:
        cols = [0, 1, 3, 4, 5, 6]
        block = plan[i][rows][:, cols]
        assert_close(
            block.sum(-1), torch.ones(len(rows), dtype=torch.float64), atol=atol, name=f"{i} rows"
        )
        assert_close(
            block.sum(-2),
            torch.full((6,), len(rows) / 6, dtype=torch.float64),
            atol=atol,
            name=f"{i} cols",
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("start", ["row", "col"])
def test_extreme_logits(device, dtype, start):
    """Row and column offsets of +-1e4 overflow exp without the max shift; -1e4 entries are
    effectively masked. The result must be finite and reach the marginals."""
    n, m = 17, 17
    gen = torch.Generator().manual_seed(5)
    sign = lambda *s: torch.where(torch.rand(*s, generator=gen) < 0.5, -1.0, 1.0).double()
    S = 1e4 * (sign(2, n, 1) + sign(2, 1, m)) / 2 + torch.randn(
        2, n, m, generator=gen, dtype=torch.float64
    )
    S[:, 3, 5] = -1e4  # effectively masked
    S = S.to(dtype=dtype, device=device)
    out = run(S, steps=200, start=start)
    for name, t in zip(out._fields, out):
        assert bool(torch.isfinite(t.double()).all()), f"{name} is not finite"
    truth = reference(S.double(), steps=200, start=start)
    assert float(truth.error.max()) < 1e-6, "the test problem should converge"
    if dtype == torch.float64:
        assert_result_close(out, truth, dtype=dtype, name="extreme")
    else:
        assert_flash_rule(
            out.plan,
            reference(S, steps=200, start=start).plan,
            truth.plan,
            floor=PLAN_FLOOR[dtype],
            name="plan",
        )
    # float32 spacing near 1e4 is 1e-3, so S + f + g carries a relative error of that size.
    atol = 1e-9 if dtype == torch.float64 else 3e-3
    ones = torch.ones(2, n, dtype=torch.float64)
    assert_close(out.plan.double().sum(-1).cpu(), ones, atol=atol, name="row sums")
    assert_close(out.plan.double().sum(-2).cpu(), ones, atol=atol, name="column sums")


@pytest.mark.parametrize("start", ["row", "col"])
def test_float16_limits(device, start):
    """Scores near +-65504 in float16: the sums S + f + g leave the float16 range, so the operator
    must accumulate in float32; the plan stays finite and matches the float32-accumulated reference."""
    n, m = 8, 12
    gen = torch.Generator().manual_seed(7)
    pattern = torch.where(torch.rand(2, n, m, generator=gen) < 0.5, -65000.0, 65000.0)
    S = (pattern + 500 * torch.randn(2, n, m, generator=gen)).clamp(-65504, 65504)
    S[0, 0, 0], S[0, 1, 1], S[1, 2, 3] = 65504, -65504, -math.inf
    S = S.to(dtype=torch.float16, device=device)
    assert bool(torch.isfinite(S[S != -math.inf]).all())
    out = run(S, steps=41, start=start)
    for name, t in zip(out._fields, out):
        assert bool(torch.isfinite(t.double()).all()), f"{name} is not finite"
    # float32 has a spacing of 4e-3 near 65000, so compare with FlashAttention's rule.
    lowp, truth = reference(S, steps=41, start=start), reference(S.double(), steps=41, start=start)
    assert torch.equal(out.steps.cpu(), truth.steps)
    for name in ("plan", "f", "g", "error"):
        floor = PLAN_FLOOR[torch.float16] if name == "plan" else 1e-3
        assert_flash_rule(
            getattr(out, name), getattr(lowp, name), getattr(truth, name), floor=floor, name=name
        )
    # 41 steps: the last one fixes the start axis, whose default marginal is 1 per row (or n/m).
    sums = out.plan.double().sum(-1 if start == "row" else -2).cpu()
    assert_close(
        sums,
        torch.full_like(sums, 1.0 if start == "row" else n / m),
        atol=1e-2,
        name="fixed marginal",
    )


def test_implicit_backward_operator_checks_its_upstream_gradients(device):
    """The public implicit backward operator (also behind the C++ sinkhorn_backward): a grad_f
    of shape (3, 2) for (2, 3) was silently reshaped into wrong gradients, one of 5 values
    raised a reshape error naming neither the op nor the argument, an integer plan passed."""
    op = torch.ops.sinkhorn_ops.sinkhorn_backward_implicit
    plan = sinkhorn_ops.sinkhorn(torch.randn(2, 3, 4, device=device), steps=5)
    G = torch.randn(2, 3, 4, device=device)
    for name, args in (("grad_f", (torch.randn(3, 2, device=device), None)),
                       ("grad_f", (torch.randn(5, device=device), None)),
                       ("grad_g", (None, torch.randn(2, 3, device=device)))):
        with pytest.raises(ValueError, match=rf"^sinkhorn_backward_implicit: expected {name} of "
                                             rf"shape \[2, (3|4)\], got"):
            op(G, *args, plan, "implicit", 1e-6, 100)
    with pytest.raises(TypeError, match="sinkhorn_backward_implicit: expected a floating-point "
                                        "plan, got Long"):
        op(G, None, None, plan.long(), "implicit", 1e-6, 100)
    # numbers of other kinds still pass as the float and int options
    np = pytest.importorskip("numpy")
    sinkhorn_ops.sinkhorn(plan, tol=np.float32(1e-3), cg_max_iter=np.int64(5))
    sinkhorn_ops.sinkhorn(plan, tol=torch.tensor(1e-3))


def test_vmap_refuses_marginals_that_one_sample_refuses():
    """vmap behaves as a loop over the samples: a marginal with more batch dimensions than a
    sample's scores raised in eager mode, and vmap reshaped the scores up to it instead (a
    (5, 1, 1, 3, 4) result for five (3, 4) problems)."""
    S = torch.randn(5, 3, 4)
    for a, b in ((torch.ones(1, 1, 3), torch.full((1, 1, 4), 0.75)),
                 (torch.ones(2, 3), torch.full((2, 4), 0.75))):
        with pytest.raises(ValueError, match=r"sinkhorn: expected a of shape \(\.\.\., 3\) "
                                             r"broadcastable to \(3,\), got"):
            torch.func.vmap(lambda s: sinkhorn_ops.sinkhorn(s, a, b))(S)
    a, b = torch.ones(2, 3), torch.full((2, 4), 0.75)
    got = torch.func.vmap(lambda s: sinkhorn_ops.sinkhorn(s, a, b))(torch.randn(5, 2, 3, 4))
    assert got.shape == (5, 2, 3, 4)
    got = torch.func.vmap(lambda s: sinkhorn_ops.sinkhorn(s, a[0], b[0]))(S)
    assert_close(got, sinkhorn_ops.sinkhorn(S, a[0], b[0]), atol=1e-6, name="vmap == batch")
