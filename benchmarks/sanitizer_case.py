"""Small CUDA workload for compute-sanitizer (memcheck, racecheck): every block-size bucket of the
CUDA forward kernel, both stopping modes, default, masked and explicit marginals, empty
dimensions, every dtype. Each case is also compared with the reference, loosely: a sanitizer run
should fail on a wrong kernel too, not only on a memory error.

    compute-sanitizer --tool memcheck python benchmarks/sanitizer_case.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without install
import sinkhorn_ops  # noqa: E402
from sinkhorn_ops.reference import sinkhorn_reference  # noqa: E402

# (batch, n, m): 4x4 and 33x65 as in mHC and odd attention tiles; the rest reach the 128- and
# 256-thread blocks and the empty dimensions.
SHAPES = [(8, 4, 4), (2, 33, 65), (2, 70, 100), (1, 200, 300), (2, 0, 5), (2, 5, 0)]
# Loose plan tolerances: this script hunts crashes and races; tests/ holds the precise checks.
PLAN_ATOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def make_case(batch, n, m, dtype, marginals, gen):
    scores = (2 * torch.randn(batch, n, m, generator=gen, dtype=torch.float64)).to(dtype)
    if marginals == "masked" and n > 1 and m > 1:
        scores[:, 0, :] = float("-inf")  # an empty row
        scores[:, :, -1] = float("-inf")  # an empty column
        scores[:, 1:, 0][torch.rand(batch, n - 1, generator=gen) < 0.3] = float("-inf")
    if marginals != "explicit":
        return scores.cuda(), None, None
    a = torch.rand(batch, n, generator=gen, dtype=torch.float64) + 0.5
    b = torch.rand(batch, m, generator=gen, dtype=torch.float64) + 0.5
    b = b * (a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True))  # equal masses
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return scores.cuda(), a.to(acc).cuda(), b.to(acc).cuda()


def run_case(batch, n, m, dtype, marginals, tol, start, gen) -> str | None:
    scores, a, b = make_case(batch, n, m, dtype, marginals, gen)
    kw = dict(steps=12, start=start, tol=tol)
    out = sinkhorn_ops.sinkhorn(scores, a, b, return_potentials=True, **kw)
    torch.cuda.synchronize()
    ref = sinkhorn_reference(scores.double().cpu(), None if a is None else a.double().cpu(),
                             None if b is None else b.double().cpu(), **kw)
    plan_err = (out.plan.double().cpu() - ref.plan).abs().max().item() if out.plan.numel() else 0.0
    problems = []
    if not torch.isfinite(out.plan).all() or not torch.isfinite(out.error).all():
        problems.append("non-finite output")
    if plan_err > PLAN_ATOL[dtype]:
        problems.append(f"plan max abs diff {plan_err:.3g}")
    # A stop decision on the threshold's edge may differ by rounding: allow one step.
    if (out.steps.cpu() - ref.steps).abs().max().item() > (1 if tol > 0 else 0):
        problems.append(f"steps {out.steps.tolist()} vs reference {ref.steps.tolist()}")
    return "; ".join(problems) or None


def cases():
    """fp32 and bf16 (the dtypes in use) in every mode; fp16 and fp64 in two, to stay quick
    under the sanitizers, which slow every launch down."""
    modes = [(marg, tol, start) for marg in ("default", "masked", "explicit")
             for tol, start in ((0.0, "row"), (1e-2, "col"))]
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        chosen = modes if dtype in (torch.float32, torch.bfloat16) else [modes[3], modes[4]]
        for shape in SHAPES:
            for mode in chosen:
                yield (dtype, *shape, *mode)


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    failures = 0
    for dtype, batch, n, m, marginals, tol, start in cases():
        problem = run_case(batch, n, m, dtype, marginals, tol, start, gen)
        name = f"{str(dtype)[6:]} {batch}x{n}x{m} {marginals} tol={tol} start={start}"
        print(f"{'FAIL' if problem else 'ok'} {name}" + (f": {problem}" if problem else ""))
        failures += problem is not None
    print(f"sanitizer_case: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
