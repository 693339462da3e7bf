"""mHC benchmark (MATH.md section 4): the mHC Sinkhorn alone, forward and forward+backward, at
32768 and 1,048,576 tokens of 4×4 logits, for both variants (the paper's and DeepSeek-V4's),
and at 32768 tokens the paper's on logits 40× wider (its kernel's log-domain twin), against the
eager pure-PyTorch reference, torch.compile of it, and Liger-Kernel's mHC Sinkhorn (CUDA, when
installed); then the whole ManifoldConstrainedHyperConnections layer against a plain residual
x + F(x).

    python benchmarks/bench_mhc.py --device cpu|cuda [--quick] [--out DIR]

Sinkhorn: ours is the fused sinkhorn_ops.mhc_sinkhorn(logits) (20 iterations = 40 steps,
start="col"), or the fused sinkhorn_ops.mhc_v4_sinkhorn(logits) against its PyTorch loop.
forward+backward times H = sinkhorn(L); loss = (H * W).sum(); dL/dL by torch.autograd.grad, for a
fixed random W. Correctness is checked before timing against the reference in float64. On CUDA a
device-to-device copy of the bytes each mode must move is timed in the same run. Writes
<out>/mhc_<device>.csv (one row per measurement) and .md.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import traceback
from typing import Callable

import _bench_util as bu
import bench_forward as bf  # timed(), reason(), max_abs_diff(); puts the checkout on sys.path
import torch
from torch import nn

import sinkhorn_ops
from sinkhorn_ops.nn import ManifoldConstrainedHyperConnections

sys.path.insert(0, str(bu.ROOT / "tests"))  # the literal references live in the test suite
from test_mhc import mhc_reference, sinkhorn_knopp_reference  # noqa: E402

N = 4  # streams: the Sinkhorn problems are N×N
ITERS = 20  # Sinkhorn-Knopp iterations (steps = 40)
MODES = ("forward", "forward+backward")
PROVIDERS = ("ours", "eager", "compile", "liger")
CHECK_TOKENS = 32768  # tokens in the float64 check (problems are independent)
LAYER_TOKENS, LAYER_DIM = 4096, 256
CPU_TARGET = 20.0  # Sinkhorn: ours ≥ 20× eager on CPU
GPU_TARGET, GPU_COPY_SHARE = 20.0, 0.8  # ≥ 20× compile and ≥ 80 % of copy bandwidth at 1M


def token_counts(device: str, quick: bool) -> list[int]:
    return [32768, 262144 if device == "cpu" and quick else 1 << 20]


# ----------------------------------------------------------------------------- Sinkhorn
def reference(logits: torch.Tensor) -> torch.Tensor:
    return sinkhorn_knopp_reference(logits, ITERS)


def ours(logits: torch.Tensor) -> torch.Tensor:
    return sinkhorn_ops.mhc_sinkhorn(logits, ITERS)


def v4_reference(logits: torch.Tensor) -> torch.Tensor:
    return sinkhorn_ops.mhc_v4_sinkhorn_loop(logits, ITERS)


def v4_ours(logits: torch.Tensor) -> torch.Tensor:
    return sinkhorn_ops.mhc_v4_sinkhorn(logits, ITERS)


# variant: (ours, the eager reference that compile also runs, the scale of the N(0, 1) logits).
# paper-wide: logits spanning more than 32, which the fused paper kernel runs in the log domain
# (csrc/mhc_v4_math.h, kLinearSpread): its slowest case, measured at the smaller size only and
# held to no target.
VARIANTS = {"paper": (ours, reference, 1.0), "paper-wide": (ours, reference, 40.0),
            "v4": (v4_ours, v4_reference, 1.0)}
TARGETED = ("paper", "v4")


def liger_sinkhorn() -> tuple[Callable | None, str]:
    """Liger-Kernel's mHC Sinkhorn, or None and why not. Unverified against a live install: it
    takes the first callable named like a Sinkhorn in liger_kernel.ops.mhc."""
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return None, "not installed"
    try:
        import liger_kernel.ops.mhc as mod
    except ImportError as exc:
        return None, f"no liger_kernel.ops.mhc: {bf.reason(exc)}"
    names = [n for n in dir(mod) if "sinkhorn" in n.lower() and callable(getattr(mod, n))]
    if not names:
        return None, "liger_kernel.ops.mhc has no Sinkhorn function"
    fn = getattr(mod, names[0])
    return (lambda logits: fn(logits, ITERS)), f"liger_kernel.ops.mhc.{names[0]}(logits, {ITERS})"


def step(fn: Callable, logits: torch.Tensor, weight: torch.Tensor, mode: str) -> torch.Tensor:
    """H for "forward"; dL/dlogits of L = (H * W).sum() for "forward+backward"."""
    if mode == "forward":
        with torch.no_grad():
            return fn(logits)
    leaf = logits.detach().requires_grad_()
    return torch.autograd.grad((fn(leaf) * weight).sum(), leaf)[0]


def moved_bytes(logits: torch.Tensor, mode: str) -> int:
    """Least traffic: read logits, write H; backward adds read dH, write dlogits."""
    size = logits.numel() * logits.element_size()
    return (2 if mode == "forward" else 4) * size


def check(logits: torch.Tensor, weight: torch.Tensor, mode: str, variant: str) -> dict:
    """Ours on the first CHECK_TOKENS problems against the float64 reference; passes when its
    error is at most twice the fp32 eager reference's, plus 1e-6 of the truth's largest value."""
    mine, reference, _ = VARIANTS[variant]
    cut = logits[:CHECK_TOKENS]
    w = weight[:CHECK_TOKENS]
    truth = step(reference, cut.double(), w.double(), mode)
    got = step(mine, cut, w, mode)
    err = bf.max_abs_diff(got, truth)
    err_eager = bf.max_abs_diff(step(reference, cut, w, mode), truth)
    ok = err <= 2 * err_eager + 1e-6 * truth.abs().max().item()  # False on NaN
    return dict(err=err, err_eager=err_eager, ok=ok)


def srow(variant: str, tokens: int, mode: str, provider: str, **kw) -> dict:
    r = dict(section="sinkhorn", variant=variant, tokens=tokens, problem=f"{tokens}x{N}x{N}", mode=mode,
             provider=provider, iters=ITERS, ms_p20=None, ms_p50=None, ms_p80=None, reps=None,
             speedup=None, **bu.PAIRED_FIELDS, gb_s=None, copy_share=None, peak_mb=None,
             err_fp64=None, err_fp64_eager=None, check=None, compile_s=None, note="")
    r.update(kw)
    return r


def compiled(reference: Callable, mode: str, logits: torch.Tensor,
             weight: torch.Tensor) -> tuple[Callable, float]:
    """torch.compile of the reference; the first call (compilation) is timed separately."""
    return bu.compiled_call(reference, lambda fn: step(fn, logits, weight, mode),
                            logits.device.type)


def run_sinkhorn(variant: str, tokens: int, device: str, policy: dict) -> list[dict]:
    mine, reference, scale = VARIANTS[variant]
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(tokens, N, N, generator=gen) * scale).to(device)
    weight = torch.randn(tokens, N, N, generator=gen).to(device)
    liger, liger_note = liger_sinkhorn()
    if liger is not None and device != "cuda":
        liger, liger_note = None, "n/a: Triton, CUDA only"
    if not variant.startswith("paper"):
        liger, liger_note = None, "n/a: Liger has the paper's variant"
    row = functools.partial(srow, variant)
    rows = []
    for mode in MODES:
        name = f"[sinkhorn {variant} T={tokens} {mode}]"
        nbytes = moved_bytes(logits, mode)
        print(f"{name} check", flush=True)
        o = row(tokens, mode, "ours")
        try:
            c = check(logits, weight, mode, variant)
            o.update(err_fp64=c["err"], err_fp64_eager=c["err_eager"],
                     check="ok" if c["ok"] else "FAIL")
        except Exception as exc:  # noqa: BLE001 - a failed check is a row, not a crash
            traceback.print_exc()
            o.update(check="FAIL", note=f"check failed: {bf.reason(exc)}")
        bu.free_memory(device)
        print(f"{name} ours", flush=True)
        bf.timed(o, functools.partial(step, mine, logits, weight, mode), device, policy)
        if o["ms_p50"]:
            o["gb_s"] = nbytes / (o["ms_p50"] * 1e-3) / 1e9
        e = row(tokens, mode, "eager", err_fp64=o["err_fp64_eager"])
        print(f"{name} eager", flush=True)
        bf.timed(e, functools.partial(step, reference, logits, weight, mode), device, policy)
        comp = row(tokens, mode, "compile")
        print(f"{name} compile", flush=True)
        try:
            fn, comp["compile_s"] = compiled(reference, mode, logits, weight)
            bf.timed(comp, fn, device, policy)
        except Exception as exc:  # noqa: BLE001
            comp["note"] = "OOM" if bu.is_oom(exc) else f"compile failed: {bf.reason(exc)}"
            bu.free_memory(device)
        lg = row(tokens, mode, "liger", note=liger_note)
        if liger is not None:
            print(f"{name} liger", flush=True)
            bf.timed(lg, functools.partial(step, liger, logits, weight, mode), device, policy)
        rows += [o, e, comp, lg]
        if device == "cuda":
            cp = row(tokens, mode, "copy", note=f"copy_ of {nbytes // 2} bytes")
            print(f"{name} copy", flush=True)
            bf.timed(cp, bu.copy_fn(nbytes, device), device, policy)
            if cp["ms_p50"]:
                cp["gb_s"] = nbytes / (cp["ms_p50"] * 1e-3) / 1e9
                if o["gb_s"]:
                    o["copy_share"] = o["gb_s"] / cp["gb_s"]
            rows.append(cp)
            bu.free_memory(device)
        for r in (e, comp, lg):
            if r["ms_p50"] and o["ms_p50"]:
                r["speedup"] = r["ms_p50"] / o["ms_p50"]
        # The target's ratio again, ours and the baseline timed in alternation (paired_ratio):
        # on a shared host the p50s above come from different minutes.
        base, base_fn = (e, functools.partial(step, reference, logits, weight, mode)) \
            if device == "cpu" else (comp, fn if comp["ms_p50"] else None)
        if base["ms_p50"] and o["ms_p50"]:
            print(f"{name} paired", flush=True)
            bu.set_paired(base, functools.partial(step, mine, logits, weight, mode), base_fn,
                          device, o["ms_p50"], policy)
    del logits, weight
    bu.free_memory(device)
    return rows


# ----------------------------------------------------------------------------- the layer
def mlp(dim: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                         nn.Linear(4 * dim, dim))


class PlainResidual(nn.Module):
    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class UnfusedMappings(ManifoldConstrainedHyperConnections):
    """The layer with residual_matrix overridden (identically), which sends its mappings through
    the composite path (about 15 ATen ops forward and 25 backward, around the fused Sinkhorn)
    instead of the fused mhc_coefficients kernels: the same-run baseline of that fusion."""

    def residual_matrix(self, logits: torch.Tensor) -> torch.Tensor:
        return super().residual_matrix(logits)


def layer_step(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor, mode: str) -> object:
    """The output, or the gradients of x and of every parameter for the upstream gradient."""
    if mode == "forward":
        with torch.no_grad():
            return module(x)
    leaf = x.detach().requires_grad_()
    return torch.autograd.grad(module(leaf), [leaf, *module.parameters()], upstream)


def layer_check(layer: nn.Module, x: torch.Tensor, tokens: int = 512) -> dict:
    """The fp32 layer's output on the first tokens against tests/test_mhc.py's mhc_reference of
    a float64 copy; the FlashAttention rule against the reference run in fp32."""
    import copy

    layer64 = copy.deepcopy(layer).double()
    with torch.no_grad():
        truth = mhc_reference(layer64, x[:tokens].double(), layer64.branch,
                              sinkhorn_dtype=torch.float64)
        err = bf.max_abs_diff(layer(x[:tokens]), truth)
        err_ref = bf.max_abs_diff(mhc_reference(layer, x[:tokens], layer.branch,
                                                sinkhorn_dtype=torch.float32), truth)
    return dict(err=err, err_eager=err_ref, ok=err <= 2 * err_ref + 1e-5)


def run_layer(device: str, policy: dict) -> list[dict]:
    torch.manual_seed(0)
    branch = mlp(LAYER_DIM).to(device)
    layer = ManifoldConstrainedHyperConnections(N, LAYER_DIM, branch).to(device)
    with torch.no_grad():  # gates and biases away from their init so every mapping matters
        for name in ("alpha_pre", "alpha_post", "alpha_res"):
            getattr(layer, name).fill_(0.3)
    plain = PlainResidual(branch)
    unfused = UnfusedMappings(N, LAYER_DIM, branch).to(device)
    unfused.load_state_dict(layer.state_dict())
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(LAYER_TOKENS, N, LAYER_DIM, generator=gen).to(device)
    h = torch.randn(LAYER_TOKENS, LAYER_DIM, generator=gen).to(device)
    ups = {"mhc": torch.randn(xs.shape, generator=gen).to(device),
           "residual": torch.randn(h.shape, generator=gen).to(device)}
    c = layer_check(layer, xs)
    rows = []
    for mode in MODES:
        pair = {}
        for provider, module, x in (("mhc", layer, xs), ("unfused", unfused, xs),
                                    ("residual", plain, h)):
            print(f"[layer {mode}] {provider}", flush=True)
            r = dict(section="layer", tokens=LAYER_TOKENS,
                     problem=f"{LAYER_TOKENS}x{1 if provider == 'residual' else N}x{LAYER_DIM}",
                     mode=mode, provider=provider, iters=ITERS, ms_p20=None, ms_p50=None,
                     ms_p80=None, reps=None, overhead=None, peak_mb=None, err_fp64=None,
                     err_fp64_eager=None, check=None, note="", launches=None,
                     **bu.PAIRED_FIELDS)
            if provider == "mhc":
                r.update(err_fp64=c["err"], err_fp64_eager=c["err_eager"],
                         check="ok" if c["ok"] else "FAIL")
            up = ups["residual" if provider == "residual" else "mhc"]
            step_fn = functools.partial(layer_step, module, x, up, mode)
            bf.timed(r, step_fn, device, policy)
            r["launches"] = bu.launches(step_fn, device)
            pair[provider] = r
        if pair["mhc"]["ms_p50"] and pair["residual"]["ms_p50"]:
            pair["mhc"]["overhead"] = pair["mhc"]["ms_p50"] / pair["residual"]["ms_p50"]
        if pair["mhc"]["ms_p50"] and pair["unfused"]["ms_p50"]:
            pair["unfused"]["speedup"] = pair["unfused"]["ms_p50"] / pair["mhc"]["ms_p50"]
            bu.set_paired(pair["unfused"],
                          functools.partial(layer_step, layer, xs, ups["mhc"], mode),
                          functools.partial(layer_step, unfused, xs, ups["mhc"], mode), device,
                          pair["mhc"]["ms_p50"], policy)
        rows += pair.values()
    return rows


MAPPING_TOKENS = (32, LAYER_TOKENS)


def mappings_step(module: nn.Module, x: torch.Tensor, mode: str) -> object:
    """H_pre, H_post, H_res of x, or the gradients of x and of every parameter of their sum."""
    if mode == "forward":
        with torch.no_grad():
            return module.mappings(x)
    leaf = x.detach().requires_grad_()
    m = module.mappings(leaf)
    return torch.autograd.grad(m.pre.sum() + m.post.sum() + m.res.sum(),
                               [leaf, *module.parameters()])


def run_mappings(device: str, policy: dict) -> list[dict]:
    """The layer's mappings alone (RMSNorm(x) φ and the three mappings, no branch), fused
    (mhc_coefficients) against unfused (PyTorch ops around the fused Sinkhorn), timed in
    alternation: at 32 tokens the calls' host and launch costs, at 4096 the work."""
    torch.manual_seed(0)
    fused = ManifoldConstrainedHyperConnections(N, LAYER_DIM).to(device)
    unfused = UnfusedMappings(N, LAYER_DIM).to(device)
    unfused.load_state_dict(fused.state_dict())
    rows = []
    for tokens in MAPPING_TOKENS:
        x = torch.randn(tokens, N, LAYER_DIM, generator=torch.Generator().manual_seed(2))
        x = x.to(device)
        for mode in MODES:
            pair = {}
            for provider, module in (("mhc", fused), ("unfused", unfused)):
                print(f"[mappings T={tokens} {mode}] {provider}", flush=True)
                r = dict(section="mappings", tokens=tokens, mode=mode, provider=provider,
                         ms_p20=None, ms_p50=None, ms_p80=None, reps=None, peak_mb=None,
                         note="", launches=None, **bu.PAIRED_FIELDS)
                step_fn = functools.partial(mappings_step, module, x, mode)
                bf.timed(r, step_fn, device, policy)
                r["launches"] = bu.launches(step_fn, device)
                pair[provider] = r
            if pair["mhc"]["ms_p50"] and pair["unfused"]["ms_p50"]:
                pair["unfused"]["speedup"] = pair["unfused"]["ms_p50"] / pair["mhc"]["ms_p50"]
                bu.set_paired(pair["unfused"], functools.partial(mappings_step, fused, x, mode),
                              functools.partial(mappings_step, unfused, x, mode), device,
                              pair["mhc"]["ms_p50"], policy)
            rows += pair.values()
    return rows


# ----------------------------------------------------------------------------- report
def ms_cell(r: dict, spread: bool = False) -> str:
    if not r or not r.get("ms_p50"):
        return ((r or {}).get("note") or "—").split(":")[0]
    text = bu.fmt(r["ms_p50"])
    return text + (f" ({bu.fmt(r['ms_p20'])}–{bu.fmt(r['ms_p80'])})" if spread else "")


def paired_cell(r: dict) -> str:
    """The paired ratio with its rounds' range, or the p50s' ratio without one."""
    if r.get("paired_speedup"):
        return f"{r['paired_speedup']:.2f} ({r['paired_min']:.2f}–{r['paired_max']:.2f})"
    return bu.fmt(r.get("speedup")) if r.get("speedup") else "—"


LAUNCHES_LEGEND = ("- launches: units of device work in one call (_bench_util.launches): on CUDA "
                   "the kernels, copies and memsets the profiler saw; on the CPU the innermost "
                   "operators that compute or copy. A host-bound call pays about a launch's "
                   "host time for each.")


def markdown(rows: list[dict], device: str, quick: bool) -> list[str]:
    by = {(r["section"], r.get("variant"), r["tokens"], r["mode"], r["provider"]): r
          for r in rows}
    header = ["variant", "T×n×n", "mode", "ours ms p50 (p20–p80)", "GB/s", "eager ms", "×eager",
              "compile ms", "×compile", "Liger ms", "×Liger", "err vs fp64 ours / eager",
              "check", "target"]
    if device == "cuda":
        header[5:5] = ["copy ms", "share of copy GB/s"]
    big = max((r["tokens"] for r in rows if r["section"] == "sinkhorn"), default=0)
    table, notes = [], []
    for variant, tokens, mode in dict.fromkeys((r["variant"], r["tokens"], r["mode"])
                                               for r in rows if r["section"] == "sinkhorn"):
        get = lambda p: by.get(("sinkhorn", variant, tokens, mode, p), {})  # noqa: E731
        o = get("ours")
        base = "eager" if device == "cpu" else "compile"
        need = CPU_TARGET if device == "cpu" else GPU_TARGET
        goal = bu.target_cell(get(base), need, base) if variant in TARGETED else "— (stress case)"
        if device == "cuda" and tokens == big:
            share = o.get("copy_share")
            goal += (f"; ≥{GPU_COPY_SHARE:.0%} of copy: " + ("no data" if share is None else
                     "met" if share >= GPU_COPY_SHARE else "NOT met"))
        cells = [variant, o.get("problem"), mode, ms_cell(o, True), o.get("gb_s"),
                 ms_cell(get("eager")), get("eager").get("speedup"),
                 ms_cell(get("compile")), get("compile").get("speedup"),
                 ms_cell(get("liger")), get("liger").get("speedup"),
                 f"{bu.fmt(o.get('err_fp64'))} / {bu.fmt(o.get('err_fp64_eager'))}",
                 o.get("check"), goal]
        if device == "cuda":
            share = o.get("copy_share")
            cells[5:5] = [ms_cell(get("copy")), "—" if share is None else f"{share:.0%}"]
        table.append(cells)
        for p in (*PROVIDERS, "copy"):
            r = get(p)
            text = [r["note"]] if r.get("note") else []
            if r.get("compile_s"):
                text.append(f"compiled in {r['compile_s']:.1f} s (excluded)")
            if r.get("reps") == 1:
                text.append("one timed call (the warm-up exceeded the policy's slow_s)")
            if text:
                notes.append(f"- {variant} T={tokens} {mode} {p}: " + "; ".join(text))

    lheader = ["tokens", "C", "mode", "mHC ms p50 (p20–p80)", "unfused mappings ms",
               "× unfused (paired, rounds)", "x + F(x) ms", "overhead ×",
               "launches mHC / unfused / x + F(x)", "err vs fp64 mHC / reference", "check"]
    ltable = []
    for mode in MODES:
        m, u, p = (by.get(("layer", None, LAYER_TOKENS, mode, k), {})
                   for k in ("mhc", "unfused", "residual"))
        ltable.append([LAYER_TOKENS, LAYER_DIM, mode, ms_cell(m, True), ms_cell(u),
                       paired_cell(u), ms_cell(p), m.get("overhead"),
                       " / ".join(str(r.get("launches", "—")) for r in (m, u, p)),
                       f"{bu.fmt(m.get('err_fp64'))} / {bu.fmt(m.get('err_fp64_eager'))}",
                       m.get("check")])
        for r in (m, u, p):
            if r.get("note"):
                notes.append(f"- layer {mode} {r['provider']}: {r['note']}")

    mheader = ["tokens", "mode", "fused ms p50 (p20–p80)", "unfused ms",
               "× unfused (paired, rounds)", "launches fused / unfused"]
    mtable = []
    for tokens, mode in dict.fromkeys((r["tokens"], r["mode"]) for r in rows
                                      if r["section"] == "mappings"):
        f, u = (by.get(("mappings", None, tokens, mode, k), {}) for k in ("mhc", "unfused"))
        mtable.append([tokens, mode, ms_cell(f, True), ms_cell(u), paired_cell(u),
                       f"{f.get('launches', '—')} / {u.get('launches', '—')}"])
        for r in (f, u):
            if r.get("note"):
                notes.append(f"- mappings T={tokens} {mode} {r['provider']}: {r['note']}")
    sizes = sorted({r["tokens"] for r in rows if r["section"] == "sinkhorn"})
    legend = [
        f"- Sinkhorn: fp32 logits (T, {N}, {N}) ~ N(0, 1), {ITERS} iterations (40 steps, "
        "start=\"col\"). paper: ours is sinkhorn_ops.mhc_sinkhorn (one fused kernel, unrolled "
        "gradient), eager tests/test_mhc.py sinkhorn_knopp_reference (logsumexp loop). "
        "paper-wide: the same on logits ~ N(0, 40²), whose span over 32 sends every problem "
        "to the kernel's log-domain twin (its slowest case; no target). v4: ours is the fused "
        "sinkhorn_ops.mhc_v4_sinkhorn (eps = 1e-6), eager sinkhorn_ops.mhc_v4_sinkhorn_loop "
        "(the published formula in PyTorch). compile: torch.compile of the eager one, compile "
        "time excluded (notes). Liger: Liger-Kernel's mHC Sinkhorn, CUDA only, when "
        "importable.",
        "- forward runs under no_grad; forward+backward times H = f(L), (H·W).sum(), "
        "torch.autograd.grad w.r.t. L, for a fixed random W.",
        bu.PAIRED_LEGEND,
        "- Times: ms per call, p50. ×X = X ms / ours ms: above 1, ours is faster. GB/s = least "
        "traffic / ours p50: read L + write H (forward); also read dH + write dL (backward)."
        + (" share of copy: ours GB/s over a device-to-device copy_ moving the same bytes, "
           "timed in this run." if device == "cuda" else ""),
        f"- check: ours on the first {CHECK_TOKENS} tokens against the reference in float64 "
        "(H, or dL/dL); passes when ours' max abs error is at most twice the fp32 eager "
        "reference's (+1e-6·max|truth|).",
    ]
    if device == "cpu" and quick and sizes and (1 << 20) not in sizes:
        legend.append(f"- --quick on CPU: the 1M-token case is replaced by T = {sizes[-1]}.")
    llegend = [
        f"- The whole layer: ManifoldConstrainedHyperConnections(n={N}, dim={LAYER_DIM}) "
        "around an MLP F = LayerNorm, Linear(C, 4C), GELU, Linear(4C, C), gates α = 0.3, on "
        f"x of shape ({LAYER_TOKENS}, {N}, {LAYER_DIM}); against x + F(x) with the same F on "
        f"({LAYER_TOKENS}, {LAYER_DIM}). overhead × = mHC ms / plain residual ms (the mHC "
        f"layer also carries {N}× the residual state). forward+backward: the gradients of x "
        "and every parameter for a random upstream gradient. unfused mappings: the same layer "
        "with its mappings in PyTorch ops around the fused Sinkhorn (as before the fused "
        "mhc_coefficients kernels); × unfused: the median over rounds timing the two in "
        "alternation of "
        "unfused / mHC.",
        "- check: the fp32 layer's output on the first 512 tokens against tests/test_mhc.py "
        "mhc_reference of a float64 copy; passes when its error is at most twice that of "
        "mhc_reference run in fp32 (+1e-5).",
        LAUNCHES_LEGEND,
    ]
    mlegend = [
        f"- The mappings alone: layer.mappings(x) for x of shape (T, {N}, {LAYER_DIM}) "
        "(RMSNorm(x) φ, then H_pre, H_post, H_res; forward+backward: the gradients of x and "
        "every parameter of their sum), fused (the mhc_coefficients kernels) against unfused (the "
        "same formulas in PyTorch ops around the fused Sinkhorn), timed in alternation "
        "(paired: median over rounds of unfused / fused).",
        LAUNCHES_LEGEND,
    ]
    out = [*legend, "", bu.markdown_table(header, table), ""] if table else []
    if mtable:
        out += [*mlegend, "", bu.markdown_table(mheader, mtable), ""]
    return [*out, *llegend, "", bu.markdown_table(lheader, ltable), "", "Notes:", "", *notes]


def main() -> int:
    p = bu.bench_parser(__doc__,
                        "fewer repeats (about 1 s of calls each); on CPU 262144 tokens instead "
                        "of 1M")
    p.add_argument("--layer-only", action="store_true",
                   help="only the mappings and whole-layer sections, written to "
                        "mhc_layer_<device>.md/.csv")
    args = bu.parse_bench_args(p)

    env = bu.environment(args.device)
    policy = bu.QUICK if args.quick else bu.FULL
    rows = []

    def write() -> None:  # after every part, so that a run cut short keeps what it measured
        name = f"mhc_layer_{args.device}" if args.layer_only else f"mhc_{args.device}"
        bu.write_results(args.out, name, f"mHC benchmark ({args.device})", rows,
                         dict(env), markdown(rows, args.device, args.quick))

    for variant in () if args.layer_only else VARIANTS:
        for tokens in token_counts(args.device, args.quick)[:1 if variant == "paper-wide" else None]:
            rows += run_sinkhorn(variant, tokens, args.device, policy)
            write()
    rows += run_mappings(args.device, policy)
    write()
    rows += run_layer(args.device, policy)
    write()
    failed = [f"{r['section']} T={r['tokens']} {r['mode']}" for r in rows
              if r.get("check") == "FAIL"]
    if failed:
        print("correctness check FAILED for: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
