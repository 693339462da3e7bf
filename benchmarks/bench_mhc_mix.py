"""mHC stream mixings alone (MATH.md section 4): the sub-layer's input H_pre x
(sinkhorn_ops.mhc_branch_input) and the next streams H_res x + H_postᵀ y (sinkhorn_ops.mhc_combine),
forward and forward+backward, at n = 4 streams in fp32 and bf16, against the same formulas in
eager PyTorch and torch.compile of them, and (CUDA) a device-to-device copy of the bytes each
must move, timed in the same run.

    python benchmarks/bench_mhc_mix.py --device cpu|cuda [--quick] [--out DIR]

These are memory-bound: a mixing reads each stream once and writes its output once, so the
copy share (ours GB/s over the copy's) is the figure of merit. Correctness is checked first
against the formulas in float64. Writes <out>/mhc_mix_<device>.csv (one row per measurement) and .md.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

import _bench_util as bu
import bench_forward as bf  # timed(), reason(), max_abs_diff(); puts the checkout on sys.path
import torch

import sinkhorn_ops

N = 4
MODES = ("forward", "forward+backward")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def pre_eager(x, h_pre, y=None, h_res=None):
    return (h_pre.to(x.dtype).unsqueeze(-1) * x).sum(-2)


def post_eager(x, h_post, y, h_res):
    mixed = (h_res.to(x.dtype).unsqueeze(-1) * x.unsqueeze(-3)).sum(-2)
    return mixed + h_post.to(x.dtype).unsqueeze(-1) * y.unsqueeze(-2)


def pre_ours(x, h_pre, y=None, h_res=None):
    return sinkhorn_ops.mhc_branch_input(x, h_pre)


def post_ours(x, h_post, y, h_res):
    return sinkhorn_ops.mhc_combine(x, y, h_post, h_res)


OPS = {"pre": (pre_ours, pre_eager), "post": (post_ours, post_eager)}


def shapes(device: str, quick: bool) -> tuple[int, int]:
    """(tokens, C): about 256 MB of fp32 streams on CUDA, 32 MB on CPU."""
    if device == "cuda":
        return (4096 if quick else 16384), 4096
    return 2048, 1024


def inputs(tokens: int, dim: int, dtype: torch.dtype, device: str) -> dict:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device, dt)

    return dict(x=rnd(tokens, N, dim), y=rnd(tokens, dim),
                h=rnd(tokens, N, dt=torch.float32).sigmoid(),
                h_res=rnd(tokens, N, N, dt=torch.float32).softmax(-1))


def call(fn: Callable, op: str, t: dict, mode: str, up: torch.Tensor) -> object:
    """The output, or the gradients of every input for the upstream gradient up."""
    args = (t["x"], t["h"], t["y"], t["h_res"]) if op == "post" else (t["x"], t["h"])
    if mode == "forward":
        with torch.no_grad():
            return fn(*args)
    leaves = [a.detach().requires_grad_() for a in args]
    return torch.autograd.grad(fn(*leaves), leaves, up)


def moved_bytes(op: str, t: dict, mode: str) -> int:
    """Least traffic of the activations (the mappings are n or n² values a token): pre reads x,
    writes h; post reads x and y, writes x'. The backward adds: pre reads dh and x, writes dx;
    post reads dx', x and y, writes dx and dy."""
    xs, ys = (t[k].numel() * t[k].element_size() for k in ("x", "y"))
    fwd = xs + ys if op == "pre" else 2 * xs + ys
    bwd = ys + 2 * xs if op == "pre" else 3 * xs + 2 * ys
    return fwd + (bwd if mode == "forward+backward" else 0)


def flat(result: object) -> list[torch.Tensor]:
    return [result] if isinstance(result, torch.Tensor) else list(result)


def check(op: str, t: dict, mode: str, up: torch.Tensor) -> dict:
    """Ours against the eager formula in float64; passes when within twice the eager formula's
    own error in the run's dtype (+1e-5 of the truth's largest value)."""
    mine, eager = OPS[op]
    t64 = {k: v.double() for k, v in t.items()}
    truth = flat(call(eager, op, t64, mode, up.double()))
    err = max(bf.max_abs_diff(a, b) for a, b in zip(flat(call(mine, op, t, mode, up)), truth))
    err_eager = max(bf.max_abs_diff(a, b)
                    for a, b in zip(flat(call(eager, op, t, mode, up)), truth))
    scale = max(b.abs().max().item() for b in truth)
    return dict(err=err, err_eager=err_eager, ok=err <= 2 * err_eager + 1e-5 * scale)


def row(op: str, dtype: str, tokens: int, dim: int, mode: str, provider: str, **kw) -> dict:
    r = dict(op=op, dtype=dtype, tokens=tokens, problem=f"{tokens}x{N}x{dim}", mode=mode,
             provider=provider, ms_p20=None, ms_p50=None, ms_p80=None, reps=None, speedup=None,
             gb_s=None, copy_share=None, peak_mb=None, err_fp64=None, err_fp64_eager=None,
             check=None, compile_s=None, note="")
    r.update(kw)
    return r


def run(op: str, dname: str, device: str, quick: bool, policy: dict) -> list[dict]:
    tokens, dim = shapes(device, quick)
    t = inputs(tokens, dim, DTYPES[dname], device)
    mine, eager = OPS[op]
    rows = []
    for mode in MODES:
        name = f"[{op} {dname} {tokens}x{N}x{dim} {mode}]"
        out = call(eager, op, t, "forward", None)
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device,
                                                                                 out.dtype)
        nbytes = moved_bytes(op, t, mode)
        print(f"{name} check", flush=True)
        c = check(op, t, mode, up)
        o = row(op, dname, tokens, dim, mode, "ours", err_fp64=c["err"],
                err_fp64_eager=c["err_eager"], check="ok" if c["ok"] else "FAIL")
        print(f"{name} ours", flush=True)
        bf.timed(o, functools.partial(call, mine, op, t, mode, up), device, policy)
        e = row(op, dname, tokens, dim, mode, "eager", err_fp64=c["err_eager"])
        print(f"{name} eager", flush=True)
        bf.timed(e, functools.partial(call, eager, op, t, mode, up), device, policy)
        comp = row(op, dname, tokens, dim, mode, "compile")
        print(f"{name} compile", flush=True)
        try:
            fn, comp["compile_s"] = bu.compiled_call(
                eager, lambda compiled: call(compiled, op, t, mode, up), device)
            bf.timed(comp, fn, device, policy)
        except Exception as exc:  # noqa: BLE001 - a baseline failing must not stop the run
            comp["note"] = "OOM" if bu.is_oom(exc) else f"compile failed: {bf.reason(exc)}"
            bu.free_memory(device)
        group = [o, e, comp]
        if device == "cuda":
            cp = row(op, dname, tokens, dim, mode, "copy", note=f"copy_ of {nbytes // 2} bytes")
            print(f"{name} copy", flush=True)
            bf.timed(cp, bu.copy_fn(nbytes, device), device, policy)
            group.append(cp)
        for r in group:
            if r["ms_p50"]:
                r["gb_s"] = nbytes / (r["ms_p50"] * 1e-3) / 1e9
                if o["ms_p50"] and r is not o:
                    r["speedup"] = r["ms_p50"] / o["ms_p50"]
        if device == "cuda" and o["gb_s"] and group[-1]["gb_s"]:
            o["copy_share"] = o["gb_s"] / group[-1]["gb_s"]
        rows += group
        bu.free_memory(device)
    return rows


def markdown(rows: list[dict], device: str) -> list[str]:
    head = ["op", "dtype", "T×n×C", "mode", "ours ms p50 (p20–p80)", "GB/s", "copy ms",
            "share of copy GB/s", "eager ms", "×eager", "compile ms", "×compile",
            "err vs fp64 ours / eager", "check"]
    body = []
    for key in dict.fromkeys((r["op"], r["dtype"], r["mode"]) for r in rows):
        g = {r["provider"]: r for r in rows if (r["op"], r["dtype"], r["mode"]) == key}
        o, e, c, cp = (g.get(p, {}) for p in ("ours", "eager", "compile", "copy"))

        def ms(r: dict, spread: bool = False) -> str:
            if not r.get("ms_p50"):
                return (r.get("note") or "—").split(":")[0]
            text = bu.fmt(r["ms_p50"])
            return text + (f" ({bu.fmt(r['ms_p20'])}–{bu.fmt(r['ms_p80'])})" if spread else "")

        share = f"{o['copy_share']:.0%}" if o.get("copy_share") else "—"
        body.append([key[0], key[1], o.get("problem"), key[2], ms(o, True), o.get("gb_s"),
                     ms(cp) if cp else "—", share, ms(e), e.get("speedup"), ms(c),
                     c.get("speedup"),
                     f"{bu.fmt(o.get('err_fp64'))} / {bu.fmt(o.get('err_fp64_eager'))}",
                     o.get("check")])
    return [
        "- pre: h = Σ_j H_pre_j x_j (sinkhorn_ops.mhc_branch_input); post: x'_i = Σ_j H_res_ij x_j"
        " + H_post_i y (sinkhorn_ops.mhc_combine); n = 4, mappings in fp32. eager: the same "
        "formulas as broadcast products and sums in the activation dtype; compile: "
        "torch.compile of them (compile time excluded).",
        "- forward+backward: the outputs and torch.autograd.grad of every input for a fixed "
        "upstream gradient.",
        "- Times: ms per call, p50. ×X = X ms / ours ms. GB/s = least traffic of the activations"
        " / p50 (bench_mhc_mix.py moved_bytes)." + (" share of copy: ours GB/s over a "
        "device-to-device copy_ moving the same bytes, timed in this run." if device == "cuda"
        else ""),
        "- check: ours against the formulas in float64; passes when within twice the eager "
        "formulas' own error in the run's dtype (+1e-5 of the truth's largest value).",
        "",
        bu.markdown_table(head, body),
    ]


def main() -> int:
    p = bu.bench_parser(__doc__, "fewer repeats; on CUDA 4096 tokens")
    args = bu.parse_bench_args(p)
    env = bu.environment(args.device)
    policy = bu.QUICK if args.quick else bu.FULL
    rows: list[dict] = []
    for op in OPS:
        for dname in DTYPES:
            rows += run(op, dname, args.device, args.quick, policy)
            bu.write_results(args.out, f"mhc_mix_{args.device}",
                             f"mHC stream mixings ({args.device})", rows, dict(env),
                             markdown(rows, args.device))
    failed = [f"{r['op']} {r['dtype']} {r['mode']}" for r in rows if r.get("check") == "FAIL"]
    if failed:
        print("correctness check FAILED for: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
