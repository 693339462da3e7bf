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
With --suite implicit, the implicit backward operator alone instead
(torch.ops.sinkhorn_ops.sinkhorn_backward_implicit on a converged fp32 plan, Gbar random): the
dense solve on 64 x 128 x 128 and on 4096 x 4 x 4, the conjugate gradients (100 iterations) on
4 x 512 x 512, each with and without an upstream dL/df (which adds the search for the support's
components).
Writes <out>/<stem>.md (stem default host_ab_cpu, or implicit_ab_cpu): per case, the median over
rounds of each build's per-call median, and new / base.
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
ROUNDS, REPEATS = 3, 9
SUITES = {  # name: (calls per sample, cases)
    "host": (400, ("layer forward", "layer forward+backward", "mappings forward+backward",
                   "mhc_sinkhorn forward+backward", "sinkhorn forward+backward")),
    "implicit": (10, ("dense 64x128x128", "dense 64x128x128 + dL/df", "dense 4096x4x4",
                      "dense 4096x4x4 + dL/df", "cg 4x512x512", "cg 4x512x512 + dL/df")),
}


def host_calls():
    """The host suite's calls (tiny inputs, so that the kernels take microseconds)."""
    import torch

    from sinkhorn_ops.nn import ManifoldConstrainedHyperConnections
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
    return fns


def implicit_calls():
    """The implicit suite's calls: the backward operator on converged fp32 plans."""
    import torch

    import sinkhorn_ops
    op = torch.ops.sinkhorn_ops.sinkhorn_backward_implicit
    fns = []
    for shape, solver in [((64, 128, 128), "implicit"), ((4096, 4, 4), "implicit"),
                          ((4, 512, 512), "implicit_cg")]:
        plan = sinkhorn_ops.sinkhorn(torch.randn(shape), steps=200)
        grad_plan, grad_f = torch.randn(shape), torch.randn(shape[:-1])
        for upstream_f in (None, grad_f):
            fns.append(lambda p=plan, g=grad_plan, u=upstream_f, s=solver:
                       op(g, u, None, p, s, 1e-6, 100))
    return fns


def child(tree: str, suite: str) -> None:
    """Run in a subprocess with tree's package first on sys.path: prints {case: us per call}."""
    sys.path.insert(0, tree)
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    calls, cases = SUITES[suite]

    def per_call_us(fn) -> float:
        for _ in range(max(1, calls // 4)):
            fn()
        samples = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - t0) / calls * 1e6)
        return statistics.median(samples)

    fns = host_calls() if suite == "host" else implicit_calls()
    print(json.dumps({case: per_call_us(fn) for case, fn in zip(cases, fns)}))


def torch_version() -> str:
    return subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                          capture_output=True, text=True).stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="root of the other checkout, its extension built in place")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--suite", choices=sorted(SUITES), default="host")
    p.add_argument("--stem", help="default: host_ab_cpu, or implicit_ab_cpu for --suite implicit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.suite)
        return 0
    stem = args.stem or ("host_ab_cpu" if args.suite == "host" else f"{args.suite}_ab_cpu")
    trees = {"base": str(Path(args.base).resolve()), "new": str(ROOT)}
    runs = {name: [] for name in trees}
    for r in range(ROUNDS):
        for name, tree in trees.items():
            out = subprocess.run([sys.executable, __file__, "unused", "--child", tree,
                                  "--suite", args.suite],
                                 check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    rev = lambda tree: subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                                      capture_output=True, text=True).stdout.strip() or "?"
    lines = [f"# Host time per call, A/B ({ROUNDS} rounds, builds alternating)", "",
             f"- **base**: `{trees['base']}` at `{rev(trees['base'])}`",
             f"- **new**: this checkout at `{rev(trees['new'])}` (uncommitted changes included)",
             f"- **command**: `python benchmarks/ab_host_time.py {args.base} --suite {args.suite}`",
             f"- **host**: `{platform.processor() or platform.machine()}`, "
             f"{os.cpu_count()} cpus, one thread; torch `{torch_version()}`",
             f"- **date**: `{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}`",
             "",
             "| case | base us | new us | new / base |", "|---|---|---|---|"]
    for case in SUITES[args.suite][1]:
        base = statistics.median(run[case] for run in runs["base"])
        new = statistics.median(run[case] for run in runs["new"])
        lines.append(f"| {case} | {base:.1f} | {new:.1f} | {new / base:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
