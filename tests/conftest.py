"""Shared test machinery: devices, per-dtype tolerances, problem generators, the float64
reference (importable without the compiled extension) and an assert_close that shows the worst
mismatches."""

import contextlib
import importlib.util
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]



def pytest_runtest_logreport(report):
    """With SINKHORN_FAILURE_LOG set (benchmarks/gpu_check.sh), each failure's traceback is
    appended to that file as soon as the test ends: a run that its time limit kills (the GPU
    sessions') still names why each test failed, which pytest only prints at the end."""
    path = os.environ.get("SINKHORN_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as log:
            log.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n")


ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]

# Direct comparisons in one dtype (operator vs reference run on the same inputs): atol, rtol.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (8e-3, 1.6e-2),
}

# Absolute floor added to FlashAttention's rule (error <= 2 x the reference's own error in that
# dtype + floor), for the plan (scores.dtype) and for f, g, error (accumulation dtype, fp32).
# The reported error is a sum of n cancelling differences, so its floor scales with the mass n.
PLAN_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
ACC_FLOOR = {torch.float32: 5e-6, torch.float16: 5e-6, torch.bfloat16: 5e-6}
ERROR_FLOOR_PER_UNIT_MASS = 1e-6


def _load_reference():
    try:
        from sinkhorn_ops import reference

        return reference
    except (ImportError, OSError):
        # The package __init__ loads the compiled library; the reference must work without it,
        # so load the file on its own.
        path = ROOT / "sinkhorn_ops" / "reference.py"
        spec = importlib.util.spec_from_file_location("_sinkhorn_reference", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


reference = _load_reference()
sinkhorn_reference = reference.sinkhorn_reference
accumulation_dtype = reference.accumulation_dtype


def run_python(code: str, timeout: float):
    """Runs code in a fresh interpreter that imports this checkout's package: the way to test
    for a hang or a crash without taking pytest down with it. The CompletedProcess (stdout and
    stderr as text), or None when it ran past timeout seconds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def load_ops():
    """The sinkhorn_ops package, or a module-level skip while the extension is not built."""
    try:
        import sinkhorn_ops

        sinkhorn_ops.sinkhorn  # noqa: B018 (a namespace package without the wrapper fails here)
    except (ImportError, OSError, AttributeError) as exc:
        pytest.skip(f"sinkhorn_ops extension not importable: {exc}", allow_module_level=True)
    return sinkhorn_ops


def pytest_make_parametrize_id(config, val, argname):
    if isinstance(val, torch.dtype):
        return str(val).replace("torch.", "")
    return None


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_scores(shape, *, scale=1.0, seed=0, dtype=torch.float64, device="cpu"):
    """scale * standard normal scores, drawn in float64 on the CPU, then cast and moved."""
    s = torch.randn(tuple(shape), generator=generator(seed), dtype=torch.float64) * scale
    return s.to(dtype=dtype, device=device)


def random_marginals(batch, n, m, *, seed=0, dtype=torch.float64, device="cpu"):
    """Positive a (..., n), b (..., m) with sum(a) = sum(b) = n per problem."""
    gen = generator(seed + 1000)
    a = torch.rand(tuple(batch) + (n,), generator=gen, dtype=torch.float64) + 0.5
    b = torch.rand(tuple(batch) + (m,), generator=gen, dtype=torch.float64) + 0.5
    a = a * (n / a.sum(-1, keepdim=True))
    b = b * (n / b.sum(-1, keepdim=True))
    return a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device)


def ot_problem(batch, n, m, eps, *, seed=0, device="cpu"):
    """Entropic OT problems: cost C of squared distances between random points in the unit
    square, scores S = -C / eps (eps a float or one per problem), positive a, b of mass n.
    Smaller eps converges more slowly, which gives a batch of problems of different difficulty."""
    gen = generator(seed)
    x = torch.rand(tuple(batch) + (n, 2), generator=gen, dtype=torch.float64)
    y = torch.rand(tuple(batch) + (m, 2), generator=gen, dtype=torch.float64)
    cost = torch.cdist(x, y) ** 2
    eps = torch.as_tensor(eps, dtype=torch.float64).reshape(
        tuple(batch) + (1, 1) if isinstance(eps, list) else ()
    )
    a, b = random_marginals(batch, n, m, seed=seed)
    return cost.to(device), (-cost / eps).to(device), a.to(device), b.to(device)


def reference_cpu(scores, a=None, b=None, *, mask=None, **kwargs):
    """The reference run on CPU copies of the inputs (assert_close compares on the CPU)."""
    cpu = lambda t: None if t is None else t.cpu()
    return sinkhorn_reference(cpu(scores), cpu(a), cpu(b), mask=cpu(mask), **kwargs)


def _describe_worst(actual, expected, excess, k):
    flat = excess.reshape(-1)
    k = min(k, flat.numel())
    worst = torch.topk(flat, k).indices
    lines = []
    for idx in worst.tolist():
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), excess.shape))
        lines.append(
            f"    at {pos}: actual {actual.reshape(-1)[idx].item()!r}, "
            f"expected {expected.reshape(-1)[idx].item()!r}"
        )
    return "\n".join(lines)


def assert_close(actual, expected, *, atol, rtol=0.0, name="tensor", equal_nan=False, worst=5):
    """|actual - expected| <= atol + rtol |expected| elementwise, equal infinities match.

    On failure the message lists the number of mismatches and the `worst` largest excesses.
    """
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    act = actual.detach().to("cpu", torch.float64)
    exp = expected.detach().to("cpu", torch.float64)
    same = act == exp  # covers equal infinities
    both_nan = torch.isnan(act) & torch.isnan(exp)
    diff = (act - exp).abs()
    allowed = atol + rtol * exp.abs()
    ok = same | (diff <= allowed) | (both_nan if equal_nan else torch.zeros_like(same))
    if bool(ok.all()):
        return
    excess = torch.where(
        ok, torch.full_like(diff, -1.0), torch.nan_to_num(diff - allowed, nan=1e300, posinf=1e300)
    )
    finite = torch.isfinite(diff) & ~ok
    max_diff = diff[finite].max().item() if bool(finite.any()) else float("nan")
    raise AssertionError(
        f"{name}: {int((~ok).sum())} of {ok.numel()} elements differ "
        f"(atol={atol}, rtol={rtol}, max finite |diff|={max_diff:.3e}); worst:\n"
        + _describe_worst(act, exp, excess, worst)
    )


def assert_result_close(out, ref, *, dtype, name="", check_steps=True):
    """Operator result against a reference result for the same inputs in the same dtype."""
    atol, rtol = TOLERANCES[dtype]
    acc_atol, acc_rtol = TOLERANCES[accumulation_dtype(dtype)]
    assert out.plan.dtype == ref.plan.dtype, (
        f"{name} plan dtype {out.plan.dtype} != {ref.plan.dtype}"
    )
    assert out.f.dtype == ref.f.dtype and out.g.dtype == ref.g.dtype, f"{name} potential dtype"
    assert out.error.dtype == ref.error.dtype, f"{name} error dtype {out.error.dtype}"
    assert out.steps.dtype == torch.int64, f"{name} steps dtype {out.steps.dtype}"
    assert_close(out.plan, ref.plan, atol=atol, rtol=rtol, name=f"{name} plan")
    assert_close(out.f, ref.f, atol=acc_atol, rtol=acc_rtol, name=f"{name} f")
    assert_close(out.g, ref.g, atol=acc_atol, rtol=acc_rtol, name=f"{name} g")
    if check_steps:
        assert torch.equal(out.steps.cpu(), ref.steps.cpu()), (
            f"{name} steps {out.steps} != {ref.steps}"
        )
    assert_close(out.error, ref.error, atol=10 * acc_atol, rtol=10 * acc_rtol, name=f"{name} error")


def assert_flash_rule(actual, lowp_ref, truth, *, floor, name):
    """FlashAttention's rule: the error of `actual` against the float64 truth is at most twice the
    error of the reference computed in the same low precision, plus an absolute floor."""
    truth = truth.detach().to("cpu", torch.float64)
    err = (actual.detach().to("cpu", torch.float64) - truth).abs().max().item()
    ref_err = (lowp_ref.detach().to("cpu", torch.float64) - truth).abs().max().item()
    assert err <= 2 * ref_err + floor, (
        f"{name}: max error {err:.3e} > 2 x reference error {ref_err:.3e} + floor {floor:.1e}"
    )


# ---- torch.distributed on gloo processes ----------------------------------------------------

@contextlib.contextmanager
def gloo_group(rank, world, port):
    """A gloo process group of `world` processes on this machine, for a spawned worker."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        yield
    finally:
        dist.destroy_process_group()


def run_on_gloo(worker, world, *args):
    """Spawns worker(rank, port, path, *args) on `world` processes; each saves its result to
    path/<rank>.pt with torch.save. Returns the results, by rank."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as path:
        mp.spawn(worker, args=(port, path, *args), nprocs=world, join=True)
        return [torch.load(os.path.join(path, f"{r}.pt")) for r in range(world)]


def implicit_oracle(P, Gbar, grad_f=None, grad_g=None, rtol=None):
    """MATH.md section 2.2 in float64 by a dense pseudo-inverse: the right-hand side projected
    orthogonally onto the range of H (the least-squares solution), then
    dL/dS = P (Gbar - x (+) y), dL/da = x, dL/db = y. Uses the actual sums r, c of P. rtol: the
    pseudo-inverse's cut (eigenvalues of H below rtol times the largest count as null; None,
    torch's default)."""
    P, Gbar = P.detach().cpu().double(), Gbar.detach().cpu().double()
    n, m = P.shape[-2:]
    Gam = Gbar * P
    rhs_f, rhs_g = Gam.sum(-1), Gam.sum(-2)
    if grad_f is not None:
        rhs_f = rhs_f + grad_f.cpu().double()
    if grad_g is not None:
        rhs_g = rhs_g + grad_g.cpu().double()
    t = (rhs_f.sum(-1, keepdim=True) - rhs_g.sum(-1, keepdim=True)) / (n + m)
    rhs = torch.cat([rhs_f - t, rhs_g + t], -1)
    H = torch.zeros(P.shape[:-2] + (n + m, n + m), dtype=torch.float64)
    H[..., :n, :n] = torch.diag_embed(P.sum(-1))
    H[..., n:, n:] = torch.diag_embed(P.sum(-2))
    H[..., :n, n:] = P
    H[..., n:, :n] = P.transpose(-1, -2)
    xy = (torch.linalg.pinv(H, hermitian=True, rtol=rtol) @ rhs.unsqueeze(-1)).squeeze(-1)
    x, y = xy[..., :n], xy[..., n:]
    return P * (Gbar - x.unsqueeze(-1) - y.unsqueeze(-2)), x, y
