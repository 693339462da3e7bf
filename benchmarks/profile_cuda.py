"""Where the CUDA time goes: a few cases of each path under torch.profiler, each call's wall time
against the sum of its kernels' device times, and the kernels that take the most.

    python benchmarks/profile_cuda.py [--out DIR] [--tag T]  # writes DIR/profile_cuda[_T].txt
    SINKHORN_CUDA_FORWARD=large python benchmarks/profile_cuda.py --tag large   # forced path
    SINKHORN_CUDA_HISTORY=local python benchmarks/profile_cuda.py --tag local_history --only "1M x 4x4"

The first H100 run (benchmarks/results/*_cuda.md) found most paths far from the copy bandwidth.
This tells the next GPU session, in seconds of device time, whether a case is bound by its
kernels (device time close to the wall time: look at the top kernel) or by the host (launch
count and per-call overhead: wall time far above the device time). Run again with a path forced
(SINKHORN_CUDA_FORWARD=large), it says whether the block cases (a block per problem, which leaves
most of the GPU idle when there are few problems) would be faster on the large path.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without install
import sinkhorn_ops  # noqa: E402

REPEATS = 5


def cases(dev: str) -> dict[str, Callable[[], object]]:
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=dev, dtype=dtype)

    att = randn(64, 128, 128)
    att512 = randn(8, 512, 512)
    ot = randn(1, 2000, 2000) * 5
    big = randn(1, 8192, 8192) * 5
    mhc = randn(1 << 20, 4, 4)
    bw = randn(16, 1024, 1024).requires_grad_()
    grad = randn(16, 1024, 1024)

    def backward() -> object:
        plan = sinkhorn_ops.sinkhorn(bw, steps=20)
        return torch.autograd.grad(plan, bw, grad)

    mhc_leaf = mhc.clone().requires_grad_()
    mhc_grad = randn(1 << 20, 4, 4)

    def mhc_backward() -> object:  # the paper kernel's forward and backward (a step history each)
        return torch.autograd.grad(sinkhorn_ops.mhc_sinkhorn(mhc_leaf, 20), mhc_leaf, mhc_grad)

    def tiny_backward() -> object:  # the operator's tiny path, forward and backward
        plan = sinkhorn_ops.sinkhorn(mhc_leaf, steps=40, start="col")
        return torch.autograd.grad(plan, mhc_leaf, mhc_grad)

    return {
        "block fwd 64x128x128, 3 steps": lambda: sinkhorn_ops.sinkhorn(att, steps=3),
        "block fwd 8x512x512, 3 steps": lambda: sinkhorn_ops.sinkhorn(att512, steps=3),
        "large fwd 1x2000x2000, 40 steps, tol": lambda: sinkhorn_ops.sinkhorn(
            ot, steps=40, start="col", tol=1e-6),
        "large fwd 1x8192x8192, 10 steps": lambda: sinkhorn_ops.sinkhorn(big, steps=10),
        "mhc_sinkhorn 1M x 4x4, 20 iterations": lambda: sinkhorn_ops.mhc_sinkhorn(mhc, 20),
        "tiny fwd 1M x 4x4, 40 steps": lambda: sinkhorn_ops.sinkhorn(mhc, steps=40, start="col"),
        "mhc_sinkhorn fwd+bwd 1M x 4x4, 20 iterations": mhc_backward,
        "tiny fwd+bwd 1M x 4x4, 40 steps": tiny_backward,
        "unrolled fwd+bwd 16x1024x1024, 20 steps": backward,
    }


Kernel = tuple[str, float, int]  # name, ms per call, launches per call


def profile_case(fn: Callable[[], object]) -> tuple[float, float, int, list[Kernel]]:
    """(wall ms per call, device ms per call, kernels per call, top kernels (name, ms, count))."""
    for _ in range(2):  # warm-up: module load, allocator, autotuning
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(REPEATS):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / REPEATS
    kernels = []  # (name, ms per call, launches per call) of each device-side event kind
    for ev in prof.key_averages():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us = getattr(ev, "self_device_time_total", None)
            us = ev.self_cuda_time_total if us is None else us
            kernels.append((ev.key, us / 1e3 / REPEATS, ev.count // REPEATS))
    device = sum(k[1] for k in kernels)
    count = sum(k[2] for k in kernels)
    return wall, device, count, sorted(kernels, key=lambda x: -x[1])[:6]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--tag", default="", help="suffix of the output file's name")
    p.add_argument("--only", default="", help="run the cases whose name contains this only")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs CUDA")
    forced = {k: v for k, v in os.environ.items() if k.startswith("SINKHORN_")}
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"switches: {forced or 'none'}",
             f"per call, over {REPEATS} calls under torch.profiler (its overhead included in wall)",
             ""]
    for name, fn in cases("cuda").items():
        if args.only not in name:
            continue
        try:
            wall, device, count, top = profile_case(fn)
        except Exception as exc:  # noqa: BLE001 (one failed case must not lose the others)
            lines.append(f"## {name}: failed: {type(exc).__name__}: {exc}"[:300])
            continue
        lines.append(f"## {name}: wall {wall:.3f} ms, kernels {device:.3f} ms ({count} launches)")
        lines += [f"   {ms:9.4f} ms  x{n:<5d} {k[:110]}" for k, ms, n in top]
        print("\n".join(lines[-len(top) - 1:]), flush=True)
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile_cuda{'_' + args.tag if args.tag else ''}.txt"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
