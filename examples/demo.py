"""A short tour of sinkhorn_ops.sinkhorn: a few problems solved, their marginals, and timings
against the eager PyTorch reference and POT, measured in this run (CPU)."""
import time

import torch

import sinkhorn_ops
from sinkhorn_ops.reference import sinkhorn_reference


def best_ms(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")

    print("1. A square problem: the plan is doubly stochastic.")
    S = torch.randn(5, 5)
    r = sinkhorn_ops.sinkhorn(S, steps=50, return_potentials=True)
    print("   row sums   ", r.plan.sum(-1).numpy().round(6))
    print("   column sums", r.plan.sum(-2).numpy().round(6), f"  error {r.error.item():.2e}\n")

    print("2. One row step is softmax:",
          torch.allclose(sinkhorn_ops.sinkhorn(S, steps=1), torch.softmax(S, -1)), "\n")

    print("3. Entropic OT between two point clouds, S = -C/eps, stopping per problem at tol 1e-6.")
    x, y = torch.rand(4, 300, 2), torch.rand(4, 200, 2)
    C = torch.cdist(x, y) ** 2
    a, b = torch.full((300,), 1 / 300), torch.full((200,), 1 / 200)
    r = sinkhorn_ops.sinkhorn(-C / 0.01, a, b, steps=5000, tol=1e-6, return_potentials=True)
    print("   steps used per problem", r.steps.tolist(), " errors", [f"{e:.1e}" for e in r.error.tolist()])
    print("   transport cost <C, P> ", [round(v, 5) for v in (r.plan * C).sum((-1, -2)).tolist()], "\n")

    print("4. Masked padding: a 3x2 allowed block inside 4x4 gets rows 1 and columns 3/2.")
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:3, :2] = True
    print(sinkhorn_ops.sinkhorn(torch.randn(4, 4), mask=mask, steps=100).numpy().round(3), "\n")

    print("5. Timings (ms, best of 3) against the eager reference:")
    cases = {
        "attention 64 x 128x128, 3 steps": (torch.randn(64, 128, 128), dict(steps=3)),
        "mHC 32768 x 4x4, 40 steps (col)": (torch.randn(32768, 4, 4), dict(steps=40, start="col")),
        "OT 1 x 1000x1000, 100 steps": (torch.randn(1, 1000, 1000), dict(steps=100)),
    }
    for name, (S, kw) in cases.items():
        ours = best_ms(lambda: sinkhorn_ops.sinkhorn(S, **kw))
        ref = best_ms(lambda: sinkhorn_reference(S, **kw))
        print(f"   {name:34s} ours {ours:8.2f}   eager {ref:8.2f}   x{ref / ours:5.1f}")
    try:
        import ot

        C = torch.cdist(torch.rand(1000, 2), torch.rand(1000, 2)) ** 2
        u = torch.full((1000,), 1e-3, dtype=torch.float64)
        Cn, un = C.double().numpy(), u.numpy()
        pot = best_ms(lambda: ot.bregman.sinkhorn_log(un, un, Cn, 0.05, numItermax=50, stopThr=0.0))
        ours = best_ms(lambda: sinkhorn_ops.sinkhorn(-C.double() / 0.05, u, u, steps=100))
        print(f"   {'POT sinkhorn_log 1000x1000, 50 its':34s} ours {ours:8.2f}   POT   {pot:8.2f}   x{pot / ours:5.1f}")
    except ImportError:
        print("   (POT not installed: pip install pot)")
    print("\nFull benchmarks: python benchmarks/bench_forward.py --device cpu")


if __name__ == "__main__":
    main()
