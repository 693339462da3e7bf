"""OptVQ assignment benchmark: sinkhorn_ops.sinkhorn_assign (streamed over row chunks) against the
published loop run eagerly, torch.compile of it, and the materialised matrix through our core
operator, in time and peak memory.

    python benchmarks/bench_optvq.py [--n 4096 --k 4096 --d 64] [--threads 1] [--quick] [--out DIR]

One setup (x, codebook) serves the correctness check, every timing and every memory peak. Writes
<out>/optvq_cpu.csv and .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import _bench_util as bu
import torch

sys.path.append(str(bu.ROOT))  # run from a checkout without installing; an install wins
import sinkhorn_ops
from sinkhorn_ops.optvq import optvq_normalize_reference, optvq_sinkhorn_reference

EPSILON, ITERS = 10.0, 5


def published(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The reference quantiser's assignment: cdist, "all" normalisation, the kernel-domain loop
    with its 1e-8 guards, argmax of Q. Holds several N x K matrices."""
    a = optvq_normalize_reference(torch.cdist(x, e), "all", x.shape[1])
    return optvq_sinkhorn_reference(a, EPSILON, ITERS).argmax(1)


def through_operator(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The materialised S = -eps A through sinkhorn_ops.sinkhorn (MATH.md table row OptVQ)."""
    a = optvq_normalize_reference(torch.cdist(x, e), "all", x.shape[1])
    n, k = a.shape
    res = sinkhorn_ops.sinkhorn(-EPSILON * a, torch.ones(n, dtype=a.dtype),
                                torch.full((k,), n / k, dtype=a.dtype),
                                steps=2 * ITERS, start="col", return_potentials=True)
    return (-EPSILON * a + res.g).argmax(1)


def cpu_peak_mb(fn: Callable[[], object]) -> float:
    """Peak of live CPU allocations during fn() beyond those before it, from the profiler's
    allocation events (the CPU counterpart of bu.peak_mb)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads; 1 avoids OpenMP contention on a shared machine")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=bu.ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    policy = bu.QUICK if args.quick else bu.FULL
    env = bu.environment("cpu")
    n, k, d = args.n, args.k, args.d
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    e = x[torch.randint(0, n, (k,), generator=gen)] + 0.3 * torch.randn(k, d, generator=gen)
    gemm_flop = 2.0 * n * k * d

    providers: list[tuple[str, Callable[[], torch.Tensor], int, str]] = []
    for chunk in (512, n):  # 512 rows: the CPU default at K = 4096 (2^21 entries); n: no chunking
        providers.append((f"ours (chunk {chunk})", lambda c=chunk: sinkhorn_ops.sinkhorn_assign(
            x, e, chunk_size=c), 2 + ITERS, "exact"))
        providers.append((f"ours guard=1e-8 (chunk {chunk})", lambda c=chunk:
                          sinkhorn_ops.sinkhorn_assign(x, e, chunk_size=c, guard=1e-8),
                          2 + ITERS, "published"))
    providers.append(("eager published loop", lambda: published(x, e), 1, "published"))
    providers.append(("cdist + sinkhorn_ops.sinkhorn", lambda: through_operator(x, e), 1, "exact"))
    compile_s = None
    if not args.no_compile:
        compiled = torch.compile(published, dynamic=False)
        t0 = time.perf_counter()
        compiled(x, e)
        compile_s = time.perf_counter() - t0
        providers.append(("torch.compile(published loop)", lambda: compiled(x, e), 1, "published"))

    # float64 truths: the fp32 published loop underflows (exp(-10 A) below 1e-38) and drifts.
    truth = {"exact": through_operator(x.double(), e.double()),
             "published": published(x.double(), e.double())}
    rows = []
    for name, fn, passes, kind in providers:
        r = {"provider": name, "N": n, "K": k, "d": d, "dtype": "fp32", "matches": kind}
        try:
            idx = fn()
            r["agreement"] = (idx == truth[kind]).double().mean().item()
            samples = bu.time_ms(fn, "cpu", policy)
            r.update(zip(("ms_p20", "ms_p50", "ms_p80"), bu.quantiles(samples)), reps=len(samples))
            r["gemm_gflops"] = passes * gemm_flop / (r["ms_p50"] * 1e6)
            r["peak_mb"] = cpu_peak_mb(fn)
        except Exception as exc:  # noqa: BLE001 - an OOM or a failing provider is a result
            r["note"] = "OOM" if bu.is_oom(exc) else f"failed: {type(exc).__name__}: {exc}"
        rows.append(r)
        print({kk: bu.fmt(v) for kk, v in r.items()}, flush=True)

    env["load average (end, includes this run)"] = bu.load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    bu.write_csv(args.out / "optvq_cpu.csv", rows, env)
    nk_mb = n * k * 4 / 2**20
    body = [
        (f"- Assignment of N={n} vectors to K={k} codes of d={d}, fp32, epsilon = {EPSILON}, "
         f"{ITERS} iterations, normalisation \"all\"; threads = {args.threads}."),
        "- ours: sinkhorn_ops.sinkhorn_assign, distances recomputed by GEMM per pass (1 statistics "
        f"+ {ITERS} iterations + 1 assignment = {ITERS + 2} passes); guard=1e-8 replays the "
        "published loop's guards. eager: cdist, normalise, the published kernel-domain loop, "
        "argmax. compile: torch.compile of that function"
        + (f", compile time {compile_s:.1f} s excluded." if compile_s is not None else " (not run)."),
        ("- agreement: fraction of indices equal to the same math computed in float64 on the "
         "materialised matrix (\"exact\": cdist + sinkhorn_ops.sinkhorn; \"published\": the "
         "published loop with its guards)."),
        (f"- peak MB: live CPU allocations during one call (torch.profiler memory events); "
         f"one N x K fp32 matrix is {nk_mb:.0f} MB. GEMM GFLOP/s: distance GEMMs (2 N K d each) "
         "per second."),
        "",
        bu.markdown_table(
            ["provider", "ms p50 (p20–p80)", "GEMM GFLOP/s", "peak MB", "matches", "agreement",
             "note"],
            [[r["provider"],
              f"{bu.fmt(r.get('ms_p50'))} ({bu.fmt(r.get('ms_p20'))}–{bu.fmt(r.get('ms_p80'))})",
              r.get("gemm_gflops"), r.get("peak_mb"), r["matches"], r.get("agreement"),
              r.get("note", "")] for r in rows]),
    ]
    bu.write_markdown(args.out / "optvq_cpu.md", "OptVQ assignment benchmark (cpu)", env, body)
    print(f"wrote {args.out / 'optvq_cpu.csv'} and .md")


if __name__ == "__main__":
    main()
