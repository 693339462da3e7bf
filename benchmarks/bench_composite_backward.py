"""Time of the unrolled backward operator alone (sinkhorn_backward_unrolled) at one shape, for
comparing its paths or two builds: on the CPU, SINKHORN_CPU_BACKWARD=composite runs the
composite backward (csrc/ops/sinkhorn_backward_composite.cpp) instead of the CPU kernel; on
CUDA it takes problems with n * m >= 2^20 by itself (SINKHORN_CUDA_BACKWARD=block or =composite
forces a path).

    SINKHORN_CPU_BACKWARD=composite python benchmarks/bench_composite_backward.py \\
        [--device cpu|cuda] [--shape B N M] [--steps K] [--reps R]

Prints the median over R calls in ms (one warm-up call first).
"""
from __future__ import annotations

import argparse
import statistics
import time

import _bench_util as bu  # noqa: F401  (puts the checkout on sys.path)
import torch

import sinkhorn_ops


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--shape", type=int, nargs=3, default=[4, 512, 512], metavar=("B", "N", "M"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    B, n, m = args.shape
    gen = torch.Generator().manual_seed(0)
    S = torch.randn(B, n, m, generator=gen).to(args.device)
    W = torch.randn(B, n, m, generator=gen).to(args.device)
    used = sinkhorn_ops.sinkhorn(S, steps=args.steps, return_potentials=True).steps
    op = torch.ops.sinkhorn_ops.sinkhorn_backward_unrolled.default

    def call() -> None:
        op(W, None, None, S, None, None, None, used, args.steps, "row")
        if args.device == "cuda":
            torch.cuda.synchronize()

    call()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    print(f"unrolled backward {B}x{n}x{m} fp32, {args.steps} steps, {args.device}: "
          f"{statistics.median(times):.1f} ms (median of {args.reps}), commit {bu.git_commit()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
