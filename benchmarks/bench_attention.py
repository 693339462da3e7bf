"""Sinkhorn attention benchmark: sinkhorn_ops.sinkhorn_attention against
F.scaled_dot_product_attention (softmax) and the eager Sinkformers-style implementation of the
test suite, forward (no grad) and forward+backward, time and memory (MATH.md section 3).

    python benchmarks/bench_attention.py --device cpu|cuda [--quick] [--out DIR]

8 heads, head dimension 64, self-attention (L = S), batch 4 at L = 128 and 1 above; L in
{128, 512, 1024}, plus 4096 on CUDA (--quick on CPU: {128, 512}); steps in {1, 3}. Each (L, dtype)
builds q, k, v and the loss weight W once; the correctness check and every timing use them.
Writes <out>/attention_<device>.csv (one row per L, dtype, mode, provider and steps) and .md.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import _bench_util as bu
import bench_forward as bf  # its timing wrapper (OOM as a note) and error helpers
import torch
import torch.nn.functional as F

import sinkhorn_ops  # bench_forward has put the checkout on sys.path

# The reference comes from the test suite, so the benchmark and the tests never drift apart.
sys.path.append(str(bu.ROOT / "tests"))
from test_attention import sinkformer_reference

HEADS, DIM = 8, 64
STEPS = (1, 3)
MODES = ("forward", "fwd+bwd")
PROVIDERS = ("ours", "sdpa", "eager")
GPU_GOAL = 2.5  # CUDA, steps = 3: ours ms / SDPA ms at most this
DQ_CHECK_L = 128  # dq is checked at this L only (the fp64 autograd graph grows as L²)


def lengths(device: str, quick: bool) -> list[int]:
    if device == "cuda":
        return [128, 512, 1024, 4096]
    return [128, 512] if quick else [128, 512, 1024]


def batch_of(L: int) -> int:
    return 4 if L == 128 else 1


@dataclasses.dataclass
class Setup:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    w: torch.Tensor  # loss = (O * W).sum(), so dO = W


def make_setup(L: int, device: str, dtype: torch.dtype, seed: int = 0) -> Setup:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_of(L), HEADS, L, DIM)
    return Setup(*(torch.randn(shape, generator=gen).to(device, dtype) for _ in range(4)))


def attention(provider: str, steps: int | None) -> Callable[..., torch.Tensor]:
    if provider == "ours":
        return lambda q, k, v: sinkhorn_ops.sinkhorn_attention(q, k, v, steps=steps)
    if provider == "sdpa":
        return F.scaled_dot_product_attention
    return lambda q, k, v: sinkformer_reference(q, k, v, steps)[0]


def leaves(s: Setup) -> tuple[torch.Tensor, ...]:
    return tuple(t.detach().requires_grad_() for t in (s.q, s.k, s.v))


def call(fn: Callable[..., torch.Tensor], s: Setup, mode: str) -> Callable[[], object]:
    """One timed call: the forward under no_grad, or forward, loss and grads w.r.t. q, k, v."""
    if mode == "forward":
        def run() -> object:
            with torch.no_grad():
                return fn(s.q, s.k, s.v)
        return run
    q, k, v = leaves(s)
    return lambda: torch.autograd.grad((fn(q, k, v) * s.w).sum(), (q, k, v))


def saved_bytes(fn: Callable[..., torch.Tensor], s: Setup) -> int:
    with bu.SavedBytes() as saved:
        fn(*leaves(s))
    return saved.nbytes


def out_and_dq(fn: Callable[..., torch.Tensor], s: Setup, dtype: torch.dtype,
               want_dq: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    q, k, v, w = (t.to(dtype) for t in (s.q, s.k, s.v, s.w))
    q = q.detach().requires_grad_(want_dq)
    out = fn(q, k, v)
    dq = torch.autograd.grad((out * w).sum(), q)[0] if want_dq else None
    return out.detach(), dq


def check(s: Setup, steps: int, dtype: torch.dtype) -> dict:
    """Ours and the eager implementation, both in dtype, against the eager one in float64: O, and
    dq at L = DQ_CHECK_L. Passes when our error is at most twice the eager one's in the same
    dtype (+1e-6·max|truth|), the FlashAttention rule; max abs ours − eager is what is reported."""
    want_dq = s.q.shape[-2] == DQ_CHECK_L
    ours = out_and_dq(attention("ours", steps), s, dtype, want_dq)
    eager = out_and_dq(attention("eager", steps), s, dtype, want_dq)
    truth = out_and_dq(attention("eager", steps), s, torch.float64, want_dq)
    r, problems = {}, []
    for i, name in enumerate(("o", "dq")):
        if truth[i] is None:
            continue
        err, err_eager = bf.max_abs_diff(ours[i], truth[i]), bf.max_abs_diff(eager[i], truth[i])
        r.update({f"diff_{name}": bf.max_abs_diff(ours[i], eager[i].double()),
                  f"err_{name}": err, f"err_{name}_eager": err_eager})
        bound = 2 * err_eager + 1e-6 * truth[i].abs().max().item()
        if not err <= bound:  # also catches NaN
            problems.append(f"max|Δ{name}| vs fp64 {err:.3g} > bound {bound:.3g}")
    r["check"] = "FAIL" if problems else "ok"
    r["note"] = f"check failed: {', '.join(problems)}" if problems else ""
    return r


def row(s: Setup, dtype: torch.dtype, mode: str, provider: str, steps: int | None, **kw) -> dict:
    b, h, L, d = s.q.shape
    r = {"L": L, "problem": f"{b}x{h}x{L}x{d}", "dtype": bf.DTYPE_NAMES[dtype], "mode": mode,
         "provider": provider, "steps": steps}
    r.update(dict.fromkeys(("ms_p20", "ms_p50", "ms_p80", "reps", "gflop_s", "x_sdpa_time",
                            "x_eager", "peak_mb", "saved_bytes", "diff_o", "diff_dq", "err_o",
                            "err_o_eager", "err_dq", "err_dq_eager", "check")), note="")
    r.update(kw)
    return r


def matmul_flops(s: Setup, mode: str) -> float:
    """Q Kᵀ and P V, 2·L²·d each per head; the backward's four (dV, dP, dQ, dK) double that."""
    b, h, L, d = s.q.shape
    return 4 * b * h * L * L * d * (1 if mode == "forward" else 3)


def run_length(L: int, dtype: torch.dtype, device: str, policy: dict) -> list[dict]:
    name = f"L={L} {bf.DTYPE_NAMES[dtype]}"
    print(f"[{name}] setup and check", flush=True)
    try:
        s = make_setup(L, device, dtype)
    except Exception as exc:  # noqa: BLE001
        note = bf.failure(exc, device)
        return [{"L": L, "dtype": bf.DTYPE_NAMES[dtype], "provider": "ours", "note": note}]
    checks = {}
    for k in STEPS:
        try:
            checks[k] = check(s, k, dtype)
        except Exception as exc:  # noqa: BLE001 - recorded, the timings still run
            why = bf.failure(exc, device)
            checks[k] = {"check": "FAIL" if why != "OOM" else None, "note": f"check {why}"}
        bu.free_memory(device)

    rows = []
    for mode in MODES:
        todo = [("sdpa", None)] + [(p, k) for k in STEPS for p in ("ours", "eager")]
        got = {}
        for p, k in todo:
            r = row(s, dtype, mode, p, k, **(checks[k] if p == "ours" else {}))
            print(f"[{name}] {mode} {p}" + (f" steps={k}" if k else ""), flush=True)
            fn = attention(p, k)
            try:
                if mode != "forward":
                    r["saved_bytes"] = saved_bytes(fn, s)
                bf.timed(r, call(fn, s, mode), device, policy)
            except Exception as exc:  # noqa: BLE001 - one provider failing must not stop the run
                why = bf.failure(exc, device)
                r["note"] = f"{why}; {r['note']}" if r["note"] else why
            if r["ms_p50"]:
                r["gflop_s"] = matmul_flops(s, mode) / (r["ms_p50"] * 1e-3) / 1e9
            got[p, k] = r
            rows.append(r)
            bu.free_memory(device)
        sdpa_ms = got["sdpa", None]["ms_p50"]
        for k in STEPS:
            ours, eager = got["ours", k], got["eager", k]
            for r in (ours, eager):
                if r["ms_p50"] and sdpa_ms:
                    r["x_sdpa_time"] = r["ms_p50"] / sdpa_ms
            if ours["ms_p50"] and eager["ms_p50"]:
                ours["x_eager"] = eager["ms_p50"] / ours["ms_p50"]
    del s
    bu.free_memory(device)
    return rows


def mib(x: int | None) -> float | None:
    return None if x is None else x / 2**20


def markdown(rows: list[dict], device: str, quick: bool) -> list[str]:
    by = {(r["L"], r["dtype"], r.get("mode"), r["provider"], r.get("steps")): r for r in rows}
    header = ["L", "B×H×L×d", "dtype", "mode", "steps", "ours ms p50 (p20–p80)", "GFLOP/s",
              "SDPA ms", "× SDPA time", "eager ms", "× eager", "saved MiB ours / SDPA / eager",
              "max abs ΔO ours−eager", "max abs ΔdQ", "check"]
    if device == "cuda":
        header[12:12] = ["peak MiB ours / SDPA / eager"]
        header.append(f"goal (steps=3): ≤{GPU_GOAL:g}× SDPA time")
    table, notes = [], []
    for r in rows:
        if r["provider"] != "ours" or r.get("mode") is None:
            continue
        key = (r["L"], r["dtype"], r["mode"])
        sdpa, eager = by.get((*key, "sdpa", None), {}), by.get((*key, "eager", r["steps"]), {})

        def ms(x: dict, spread: bool = False) -> str:  # the time, or why there is none ("OOM")
            if not x.get("ms_p50"):
                return (x.get("note") or "—").split(":")[0]
            extra = f" ({bu.fmt(x['ms_p20'])}–{bu.fmt(x['ms_p80'])})" if spread else ""
            return bu.fmt(x["ms_p50"]) + extra

        group = (r, sdpa, eager)
        cells = [r["L"], r["problem"], r["dtype"], r["mode"], r["steps"], ms(r, True),
                 r["gflop_s"], ms(sdpa), r["x_sdpa_time"], ms(eager), r["x_eager"],
                 " / ".join(bu.fmt(mib(x.get("saved_bytes"))) for x in group),
                 r["diff_o"], r["diff_dq"], r["check"]]
        if device == "cuda":
            cells[12:12] = [" / ".join(bu.fmt(x.get("peak_mb")) for x in group)]
            goal = ""
            if r["steps"] == 3:
                got = r["x_sdpa_time"]
                goal = "no data" if got is None else ("met" if got <= GPU_GOAL else "NOT met")
            cells.append(goal)
        table.append(cells)
        for x in group:
            text = [x["note"]] if x.get("note") else []
            if x.get("reps") == 1:
                text.append("one timed call: the warm-up took over the policy's slow_s")
            if text:
                notes.append(f"- L={r['L']} {r['dtype']} {r['mode']} steps={r['steps']} "
                             f"{x['provider']}: " + "; ".join(text))
    for r in rows:  # a length whose setup failed has no table row
        if r.get("mode") is None:
            notes.append(f"- L={r['L']} {r['dtype']}: {r['note']}")
    memory = ("peak MiB: torch.cuda.max_memory_allocated of one call beyond what was live "
              "before it (inputs excluded)." if device == "cuda" else
              "CPU peak memory is not measured; saved MiB is the device-agnostic stand-in.")
    quick_note = []
    if quick and device == "cpu":
        quick_note.append("- --quick on CPU: L ∈ {128, 512} only (the full run adds 1024; CUDA "
                          "adds 4096); about 1 s of repeats per timing.")
    return [
        f"- Self-attention, {HEADS} heads, d = {DIM}, batch 4 at L = 128 and 1 above; fp32"
        + (" and bf16." if device == "cuda" else "."),
        ("- forward: one call under torch.no_grad. fwd+bwd: forward, loss = (O ⊙ W).sum() for a "
         "fixed random W, torch.autograd.grad w.r.t. q, k and v. ms p50 (p20–p80)."),
        ("- ours: sinkhorn_ops.sinkhorn_attention(steps=K, grad=\"unrolled\"). SDPA: "
         "F.scaled_dot_product_attention (softmax; independent of steps, so its time is the same "
         "in both rows of a mode). eager: sinkformer_reference of tests/test_attention.py (the "
         "published Sinkformers attention, log domain, K half-steps from the rows), which ours "
         "equals exactly for L = S."),
        ("- × SDPA time = ours ms / SDPA ms: below 1, ours is faster; the GPU goal is ≤ "
         f"{GPU_GOAL:g} at steps = 3. × eager = eager ms / ours ms: above 1, ours is faster."),
        ("- GFLOP/s: matmul FLOPs only (4·B·H·L²·d forward, 3× that for fwd+bwd) over ours p50; "
         "the Sinkhorn steps' exponentials are not counted."),
        "- saved MiB (fwd+bwd rows): bytes of the distinct storages autograd saves for backward "
        "in one forward (saved_tensors_hooks), each counted once, saved q, k, v included. "
        + memory,
        ("- max abs ΔO / ΔdQ: ours against the eager implementation in the same dtype; dQ at "
         f"L = {DQ_CHECK_L} only. check: ours and eager against the eager implementation in "
         "float64; passes when our error is at most twice the eager one's (+1e-6·max|truth|). "
         "The errors are in the CSV."),
        *quick_note,
        "", bu.markdown_table(header, table), "", "Notes:", "", *(notes or ["- none"])]


def main() -> int:
    p = bu.bench_parser(__doc__,
                        "fewer repeats (about 1 s of calls each); on CPU L ∈ {128, 512} only")
    args = bu.parse_bench_args(p)

    env = bu.environment(args.device)
    dtypes = [torch.float32] + ([torch.bfloat16] if args.device == "cuda" else [])
    policy = bu.QUICK if args.quick else bu.FULL
    rows = []
    for L in lengths(args.device, args.quick):
        for dtype in dtypes:
            rows += run_length(L, dtype, args.device, policy)
            # After every length, so that a run cut short keeps what it measured.
            bu.write_results(args.out, f"attention_{args.device}",
                             f"sinkhorn attention benchmark ({args.device})", rows, dict(env),
                             markdown(rows, args.device, args.quick))
    failed = sorted({f"L={r['L']} {r['dtype']} steps={r['steps']}"
                     for r in rows if r.get("check") == "FAIL"})
    if failed:
        print("correctness check FAILED for: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
