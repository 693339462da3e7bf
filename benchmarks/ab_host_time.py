"""Host time of tiny mHC and Sinkhorn calls, this checkout against another build of the package (A/B).

On a GPU a small mHC layer is bound by host time: Python, the dispatcher, autograd and one launch
per operator. The same calls on tiny CPU inputs measure that host cost here, where the kernels
take microseconds. Each build runs in its own process (the two extensions cannot share one); the
builds take turns for ROUNDS rounds, so that a noisy minute of a shared machine slows both.

    git worktree add /tmp/base <rev> && (cd /tmp/base && SINKHORN_FORCE_CPU=1 \
        python setup.py build_ext --inplace)
    python benchmarks/ab_host_time.py /tmp/base [--out DIR] [--stem NAME]

Cases (one thread, fp32, an identity branch so that only mHC's own calls are timed):
- layer: ManifoldConstrainedHyperConnections(4, 16) on x of shape (8, 4, 16), forward and
  forward + backward (the gradients of x and every parameter);
- mappings: layer.mappings(x) for x of shape (32, 4, 64), forward + backward;
- mhc_sinkhorn: sinkhorn_ops.mhc_sinkhorn on logits of shape (8, 4, 4), 20 iterations, forward
  + backward (the call bench_mhc.py times at 32768 tokens, host-bound on a GPU);
- sinkhorn: sinkhorn_ops.sinkhorn on scores of shape (8, 4, 4), 3 steps, forward + backward.
Writes <out>/<stem>.md (stem default host_ab_cpu): per case, the median over rounds of each
build's per-call median, and new / base.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUNDS, CALLS, REPEATS = 3, 400, 9
CASES = ("layer forward", "layer forward+backward", "mappings forward+backward",
         "mhc_sinkhorn forward+backward", "sinkhorn forward+backward")


def child(tree: str) -> None:
    """Run in a subprocess with tree's package first on sys.path: prints {case: us per call}."""
    sys.path.insert(0, tree)
    import torch

    from sinkhorn_ops.nn import ManifoldConstrainedHyperConnections
    torch.set_num_threads(1)
    torch.manual_seed(0)

    def per_call_us(fn) -> float:
        for _ in range(CALLS // 4):
            fn()
        samples = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for _ in range(CALLS):
                fn()
            samples.append((time.perf_counter() - t0) / CALLS * 1e6)
        return statistics.median(samples)

    small = ManifoldConstrainedHyperConnections(4, 16, torch.nn.Identity())
    x = torch.randn(8, 4, 16, requires_grad=True)
    wide = ManifoldConstrainedHyperConnections(4, 64, torch.nn.Identity())
    xw = torch.randn(32, 4, 64, requires_grad=True)

    def mappings_step():
        m = wide.mappings(xw)
        loss = m.pre.sum() + m.post.sum() + m.res.square().sum()
        return torch.autograd.grad(loss, [xw, *wide.parameters()])

    import sinkhorn_ops
    logits = torch.randn(8, 4, 4, requires_grad=True)
    weights = torch.randn(8, 4, 4)
    fns = [lambda: small(x),
           lambda: torch.autograd.grad(small(x).sum(), [x, *small.parameters()]),
           mappings_step,
           lambda: torch.autograd.grad((sinkhorn_ops.mhc_sinkhorn(logits, 20) * weights).sum(),
                                       logits),
           lambda: torch.autograd.grad((sinkhorn_ops.sinkhorn(logits, steps=3) * weights).sum(),
                                       logits)]
    print(json.dumps({case: per_call_us(fn) for case, fn in zip(CASES, fns)}))


def torch_version() -> str:
    return subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                          capture_output=True, text=True).stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="root of the other checkout, its extension built in place")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--stem", default="host_ab_cpu")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child)
        return 0
    trees = {"base": str(Path(args.base).resolve()), "new": str(ROOT)}
    runs = {name: [] for name in trees}
    for r in range(ROUNDS):
        for name, tree in trees.items():
            out = subprocess.run([sys.executable, __file__, "unused", "--child", tree],
                                 check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    rev = lambda tree: subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                                      capture_output=True, text=True).stdout.strip() or "?"
    lines = [f"# Host time per call, A/B ({ROUNDS} rounds, builds alternating)", "",
             f"- **base**: `{trees['base']}` at `{rev(trees['base'])}`",
             f"- **new**: this checkout at `{rev(trees['new'])}` (uncommitted changes included)",
             f"- **command**: `python benchmarks/ab_host_time.py {args.base}`",
             f"- **host**: `{platform.processor() or platform.machine()}`, "
             f"{os.cpu_count()} cpus, one thread; torch `{torch_version()}`",
             f"- **date**: `{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}`",
             "",
             "| case | base us | new us | new / base |", "|---|---|---|---|"]
    for case in CASES:
        base = statistics.median(run[case] for run in runs["base"])
        new = statistics.median(run[case] for run in runs["new"])
        lines.append(f"| {case} | {base:.1f} | {new:.1f} | {new / base:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
