"""Gradients of the unrolled backward for a fixed set of problems (masks, marginals, early
stopping, grad_f and grad_g, every dtype), saved to argv[1]. tests/test_backward.py runs it with
and without SINKHORN_CPU_BACKWARD=composite (read once per process) and compares."""
import torch, sinkhorn_ops
torch.manual_seed(0)
results = []
# The last case: a NaN score in problem 1 and early stopping, so that the others stop before the
# steps whose LSEs are NaN in problem 1 (the composite must skip them as the kernel does).
for (B, n, m, steps, start, tol, given) in [(3, 7, 5, 9, "row", 0.0, False), (4, 6, 9, 200, "col", 1e-5, True),
                                            (2, 33, 20, 40, "col", 0.0, False), (2, 4, 4, 40, "col", 0.0, True),
                                            (3, 8, 11, 60, "row", 1e-3, False)]:
    S = torch.randn(B, n, m, dtype=torch.float64) * 2
    S[0, 1, :] = float("-inf"); S[-1, :, 2] = float("-inf")
    if n == 8:
        S[1, 2, 3] = float("nan")
    a = b = None
    if given:
        a = torch.rand(B, n, dtype=torch.float64) + 0.5
        b = torch.rand(B, m, dtype=torch.float64) + 0.5
        b = b * (a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True))
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x = S.to(dtype).requires_grad_(True)
        ai = None if a is None else a.to(acc).requires_grad_(True)
        bi = None if b is None else b.to(acc).requires_grad_(True)
        r = sinkhorn_ops.sinkhorn(x, ai, bi, steps=steps, start=start, tol=tol, return_potentials=True)
        W = torch.randn(B, n, m, dtype=torch.float64).to(dtype)
        u = torch.randn(B, n, dtype=acc); v = torch.randn(B, m, dtype=acc)
        loss = (r.plan * W).sum() + (r.f * u).sum() + (r.g * v).sum()
        gs = torch.autograd.grad(loss, [t for t in (x, ai, bi) if t is not None])
        results.append([g.double() for g in gs])
torch.save(results, __import__("sys").argv[1])
