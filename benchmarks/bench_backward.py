"""Backward benchmark of sinkhorn_ops.sinkhorn, grad="unrolled" and grad="implicit", against
autograd through the eager reference: time, bytes saved for backward, and gradient checks.

    python benchmarks/bench_backward.py --device cpu [--quick] [--cases attention,mhc] [--out DIR]

Each case builds its inputs and its upstream gradient once. For every step count K each provider
runs one forward under saved-tensor hooks (its bytes saved for backward) and keeps its graph; the
first backward gives the gradient that is checked, and the timing then repeats only
torch.autograd.grad over the kept graph (retain_graph=True), so no forward is timed. Writes
<out>/backward_<device>.csv (one row per case, dtype, K and provider) and .md.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import _bench_util as bu
import bench_forward as bf  # its setup (inputs, OT costs), timing wrapper and error helpers
import torch

import sinkhorn_ops  # bench_forward has put the checkout on sys.path
from sinkhorn_ops.reference import sinkhorn_reference


@dataclasses.dataclass(frozen=True)
class Case:
    """A backward problem; bench_forward.make_setup reads batch, n, m, marginals and eps."""

    name: str
    batch: int
    n: int
    m: int
    start: str
    marginals: str  # "default" (a = b = None), "ones", or "uniform" (1/n and 1/m)
    eps: float | None = None  # OT: S = -C/eps with normalised squared distances C
    target: float | None = None  # CPU goal for both modes: minimum eager ms / ours ms


def make_cases(device: str, quick: bool) -> list[Case]:
    ot_n = 256 if device == "cpu" and quick else 1024
    return [
        Case("attention", 64, 128, 128, "row", "default", target=3.0),
        Case("mhc", 32768, 4, 4, "col", "ones", target=20.0),
        Case("ot", 16, ot_n, ot_n, "col", "uniform", eps=0.05),
    ]


CASE_NAMES = ["attention", "mhc", "ot"]
STEPS = (3, 20, 100)
MODES = ("unrolled", "implicit")
PROVIDERS = (*MODES, "eager")
# Combinations left out of a --quick CPU run to keep it within minutes on 2 shared cores.
QUICK_CPU_SKIP: set[tuple[str, int, str]] = set()
# Problems in the float64 check: the first ones of the batch, about 2^15 scores in all (at least
# one problem), which keeps the reference's K = 100 graphs small.
CHECK_SCORES = 1 << 15


@dataclasses.dataclass
class Graph:
    """One provider's forward, kept alive so that its backward can be repeated."""

    scores: torch.Tensor  # the leaf that requires grad
    plan: torch.Tensor
    grad: torch.Tensor  # dL/dS from the first backward
    first_s: float  # seconds that first backward took (it is the timing's first warm-up)
    saved: int  # bytes saved for backward


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def forward(provider: str, case: Case, scores: torch.Tensor, a, b, k: int) -> torch.Tensor:
    if provider == "eager":
        return sinkhorn_reference(scores, a, b, steps=k, start=case.start).plan
    return sinkhorn_ops.sinkhorn(scores, a, b, steps=k, start=case.start, grad=provider)


def backward(plan: torch.Tensor, scores: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """dL/dS for L = <upstream, P>; the graph stays for the next repeat."""
    return torch.autograd.grad(plan, scores, upstream, retain_graph=True)[0]


def build(provider: str, case: Case, s: bf.Setup, upstream: torch.Tensor, k: int,
          device: str) -> Graph:
    scores = s.scores.detach().requires_grad_()
    with bu.SavedBytes() as saved:
        plan = forward(provider, case, scores, s.a, s.b, k)
    sync(device)
    t0 = time.perf_counter()
    grad = backward(plan, scores, upstream)
    sync(device)
    return Graph(scores, plan, grad, time.perf_counter() - t0, saved.nbytes)


def reference_grad(case: Case, s: bf.Setup, upstream: torch.Tensor, k: int, nb: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Autograd through the reference on the first nb problems, every input cast to dtype."""
    cut = (lambda t: None if t is None else t[:nb].detach().to(dtype))
    scores = cut(s.scores).requires_grad_()
    plan = sinkhorn_reference(scores, cut(s.a), cut(s.b), steps=k, start=case.start).plan
    return torch.autograd.grad(plan, scores, cut(upstream))[0]


def sum_residual(grad: torch.Tensor, plan: torch.Tensor, upstream: torch.Tensor) -> float:
    """Largest row or column sum of dL/dS (zero for the implicit gradient, MATH.md 2.2) over the
    largest row or column L1 mass of Γ = Ḡ ⊙ P, the size of the terms that cancel in it."""
    g = grad.double()
    gamma = (upstream.double() * plan.double()).abs()
    scale = max(gamma.sum(-1).max().item(), gamma.sum(-2).max().item(), 1e-300)
    return max(g.sum(-1).abs().max().item(), g.sum(-2).abs().max().item()) / scale


# Tolerance of the implicit gradient's zero row and column sums, relative to sum_residual's
# scale: the rounding of a sum of n terms in the dtype, with room for the CG residual (1e-6).
SUM_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def time_backward(r: dict, graph: Graph, upstream: torch.Tensor, device: str,
                  policy: dict) -> None:
    """Times the backward over the kept graph into r; the graph is freed on return."""
    bf.timed(r, lambda: backward(graph.plan, graph.scores, upstream), device, policy,
             graph.first_s)


def row(case: Case, dtype: torch.dtype, k: int, provider: str, **kw) -> dict:
    r = {"case": case.name, "problem": f"{case.batch}x{case.n}x{case.m}",
         "dtype": bf.DTYPE_NAMES[dtype], "steps": k, "provider": provider}
    r.update(dict.fromkeys(("ms_p20", "ms_p50", "ms_p80", "reps", "speedup", "gb_s", "peak_mb",
                            "saved_bytes", "saved_bound", "max_abs_diff", "diff_vs", "err_fp64",
                            "err_fp64_eager", "sum_residual", "check")), note="")
    r.update(kw)
    return r


def run_steps(case: Case, dtype: torch.dtype, s: bf.Setup, upstream: torch.Tensor, k: int,
              device: str, policy: dict, skip: set) -> list[dict]:
    name = f"{case.name} {bf.DTYPE_NAMES[dtype]} K={k}"
    elem = s.scores.element_size()
    acc = 8 if dtype == torch.float64 else 4
    size_s = s.scores.numel() * elem
    rows = {p: row(case, dtype, k, p) for p in PROVIDERS}
    rows["unrolled"]["saved_bound"] = 2 * size_s + k * (case.n + case.m) * case.batch * acc

    graphs: dict[str, Graph] = {}
    for p in PROVIDERS:
        if (case.name, k, p) in skip:
            rows[p]["note"] = "skipped in --quick on CPU (the slowest combination)"
            continue
        print(f"[{name}] {p}: forward and first backward", flush=True)
        try:
            graphs[p] = build(p, case, s, upstream, k, device)
            rows[p]["saved_bytes"] = graphs[p].saved
        except Exception as exc:  # noqa: BLE001 - one provider failing must not stop the run
            rows[p]["note"] = bf.failure(exc, device)

    # Correctness before timing. Problems are independent, so the float64 check runs on the
    # first nb of them; the comparisons with the eager fp32 gradient use the whole batch.
    print(f"[{name}] check", flush=True)
    nb = max(1, min(case.batch, CHECK_SCORES // (case.n * case.m)))
    u, i, e = (graphs.get(p) for p in PROVIDERS)
    try:
        truth = reference_grad(case, s, upstream, k, nb, torch.float64)
        err_eager = bf.max_abs_diff(reference_grad(case, s, upstream, k, nb, dtype), truth)
        rows["eager"]["err_fp64"] = err_eager
        if u is not None:
            err = bf.max_abs_diff(u.grad[:nb], truth)
            ok = err <= 2 * err_eager + 1e-6 * truth.abs().max().item()  # False on NaN
            rows["unrolled"].update(err_fp64=err, err_fp64_eager=err_eager,
                                    check="ok" if ok else "FAIL")
            if e is not None:
                rows["unrolled"].update(max_abs_diff=bf.max_abs_diff(u.grad, e.grad.double()),
                                        diff_vs="eager")
        if i is not None:
            res = sum_residual(i.grad, i.plan, upstream)
            ok = res <= SUM_TOL.get(dtype, 1e-4)
            rows["implicit"].update(sum_residual=res, check="ok" if ok else "FAIL")
            if u is not None:
                rows["implicit"].update(max_abs_diff=bf.max_abs_diff(i.grad, u.grad.double()),
                                        diff_vs="unrolled")
        del truth
    except Exception as exc:  # noqa: BLE001
        why = bf.failure(exc, device)
        for p in MODES:
            rows[p]["check"] = "FAIL" if why != "OOM" else None
            rows[p]["note"] = f"check {why}"
    del u, i, e

    for p in PROVIDERS:
        if p in graphs:
            print(f"[{name}] {p}: timing", flush=True)
            time_backward(rows[p], graphs.pop(p), upstream, device, policy)
    for p in MODES:
        r = rows[p]
        if r["ms_p50"]:
            # Least traffic of a backward: read S (or P) and Ḡ, write dL/dS.
            r["gb_s"] = 3 * size_s / (r["ms_p50"] * 1e-3) / 1e9
            if rows["eager"]["ms_p50"]:
                r["speedup"] = rows["eager"]["ms_p50"] / r["ms_p50"]
    return list(rows.values())


def run_case(case: Case, dtype: torch.dtype, device: str, policy: dict, skip: set) -> list[dict]:
    print(f"[{case.name} {bf.DTYPE_NAMES[dtype]}] setup", flush=True)
    try:
        s = bf.make_setup(case, device, dtype)
        gen = torch.Generator().manual_seed(1)
        upstream = torch.randn(s.scores.shape, generator=gen).to(device, dtype)  # Ḡ = dL/dP
    except Exception as exc:  # noqa: BLE001
        note = bf.failure(exc, device)
        return [row(case, dtype, k, p, note=note) for k in STEPS for p in PROVIDERS]
    rows = []
    for k in STEPS:
        rows += run_steps(case, dtype, s, upstream, k, device, policy, skip)
    del s, upstream
    bu.free_memory(device)
    return rows


def mib(x: int | None) -> float | None:
    return None if x is None else x / 2**20


def markdown(rows: list[dict], cases: list[Case], device: str, skip: set) -> list[str]:
    by = {(r["case"], r["dtype"], r["steps"], r["provider"]): r for r in rows}
    targets = {c.name: c.target for c in cases}
    header = ["case", "B×n×m", "dtype", "K", "provider", "backward ms p50 (p20–p80)", "×eager",
              "GB/s", "saved MiB", "bound MiB", "max abs Δ∇S (vs)", "err vs fp64: this / eager",
              "check"]
    if device == "cuda":
        header.append("peak MiB")
    if device == "cpu":
        header.append("target")
    table, notes = [], []
    for r in rows:
        ms = (r["note"] or "—").split(":")[0] if not r["ms_p50"] else (
            f"{bu.fmt(r['ms_p50'])} ({bu.fmt(r['ms_p20'])}–{bu.fmt(r['ms_p80'])})")
        diff = "—" if r["max_abs_diff"] is None else f"{bu.fmt(r['max_abs_diff'])} ({r['diff_vs']})"
        err = bu.fmt(r["err_fp64"])
        if r["err_fp64_eager"] is not None:
            err += f" / {bu.fmt(r['err_fp64_eager'])}"
        cells = [r["case"], r["problem"], r["dtype"], r["steps"], r["provider"], ms,
                 r["speedup"], r["gb_s"], mib(r["saved_bytes"]), mib(r["saved_bound"]), diff,
                 err, r["check"]]
        if device == "cuda":
            cells.append(r["peak_mb"])
        if device == "cpu":
            goal, need = "", targets.get(r["case"])
            if need and r["provider"] in MODES:
                got = r["speedup"]
                verdict = "no data" if got is None else ("met" if got >= need else "NOT met")
                goal = f"≥{need:g}× eager: {verdict}"
            cells.append(goal)
        table.append(cells)
        text = [r["note"]] if r["note"] else []
        if r["reps"] == 1:
            text.append("one timed call: the first backward took over the policy's slow_s")
        if r["sum_residual"] is not None:
            text.append(f"max |row or column sum of ∇S| / max L1 mass of Γ = "
                        f"{r['sum_residual']:.3g}")
        if text:
            notes.append(f"- {r['case']} {r['dtype']} K={r['steps']} {r['provider']}: "
                         + "; ".join(text))

    # Saved bytes side by side over K: the unrolled bound and the implicit K-independence.
    saved_header = ["case", "dtype", "provider", *(f"K={k} MiB" for k in STEPS), "target"]
    saved_table = []
    for case, dtype in dict.fromkeys((r["case"], r["dtype"]) for r in rows):
        for p in PROVIDERS:
            got = [by.get((case, dtype, k, p), {}) for k in STEPS]
            values = [r.get("saved_bytes") for r in got]
            goal = ""
            if None in values:
                goal = "no data" if p in MODES else ""
            elif p == "unrolled":
                met = all(v <= r["saved_bound"] for v, r in zip(values, got))
                goal = f"≤ bound at every K: {'met' if met else 'NOT met'}"
            elif p == "implicit":
                goal = f"same at every K: {'met' if len(set(values)) == 1 else 'NOT met'}"
            saved_table.append([case, dtype, p, *(mib(v) for v in values), goal])

    skipped = ", ".join(f"{c} K={k} {p}" for c, k, p in sorted(skip)) or "none"
    legend = [
        ("- Backward only: each provider's forward runs once, outside the timing, and keeps its "
         "graph; the timing repeats torch.autograd.grad(P, S, Ḡ, retain_graph=True), i.e. dL/dS "
         "of L = <Ḡ, P> for a fixed random Ḡ (a and b do not require grad). ms p50 (p20–p80). "
         "The unrolled backward recomputes the K forward steps itself (it keeps no potentials), "
         "so its time includes that replay."),
        ("- ×eager = eager ms / this ms: above 1, ours is faster. GB/s = (read S, read Ḡ, "
         "write ∇S) / p50. target (CPU): the time goal of the case, applied to both modes."),
        ("- eager: autograd through sinkhorn_ops.reference.sinkhorn_reference (tol = 0). "
         "unrolled / implicit: sinkhorn_ops.sinkhorn(grad=...), the implicit solve dense up to "
         "256 on the smaller side, conjugate gradients above."),
        ("- saved MiB: bytes of the distinct storages packed by "
         "torch.autograd.graph.saved_tensors_hooks during the forward, each counted once, saved "
         "inputs (S, a, b) and outputs (P) included. bound (the unrolled target) = size(S) + "
         "size(P) + K·(n+m)·B·4 bytes."),
        ("- max abs Δ∇S: unrolled against the eager fp32 gradient, implicit against the "
         "unrolled one (they differ until P converges), whole batch."),
        (f"- err vs fp64 and check: on the first max(1, {CHECK_SCORES} / (n·m)) problems of "
         "the batch, against autograd through the reference in float64. unrolled passes when "
         "its error is at most twice the eager fp32 error (+1e-6·max|∇S|); implicit passes "
         "when every row and column sum of its ∇S is zero to "
         f"{SUM_TOL[torch.float32]:g} (fp32) of the largest row or column L1 mass of "
         "Γ = Ḡ ⊙ P (MATH.md 2.2; value in the notes)."),
        f"- Left out (--quick on CPU): {skipped}.",
    ]
    return [*legend, "", bu.markdown_table(header, table), "",
            "Bytes saved for backward against K:", "",
            bu.markdown_table(saved_header, saved_table), "", "Notes:", "", *notes]


def main() -> int:
    p = bu.bench_parser(__doc__,
                        "fewer repeats (about 1 s of calls each); on CPU a 256×256 OT case and "
                        "the slowest combinations left out")
    p.add_argument("--cases", default=",".join(CASE_NAMES),
                   help="comma-separated subset of: " + ", ".join(CASE_NAMES))
    args = bu.parse_bench_args(p)
    wanted = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(CASE_NAMES))
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {CASE_NAMES}")

    env = bu.environment(args.device)
    dtypes = [torch.float32] + ([torch.bfloat16] if args.device == "cuda" else [])
    policy = bu.QUICK if args.quick else bu.FULL
    cases = [c for c in make_cases(args.device, args.quick) if c.name in wanted]
    skip = {x for x in QUICK_CPU_SKIP if x[0] in wanted} \
        if args.quick and args.device == "cpu" else set()
    rows = []
    for case in cases:
        for dtype in dtypes:
            rows += run_case(case, dtype, args.device, policy, skip)
            # After every case, so that a run cut short keeps what it measured.
            bu.write_results(args.out, f"backward_{args.device}",
                             f"sinkhorn backward benchmark ({args.device})", rows, dict(env),
                             markdown(rows, cases, args.device, skip))
    failed = [f"{r['case']} {r['dtype']} K={r['steps']} {r['provider']}"
              for r in rows if r["check"] == "FAIL"]
    if failed:
        print("correctness check FAILED for: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
