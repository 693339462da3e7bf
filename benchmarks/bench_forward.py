"""Forward benchmark of sinkhorn_ops.sinkhorn against same-run baselines: the eager reference,
torch.compile of the reference, and POT's ot.bregman.sinkhorn_log.

    python benchmarks/bench_forward.py --device cpu [--quick] [--cases attention,mhc] [--out DIR]

Each case builds its inputs once; the correctness check, every timing and the memory peak use
them. Writes <out>/forward_<device>.csv (one row per case, dtype and provider) and .md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
import traceback
from typing import Callable

import torch

import _bench_util as bu

sys.path.append(str(bu.ROOT))  # run from a checkout without installing; an install wins
import sinkhorn_ops  # noqa: E402
from sinkhorn_ops.reference import sinkhorn_reference  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    n: int
    m: int
    steps: int  # the step count, or the cap when tol > 0
    start: str
    marginals: str  # "default" (a = b = None), "ones", or "uniform" (1/n and 1/m)
    tol: float = 0.0
    eps: float | None = None  # OT: S = -C/eps, C = normalised squared distances of 2-D points
    target: tuple[str, float] | None = None  # CPU goal: (baseline, minimum baseline_ms / ours_ms)


# start="col" for OT: POT's iteration is a column step then a row step, so POT with K/2
# iterations computes the same plan as our K steps and the two can be checked against each other.
CASES = [
    Case("attention", 64, 128, 128, 3, "row", "default", target=("eager", 3.0)),
    Case("mhc", 32768, 4, 4, 40, "col", "ones", target=("eager", 20.0)),
    Case("ot", 1, 2000, 2000, 2000, "col", "uniform", tol=1e-6, eps=0.05, target=("pot", 5.0)),
    Case("ot_batch", 16, 1024, 1024, 50, "col", "uniform", eps=0.05),
]
PROVIDERS = ["ours", "eager", "compile", "pot"]
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclasses.dataclass
class Setup:
    scores: torch.Tensor
    a: torch.Tensor | None
    b: torch.Tensor | None
    cost: torch.Tensor | None  # fp32 cost matrices for POT (OT cases only)


def make_setup(case: Case, device: str, dtype: torch.dtype, seed: int = 0) -> Setup:
    gen = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.n, case.m)
    cost = None
    if case.eps is None:
        scores = torch.randn(shape, generator=gen)
    else:
        x = torch.rand(case.batch, case.n, 2, generator=gen)
        y = torch.rand(case.batch, case.m, 2, generator=gen)
        # The direct formula, not the matmul one: no cancellation, no negative distances.
        cost = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").square()
        cost = cost / cost.amax(dim=(-2, -1), keepdim=True)
        scores = -cost / case.eps
        cost = cost.to(device)
    a = b = None
    if case.marginals == "ones":
        a, b = torch.ones(case.batch, case.n), torch.ones(case.batch, case.m)
    elif case.marginals == "uniform":  # both sum to 1, as Σa = Σb requires
        a = torch.full((case.batch, case.n), 1 / case.n)
        b = torch.full((case.batch, case.m), 1 / case.m)
    to = (lambda t: None if t is None else t.to(device))  # marginals stay fp32 (accumulation)
    return Setup(scores.to(device, dtype), to(a), to(b), cost)


def max_abs_diff(plan: torch.Tensor, truth: torch.Tensor) -> float:
    return (plan.double() - truth).abs().max().item()


def reason(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:160] if lines else ''}".rstrip(": ")


def failure(exc: BaseException, device: str) -> str:
    """The note for a case that raised: "OOM", or "failed: <reason>" with the traceback printed;
    frees the device's cached memory for the next case."""
    if not bu.is_oom(exc):
        traceback.print_exc()
    bu.free_memory(device)
    return "OOM" if bu.is_oom(exc) else f"failed: {reason(exc)}"


def check(case: Case, s: Setup) -> dict:
    """Our plan against a float64 reference run for the steps our op used; passes when our error
    is at most twice the eager reference's in the same dtype (the FlashAttention rule). With tol,
    also our reported error against tol and the step at which the reference stops."""
    ours = sinkhorn_ops.sinkhorn(s.scores, s.a, s.b, steps=case.steps, start=case.start,
                                 tol=case.tol, return_potentials=True)
    k = int(ours.steps.max()) if ours.steps.numel() else case.steps
    d = (lambda t: None if t is None else t.double())
    truth = sinkhorn_reference(d(s.scores), d(s.a), d(s.b), steps=k, start=case.start).plan
    eager = sinkhorn_reference(s.scores, s.a, s.b, steps=k, start=case.start).plan
    err, err_eager = max_abs_diff(ours.plan, truth), max_abs_diff(eager, truth)
    bound = 2 * err_eager + 1e-6 * truth.abs().max().item()
    problems = []
    if not err <= bound:  # also catches NaN
        problems.append(f"max|ΔP| {err:.3g} > bound {bound:.3g}")
    if case.tol == 0 and not bool((ours.steps == case.steps).all()):
        problems.append(f"steps {ours.steps.unique().tolist()} != {case.steps}")
    info = ""
    if case.tol > 0:
        # The reference's tol loop runs every step of its cap (masked, no host sync), so cap it
        # just past our stopping step to learn where it stops.
        ref_k = sinkhorn_reference(s.scores, s.a, s.b, steps=min(k + 2, case.steps),
                                   start=case.start, tol=case.tol).steps
        mass = (s.a.sum(-1) if s.a is not None else torch.full_like(ours.error, case.n)).float()
        stopped = ours.steps < case.steps
        if bool((stopped & (ours.error > case.tol * mass * (1 + 1e-4))).any()):
            problems.append(f"stopped with error {ours.error.max().item():.3g} > tol·Σa")
        info = (f"op error max {ours.error.max().item():.3g} (tol·Σa "
                f"{case.tol * mass.max():.3g}); the fp32 reference stops after "
                f"{ref_k.unique().tolist()} steps")
    note = "; ".join(([f"check failed: {', '.join(problems)}"] if problems else [])
                     + ([info] if info else []))
    return dict(steps=k, truth=truth, err=err, err_eager=err_eager, ok=not problems, note=note)


def compiled_reference(case: Case, s: Setup, k: int) -> tuple[Callable[[], object], float]:
    """torch.compile of the reference for a fixed k steps (a tol loop would stop data-dependently);
    the first call compiles and is timed separately."""
    return bu.compiled_call(
        functools.partial(sinkhorn_reference, steps=k, start=case.start, tol=0.0),
        lambda fn: fn(s.scores, s.a, s.b), s.scores.device.type)


def pot_solver(case: Case, s: Setup, k: int, device: str) -> Callable[[], list]:
    """POT's log-domain Sinkhorn per problem (it has no batch), numpy on CPU, torch on CUDA.
    stopThr=0 makes it run exactly numItermax iterations of two steps each."""
    import ot

    iters = math.ceil(k / 2)
    conv = (lambda t: t.cpu().numpy()) if device == "cpu" else (lambda t: t)
    probs = [(conv(s.a[i]), conv(s.b[i]), conv(s.cost[i])) for i in range(case.batch)]

    def run() -> list:
        return [ot.bregman.sinkhorn_log(a, b, c, case.eps, numItermax=iters, stopThr=0.0,
                                        log=True, warn=False) for a, b, c in probs]
    return run


def row(case: Case, dtype: torch.dtype, provider: str, **kw) -> dict:
    r = dict(case=case.name, problem=f"{case.batch}x{case.n}x{case.m}", dtype=DTYPE_NAMES[dtype],
             provider=provider, steps=None, ms_p20=None, ms_p50=None, ms_p80=None, reps=None,
             speedup=None, **bu.PAIRED_FIELDS, gb_s=None, copy_share=None, peak_mb=None,
             max_abs_diff=None, check=None, compile_s=None, note="")
    r.update(kw)
    return r


def timed(r: dict, fn: Callable[[], object], device: str, policy: dict,
          warm_s: float | None = None) -> dict:
    """Fills the timing and memory fields of r, or records OOM / the failure in its note."""
    try:
        samples = bu.time_ms(fn, device, policy, warm_s)
        r.update(zip(("ms_p20", "ms_p50", "ms_p80"), bu.quantiles(samples)), reps=len(samples))
        r["peak_mb"] = bu.peak_mb(fn, device)
    except Exception as exc:  # noqa: BLE001 - a baseline failing must not stop the run
        # The failure goes first: the table shows the note's text before the first colon.
        why = "OOM" if bu.is_oom(exc) else f"failed: {reason(exc)}"
        r["note"] = f"{why}; {r['note']}" if r["note"] else why
        bu.free_memory(device)
    return r


def run_case(case: Case, dtype: torch.dtype, device: str, policy: dict) -> list[dict]:
    name = f"{case.name} {DTYPE_NAMES[dtype]}"
    print(f"[{name}] setup and check", flush=True)
    try:
        s = make_setup(case, device, dtype)
        c = check(case, s)
    except Exception as exc:  # noqa: BLE001
        note = failure(exc, device)
        return [row(case, dtype, "ours", note=note, check="FAIL" if note != "OOM" else None)]
    k, rows = c["steps"], []

    ours = row(case, dtype, "ours", steps=k, max_abs_diff=c["err"],
               check="ok" if c["ok"] else "FAIL", note=c["note"])
    print(f"[{name}] ours", flush=True)
    timed(ours, lambda: sinkhorn_ops.sinkhorn(s.scores, s.a, s.b, steps=case.steps,
                                              start=case.start, tol=case.tol), device, policy)
    rows.append(ours)
    io_bytes = 2 * s.scores.numel() * s.scores.element_size()  # one read of S, one write of P
    if ours["ms_p50"]:
        ours["gb_s"] = io_bytes / (ours["ms_p50"] * 1e-3) / 1e9
    if device == "cuda":  # the bandwidth baseline: a copy moving the same bytes, same run
        print(f"[{name}] copy", flush=True)
        cp = timed(row(case, dtype, "copy", note=f"copy_ of {io_bytes // 2} bytes"),
                   bu.copy_fn(io_bytes, device), device, policy)
        if cp["ms_p50"]:
            cp["gb_s"] = io_bytes / (cp["ms_p50"] * 1e-3) / 1e9
            if ours["gb_s"]:
                ours["copy_share"] = ours["gb_s"] / cp["gb_s"]
        rows.append(cp)

    # Baselines run the k steps our op used, without tol: the reference's tol loop would run all
    # case.steps steps (it masks finished problems rather than leaving the loop).
    print(f"[{name}] eager", flush=True)
    eager = row(case, dtype, "eager", steps=k, max_abs_diff=c["err_eager"])
    eager_fn = lambda: sinkhorn_reference(s.scores, s.a, s.b, steps=k, start=case.start)  # noqa: E731
    timed(eager, eager_fn, device, policy)
    rows.append(eager)
    base_fns = {"eager": eager_fn}

    print(f"[{name}] compile", flush=True)
    comp = row(case, dtype, "compile", steps=k)
    try:
        fn, comp["compile_s"] = compiled_reference(case, s, k)
        comp["max_abs_diff"] = max_abs_diff(fn()[0], c["truth"])
        rows.append(timed(comp, fn, device, policy))
    except Exception as exc:  # noqa: BLE001
        comp["note"] = "OOM" if bu.is_oom(exc) else f"compile failed: {reason(exc)}"
        rows.append(comp)
        bu.free_memory(device)

    pot = row(case, dtype, "pot")
    if case.eps is None:
        pot["note"] = "n/a: POT takes a cost matrix and one problem per call; run for OT cases only"
    elif dtype != torch.float32:
        pot["note"] = "n/a: POT runs fp32/fp64 only"
    else:
        print(f"[{name}] pot", flush=True)
        try:
            fn = pot_solver(case, s, k, device)
            t0 = time.perf_counter()
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            warm_s = time.perf_counter() - t0
            plan = torch.stack([torch.as_tensor(p) for p, _ in out]).to(c["truth"].device)
            iters = out[0][1]["niter"] + 1  # POT logs the index of its last iteration
            pot.update(steps=2 * iters, max_abs_diff=max_abs_diff(plan, c["truth"]),
                       note=f"{iters} POT iterations (2 steps each)")
            timed(pot, fn, device, policy, warm_s)
            base_fns["pot"] = fn
        except Exception as exc:  # noqa: BLE001
            pot["note"] = "OOM" if bu.is_oom(exc) else f"failed: {reason(exc)}"
            bu.free_memory(device)
    rows.append(pot)

    for r in rows[1:]:
        if r["ms_p50"] and ours["ms_p50"]:
            r["speedup"] = r["ms_p50"] / ours["ms_p50"]
    # The CPU target's ratio again, ours and its baseline timed in alternation (paired_ratio):
    # on a shared host the p50s above come from different minutes.
    base = next((r for r in rows if case.target and r["provider"] == case.target[0]), None)
    if device == "cpu" and base and base["ms_p50"] and ours["ms_p50"]:
        print(f"[{name}] paired", flush=True)
        mine = lambda: sinkhorn_ops.sinkhorn(s.scores, s.a, s.b, steps=case.steps,  # noqa: E731
                                             start=case.start, tol=case.tol)
        bu.set_paired(base, mine, base_fns[base["provider"]], device, ours["ms_p50"], policy)
    del s, c
    bu.free_memory(device)
    return rows


def markdown(rows: list[dict], device: str) -> list[str]:
    by = {(r["case"], r["dtype"], r["provider"]): r for r in rows}
    cases = {c.name: c for c in CASES}
    header = ["case", "B×n×m", "dtype", "steps", "ours ms p50 (p20–p80)", "GB/s", "eager ms",
              "×eager", "compile ms", "×compile", "POT ms", "×POT", "max abs ΔP ours / eager",
              "check"]
    if device == "cuda":
        header[6:6] = ["copy ms", "share of copy GB/s", "peak MiB ours / eager / compile / POT"]
    if device == "cpu":
        header.append("target")
    table, notes = [], []
    for key in dict.fromkeys((r["case"], r["dtype"]) for r in rows):
        get = lambda p: by.get((*key, p), {})  # noqa: E731
        o = get("ours")

        def ms(p: str) -> str:  # the time, or the short form of why there is none ("OOM")
            r = get(p)
            why = (r.get("note") or "—").split(":")[0]
            return bu.fmt(r["ms_p50"]) if r.get("ms_p50") else why

        ours_ms = ms("ours")
        if o.get("ms_p50"):
            ours_ms += f" ({bu.fmt(o['ms_p20'])}–{bu.fmt(o['ms_p80'])})"
        cells = [key[0], o.get("problem"), key[1], o.get("steps"), ours_ms, o.get("gb_s"),
                 ms("eager"), get("eager").get("speedup"),
                 ms("compile"), get("compile").get("speedup"),
                 ms("pot"), get("pot").get("speedup"),
                 f"{bu.fmt(o.get('max_abs_diff'))} / {bu.fmt(get('eager').get('max_abs_diff'))}",
                 o.get("check")]
        if device == "cuda":
            share = o.get("copy_share")
            cells[6:6] = [ms("copy"), "—" if share is None else f"{share:.0%}",
                          " / ".join(bu.fmt(get(p).get("peak_mb")) for p in PROVIDERS)]
        if device == "cpu":
            case = cases[key[0]]
            goal = ""
            if case.target:
                base, need = case.target
                goal = bu.target_cell(get(base), need, base)
            cells.append(goal)
        table.append(cells)
        for p in PROVIDERS:
            r = get(p)
            text = [r["note"]] if r.get("note") else []
            if r.get("compile_s"):
                text.append(f"compiled in {r['compile_s']:.1f} s")
            if text:
                notes.append(f"- {key[0]} {key[1]} {p}: " + "; ".join(text))
    backend = "numpy" if device == "cpu" else "torch (CUDA tensors)"
    return [
        bu.PAIRED_LEGEND,
        "- Times: ms per call, p50 (p20–p80 for ours). ×X = X ms / ours ms: above 1, ours is "
        "faster. GB/s = (one read of S + one write of P) / ours p50. On CUDA, copy: a "
        "device-to-device copy_ moving the same bytes in the same run; share of copy GB/s = "
        "ours GB/s / the copy's.",
        "- steps: the steps our op ran (with tol, where it stopped). The baselines run exactly "
        "that many steps with tol = 0: the reference's tol loop masks finished problems and "
        "would run all of its cap.",
        "- eager: sinkhorn_ops.reference.sinkhorn_reference. compile: torch.compile of it for "
        "the fixed step count, compile time excluded (in the notes). POT: ot.bregman.sinkhorn_log, "
        f"{backend} backend, one call per problem, ceil(steps/2) iterations of two steps each.",
        "- check: our plan against a float64 reference run for the same steps; it passes when "
        "our max abs error is at most twice the eager reference's in the same dtype. The other "
        "providers' errors are in the CSV.",
        "", bu.markdown_table(header, table), "", "Notes:", "", *notes]


def main() -> int:
    p = bu.bench_parser(__doc__, "fewer repeats (about 1 s of calls each)")
    p.add_argument("--cases", default=",".join(c.name for c in CASES),
                   help="comma-separated subset of: " + ", ".join(c.name for c in CASES))
    args = bu.parse_bench_args(p)
    wanted = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {c.name for c in CASES})
    if unknown:
        p.error(f"unknown case(s) {unknown}; choose from {[c.name for c in CASES]}")

    env = bu.environment(args.device)
    dtypes = [torch.float32] + ([torch.bfloat16] if args.device == "cuda" else [])
    policy = bu.QUICK if args.quick else bu.FULL
    rows = []
    for case in (c for c in CASES if c.name in wanted):
        for dtype in dtypes:
            rows += run_case(case, dtype, args.device, policy)
            # After every case, so that a run cut short keeps what it measured.
            bu.write_results(args.out, f"forward_{args.device}",
                             f"sinkhorn forward benchmark ({args.device})", rows, dict(env),
                             markdown(rows, args.device))
    failed = [f"{r['case']} {r['dtype']}" for r in rows if r["check"] == "FAIL"]
    if failed:
        print("correctness check FAILED for: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
