"""Small CUDA workload for compute-sanitizer (memcheck, racecheck): every block-size bucket of the
CUDA forward and unrolled backward kernels, the tiny forward path, the large-problem forward
(short-wide, tall-narrow, and fused iterations with SINKHORN_CUDA_FUSED=1), the V4 and paper mHC
Sinkhorn kernels (forward and backward, n = 1..8; the paper's on problems in both domains), the
mHC stream mixings, the fused mHC mappings, both stopping modes, default, masked and explicit marginals, empty
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

# (batch, n, m): 4x4 and 33x65 as in mHC and odd attention tiles; 130x4x4 and 5x7x3 the tiny
# path's two paddings (4 and 8) over more than one 128-thread block; the rest reach the 128- and
# 256-thread blocks and the empty dimensions.
SHAPES = [(8, 4, 4), (130, 4, 4), (5, 7, 3), (2, 33, 65), (2, 70, 100), (1, 200, 300), (2, 0, 5),
          (2, 5, 0)]
# n * m >= 2^20 takes the large-problem path: short and wide (its row pass in chunks), tall and
# narrow (several threads a column in its column pass), and 1024 x 1100, whose iterations take the
# fused row-and-column pass (large_fused.cuh) under SINKHORN_CUDA_FUSED=1 (as gpu_check.sh runs
# this script). fp32 in one mode each: under the sanitizers every launch is slow. The tall, narrow
# one has tol, so its steps run in the device loop (large_loop.cuh: one cooperative kernel).
# 16 x 65537: 65 row chunks, the last one shorter.
LARGE_SHAPES = [(1, 16, 65537), (1, 1 << 16, 20), (1, 1024, 1100)]
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


# Backward (MATH.md section 2.1) through torch.ops.sinkhorn_ops.sinkhorn_backward_unrolled
# directly. Modes: (marginals, where steps_used comes from, start, whether dL/df and dL/dg are
# given). "tol": the forward with tol > 0 on problems of different temperatures, so each problem
# stops at its own step; "varied": steps_used set per problem, 0 (only the output pass) included.
BWD_SHAPES = SHAPES
BWD_MODES = [("default", "all", "row", True), ("masked", "tol", "col", False),
             ("explicit", "tol", "row", True), ("explicit", "varied", "col", False)]
BWD_STEPS = 12
# Relative to max(1, max |reference|). bf16 and fp16 round dS once, at the end.
GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def reference_grads(S, a, b, G, gf, gg, steps_used, start):
    """(dS, da, db) by autograd through sinkhorn_reference in float64 on the CPU, a problem at a
    time with its own step count and tol = 0. Each problem is cut down to its rows and columns with
    an allowed entry: autograd through an all -inf logsumexp gives NaN where the operator's guard
    gives 0, and the other rows and columns never see those (P and the step weights are 0 there,
    and their potentials stay 0), so their gradients are 0."""
    dS, da = torch.zeros_like(S), None if a is None else torch.zeros_like(a)
    db = None if b is None else torch.zeros_like(b)
    for k in range(S.shape[0]):
        allowed = ~torch.isneginf(S[k])
        rows, cols = allowed.any(1), allowed.any(0)
        if not rows.any():
            continue
        s = S[k][rows][:, cols].clone().requires_grad_()
        inputs = [s]
        ak = bk = None
        if a is not None:
            ak = a[k][rows].clone().requires_grad_()
            bk = b[k][cols].clone().requires_grad_()
            inputs += [ak, bk]
        ref = sinkhorn_reference(s, ak, bk, steps=int(steps_used[k]), start=start)
        loss = (ref.plan * G[k][rows][:, cols]).sum()
        if gf is not None:
            loss = loss + (ref.f * gf[k][rows]).sum() + (ref.g * gg[k][cols]).sum()
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        grads = [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, grads)]
        dS[k][rows.nonzero()[:, :1], cols.nonzero()[:, 0]] = grads[0]
        if a is not None:
            da[k][rows] = grads[1]
            db[k][cols] = grads[2]
    return dS, da, db


def run_backward_case(batch, n, m, dtype, marginals, steps_from, start, upstream, gen):
    scores, a, b = make_case(batch, n, m, dtype, marginals, gen)
    # Different temperatures per problem, so that with tol > 0 each stops at its own step.
    scores = (scores.double() * torch.linspace(0.25, 2.5, batch, dtype=torch.float64,
                                               device=scores.device).view(-1, 1, 1)).to(dtype)
    if steps_from == "varied":
        steps_used = (torch.arange(batch) * 5 % (BWD_STEPS + 1)).cuda()
    else:
        tol = 1e-2 if steps_from == "tol" else 0.0
        fwd = sinkhorn_ops.sinkhorn(scores, a, b, steps=BWD_STEPS, start=start, tol=tol,
                                    return_potentials=True)
        steps_used = fwd.steps
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    G = torch.randn(batch, n, m, generator=gen, dtype=torch.float64).to(dtype).cuda()
    gf = torch.randn(batch, n, generator=gen, dtype=acc).cuda() if upstream else None
    gg = torch.randn(batch, m, generator=gen, dtype=acc).cuda() if upstream else None
    # The masked case goes through the op's mask argument, with finite values under the mask.
    mask = ~torch.isneginf(scores) if marginals == "masked" else None
    op_scores = scores.nan_to_num(neginf=0.0) if mask is not None else scores
    dS, da, db = torch.ops.sinkhorn_ops.sinkhorn_backward_unrolled(
        G, gf, gg, op_scores, a, b, mask, steps_used, BWD_STEPS, start)
    torch.cuda.synchronize()

    def cpu(x):
        return None if x is None else x.double().cpu()

    ref = reference_grads(cpu(scores), cpu(a), cpu(b), cpu(G), cpu(gf), cpu(gg),
                          steps_used.cpu(), start)
    problems = []
    if dS.shape != scores.shape or dS.dtype != dtype:
        problems.append(f"grad_scores {tuple(dS.shape)} {dS.dtype}")
    for name, out, want in (("grad_scores", dS, ref[0]), ("grad_a", da, ref[1]),
                            ("grad_b", db, ref[2])):
        if want is None or want.numel() == 0 or out.shape != want.shape:
            if want is not None and out.shape != want.shape:
                problems.append(f"{name} shape {tuple(out.shape)} vs {tuple(want.shape)}")
            continue
        if not torch.isfinite(out).all():
            problems.append(f"non-finite {name}")
            continue
        err = (out.double().cpu() - want).abs().max().item() / max(1.0, want.abs().max().item())
        if err > GRAD_RTOL[dtype]:
            problems.append(f"{name} max rel diff {err:.3g}")
    return "; ".join(problems) or None


def backward_cases():
    """fp32 and bf16 in every mode; fp16 and fp64 (the other two kernel instantiations) once."""
    for dtype in (torch.float32, torch.bfloat16):
        for shape in BWD_SHAPES:
            for mode in BWD_MODES:
                yield (dtype, *shape, *mode)
    for dtype in (torch.float16, torch.float64):
        yield (dtype, 3, 33, 65, *BWD_MODES[2])


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
    for shape, mode in zip(LARGE_SHAPES, (modes[2], modes[5], modes[3])):
        yield (torch.float32, *shape, *mode)


# The fused mHC Sinkhorns: (ours, its reference on CPU, the logits' scale in odd problems).
# paper: odd problems spread wide enough for the kernel's log-domain twin.
MHC_KERNELS = {
    "v4": (sinkhorn_ops.mhc_v4_sinkhorn, sinkhorn_ops.mhc_v4_sinkhorn_loop, 2.0),
    "paper": (sinkhorn_ops.mhc_sinkhorn,
              lambda t: sinkhorn_ops.sinkhorn(t, steps=40, start="col"), 40.0),
}


def run_mhc_sinkhorn_case(variant, batch, n, dtype) -> str | None:
    """A fused mHC Sinkhorn (20 iterations), forward and backward, against its reference in
    float64 on the CPU."""
    ours, reference, odd_scale = MHC_KERNELS[variant]
    x = torch.randn(batch, n, n, dtype=torch.float64) * 2
    x[1::2] *= odd_scale / 2
    w = torch.randn_like(x)
    leaf = x.to(dtype).cuda().requires_grad_(True)
    out = ours(leaf)
    (grad,) = torch.autograd.grad((out * w.to(dtype).cuda()).sum(), leaf)
    torch.cuda.synchronize()
    ref_leaf = x.clone().requires_grad_(True)
    ref = reference(ref_leaf)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), ref_leaf)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    problems = []
    if (out.double().cpu() - ref).abs().max().item() > tol:
        problems.append("H differs from the reference")
    if (grad.double().cpu() - ref_grad).abs().max().item() > tol * max(1.0, ref_grad.abs().max().item()):
        problems.append("gradient differs from the reference")
    return "; ".join(problems) or None


def run_mix_case(tokens, n, c, dtype) -> str | None:
    """The fused mHC stream mixings, forward and backward, against their formulas in float64."""
    x = torch.randn(tokens, n, c, dtype=torch.float64)
    y = torch.randn(tokens, c, dtype=torch.float64)
    hp, hq, hr = (torch.rand(tokens, n, dtype=torch.float64), torch.rand(tokens, n, dtype=torch.float64),
                  torch.rand(tokens, n, n, dtype=torch.float64))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dev = [t.cuda() for t in (x.to(dtype), y.to(dtype), hp.to(acc), hq.to(acc), hr.to(acc))]
    for t in dev:
        t.requires_grad_(True)
    out = sinkhorn_ops.mhc_combine(dev[0], dev[1], dev[3], dev[4]).sum() + \
        sinkhorn_ops.mhc_branch_input(dev[0], dev[2]).square().sum()
    grads = torch.autograd.grad(out, dev)
    torch.cuda.synchronize()
    ref_in = [t.clone().requires_grad_(True) for t in (x, y, hp, hq, hr)]
    ref = ((ref_in[4].unsqueeze(-1) * ref_in[0].unsqueeze(-3)).sum(-2)
           + ref_in[3].unsqueeze(-1) * ref_in[1].unsqueeze(-2)).sum() + \
        (ref_in[2].unsqueeze(-1) * ref_in[0]).sum(-2).square().sum()
    ref_grads = torch.autograd.grad(ref, ref_in)
    tol = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 0.3}[dtype]
    bad = [k for k, (g, r) in enumerate(zip(grads, ref_grads))
           if (g.double().cpu() - r).abs().max().item() > tol * max(1.0, r.abs().max().item())]
    return f"gradients {bad} differ" if bad else None


def run_mappings_case(variant, tokens, n, dtype) -> str | None:
    """mHC's fused mappings (forward and backward; every other token's logits wide, the paper's
    log-domain twin) against the same formulas in PyTorch ops in float64 on the CPU."""
    from sinkhorn_ops.mhc import mappings_composite
    proj = torch.randn(tokens, 2 * n + n * n, dtype=torch.float64)
    proj[1::2] *= 30
    weights = [torch.tensor(v, dtype=torch.float64) for v in (0.7, -0.4, 1.3)]
    weights += [torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64),
                torch.randn(n, n, dtype=torch.float64)]
    ups = [torch.randn(tokens, n, dtype=torch.float64), torch.randn(tokens, n, dtype=torch.float64),
           torch.randn(tokens, n, n, dtype=torch.float64)]
    dev = [t.to(dtype).cuda().requires_grad_(True) for t in (proj, *weights)]
    out = sinkhorn_ops.mhc_mappings(*dev, 20, variant=variant)
    grads = torch.autograd.grad(out, dev, [u.to(dtype).cuda() for u in ups])
    torch.cuda.synchronize()
    ref_in = [t.clone().requires_grad_(True) for t in (proj, *weights)]
    residual = ((lambda r: sinkhorn_ops.mhc_v4_sinkhorn_loop(r, 20, 1e-6).mT) if variant == "v4"
                else (lambda r: sinkhorn_ops.sinkhorn(r, steps=40, start="col")))
    ref = mappings_composite(ref_in[0], ref_in[1:], residual, 1e-6 if variant == "v4" else None)
    ref_grads = torch.autograd.grad(ref, ref_in, ups)
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    bad = [k for k, (g, r) in enumerate(zip(list(out) + list(grads), list(ref) + list(ref_grads)))
           if (g.double().cpu() - r.detach()).abs().max().item() > tol * max(1.0, r.abs().max().item())]
    return f"outputs/gradients {bad} differ" if bad else None


def run_coefficients_case(variant, tokens, n, dtype) -> str | None:
    """mHC's fused coefficients (the mappings kernel with the RMSNorm folded in; x in dtype, the
    rest in its accumulation dtype; token 0 all zeros), forward and backward, against RMSNorm
    then the mappings in float64 on the CPU."""
    from sinkhorn_ops.mhc import mappings_composite
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    D = 8 * n
    x = torch.randn(tokens, D, dtype=torch.float64)
    x[0] = 0
    phis = [torch.randn(D, k, dtype=torch.float64) / D ** 0.5 for k in (n, n, n * n)]
    weights = [torch.tensor(v, dtype=torch.float64) for v in (0.7, -0.4, 1.3)]
    weights += [torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64),
                torch.randn(n, n, dtype=torch.float64)]
    ups = [torch.randn(tokens, n, dtype=torch.float64), torch.randn(tokens, n, dtype=torch.float64),
           torch.randn(tokens, n, n, dtype=torch.float64)]
    x = x.to(dtype).double()  # the values the device sees
    dev = [x.to(dtype).cuda().requires_grad_(True)]
    dev += [t.to(acc).cuda().requires_grad_(True) for t in (*phis, *weights)]
    out = sinkhorn_ops.mhc_coefficients(*dev, 20, variant=variant)
    grads = torch.autograd.grad(out, dev, [u.to(acc).cuda() for u in ups])
    torch.cuda.synchronize()
    ref_in = [t.clone().requires_grad_(True) for t in (x, *phis, *weights)]
    proj = (ref_in[0] @ torch.cat(ref_in[1:4], -1)) * torch.rsqrt(
        ref_in[0].square().mean(-1, keepdim=True) + 1e-6)
    residual = ((lambda r: sinkhorn_ops.mhc_v4_sinkhorn_loop(r, 20, 1e-6).mT) if variant == "v4"
                else (lambda r: sinkhorn_ops.sinkhorn(r, steps=40, start="col")))
    ref = mappings_composite(proj, ref_in[4:], residual, 1e-6 if variant == "v4" else None)
    ref_grads = torch.autograd.grad(ref, ref_in, ups)
    tol = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 2e-2}[dtype]
    bad = [k for k, (g, r) in enumerate(zip(list(out) + list(grads), list(ref) + list(ref_grads)))
           if (g.double().cpu() - r.detach()).abs().max().item() > tol * max(1.0, r.abs().max().item())]
    return f"outputs/gradients {bad} differ" if bad else None


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    failures = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for n in (1, 4, 8):
            for c in (1, 33, 100):
                problem = run_mix_case(37, n, c, dtype)
                name = f"mix {str(dtype)[6:]} 37x{n}x{c}"
                print(f"{'FAIL' if problem else 'ok'} {name}" + (f": {problem}" if problem else ""))
                failures += problem is not None
    for variant in MHC_KERNELS:
        for dtype in (torch.float32, torch.float64):
            for n in range(1, 9):
                problem = run_mhc_sinkhorn_case(variant, 130, n, dtype)
                name = f"{variant} {str(dtype)[6:]} 130x{n}x{n}"
                print(f"{'FAIL' if problem else 'ok'} {name}" + (f": {problem}" if problem else ""))
                failures += problem is not None
    for variant in ("paper", "v4"):
        for dtype in (torch.float32, torch.float64):
            for n in (1, 3, 4, 8):
                problem = run_mappings_case(variant, 130, n, dtype)
                name = f"mappings {variant} {str(dtype)[6:]} 130x{n}"
                print(f"{'FAIL' if problem else 'ok'} {name}" + (f": {problem}" if problem else ""))
                failures += problem is not None
    for variant in ("paper", "v4"):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for n in (1, 4, 8):
                problem = run_coefficients_case(variant, 70, n, dtype)
                name = f"coefficients {variant} {str(dtype)[6:]} 70x{n}"
                print(f"{'FAIL' if problem else 'ok'} {name}" + (f": {problem}" if problem else ""))
                failures += problem is not None
    for dtype, batch, n, m, marginals, tol, start in cases():
        problem = run_case(batch, n, m, dtype, marginals, tol, start, gen)
        name = f"{str(dtype)[6:]} {batch}x{n}x{m} {marginals} tol={tol} start={start}"
        print(f"{'FAIL' if problem else 'ok'} {name}" + (f": {problem}" if problem else ""))
        failures += problem is not None
    for dtype, batch, n, m, marginals, steps_from, start, upstream in backward_cases():
        problem = run_backward_case(batch, n, m, dtype, marginals, steps_from, start, upstream, gen)
        name = (f"backward {str(dtype)[6:]} {batch}x{n}x{m} {marginals} steps={steps_from} "
                f"start={start} grad_f/g={'given' if upstream else 'None'}")
        print(f"{'FAIL' if problem else 'ok'} {name}" + (f": {problem}" if problem else ""))
        failures += problem is not None
    print(f"sanitizer_case: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
