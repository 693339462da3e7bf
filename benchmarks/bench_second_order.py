"""Second order of the Sinkhorn operator: a Hessian-vector product (double backward through
create_graph) of a loss of the plan, ours against autograd through the eager reference loop, the
first-order forward + backward of ours for scale, in the same run.

    python benchmarks/bench_second_order.py [--device cpu|cuda] [--quick] [--out DIR]

hvp(S, V) = d/dS <d loss / dS, V> with loss = sum(sin(P W)), P = sinkhorn(S, steps): ours runs the
fused forward and backward, then differentiates the backward's ATen form (csrc/ops/
sinkhorn_autograd.cpp); the baseline is sinkhorn_ops.reference.sinkhorn_reference in the same
dtype, differentiated twice by autograd. torch.compile is not a baseline: it does not support
double backward. The last case is the whole mHC layer against the same layer in PyTorch ops.
Writes <out>/second_order_<device>.csv and .md.
"""
from __future__ import annotations

import copy
import sys

import _bench_util as bu
import torch

sys.path.append(str(bu.ROOT))  # run from a checkout without installing; an install wins
import sinkhorn_ops
from sinkhorn_ops.nn import ManifoldConstrainedHyperConnections
from sinkhorn_ops.reference import sinkhorn_reference

sys.path.insert(0, str(bu.ROOT / "tests"))  # the literal layer reference lives in the test suite
from test_mhc import mhc_reference  # noqa: E402

# (case, batch, n, m, steps)
CASES = [
    ("attention", 16, 64, 64, 3),
    ("ot", 4, 256, 256, 20),
    ("mhc", 4096, 4, 4, 40),
]
POLICY = {"slow_s": 2.0, "budget_s": 1.0, "min_reps": 3, "max_reps": 50, "paired_rounds": 5}


def hvp_fn(run, S, W, V):
    def call():
        s = S.detach().requires_grad_()
        (g,) = torch.autograd.grad((run(s) * W).sin().sum(), s, create_graph=True)
        (h,) = torch.autograd.grad((g * V).sum(), s)
        return h
    return call


def layer_case(dev: str, quick: bool, rows: list, table: list):
    """The mHC layer (n = 4, C = 64, 256 tokens, a tanh(Linear) branch, 20 iterations): the hvp
    of a loss of its output in the streams x, against the same layer written in PyTorch ops
    (tests/test_mhc.py mhc_reference), both fp32."""
    if quick:
        return rows, table
    torch.manual_seed(0)
    branch = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh())
    layer = ManifoldConstrainedHyperConnections(4, 64, branch).to(dev)
    with torch.no_grad():
        for name in ("alpha_pre", "alpha_post", "alpha_res"):
            getattr(layer, name).fill_(0.3)
    gen = torch.Generator().manual_seed(1)
    x64, W64, V64 = (torch.randn(256, 4, 64, generator=gen, dtype=torch.float64).to(dev)
                     for _ in range(3))
    x, W, V = (t.float() for t in (x64, W64, V64))
    ref = lambda s: mhc_reference(layer, s, layer.branch, sinkhorn_dtype=torch.float32)  # noqa: E731
    ours, eager = hvp_fn(layer, x, W, V), hvp_fn(ref, x, W, V)
    layer64 = copy.deepcopy(layer).double()
    truth = hvp_fn(lambda s: mhc_reference(layer64, s, layer64.branch,
                                           sinkhorn_dtype=torch.float64), x64, W64, V64)()
    err = (ours().double() - truth).abs().max().item()
    err_eager = (eager().double() - truth).abs().max().item()
    ok = err <= 2 * err_eager + 1e-5 * truth.abs().max().item()

    def first_order():
        s = x.detach().requires_grad_()
        (layer(s) * W).sin().sum().backward()

    t_ours = bu.quantiles(bu.time_ms(ours, dev, POLICY))[1]
    t_eager = bu.quantiles(bu.time_ms(eager, dev, POLICY))[1]
    t_first = bu.quantiles(bu.time_ms(first_order, dev, POLICY))[1]
    paired = bu.paired_ratio(ours, eager, dev, (t_ours, t_eager), POLICY["paired_rounds"])
    rows.append({"case": "mhc layer", "shape": "256x4x64", "steps": 40, "dtype": "fp32",
                 "ms_p50": t_ours, "eager_ms_p50": t_eager, "first_order_ms_p50": t_first,
                 "x_eager": t_eager / t_ours, "err": err, "err_eager": err_eager,
                 "check": "ok" if ok else "FAIL", "paired": paired[0], "paired_min": paired[1],
                 "paired_max": paired[2]})
    table.append(["mhc layer (x)", "256x4x64", 40, bu.fmt(t_ours), bu.fmt(t_first),
                  bu.fmt(t_eager), f"{paired[0]:.2f} ({paired[1]:.2f}–{paired[2]:.2f})",
                  f"{err:.2e} / {err_eager:.2e}", "ok" if ok else "FAIL"])
    return rows, table


def main() -> None:
    p = bu.bench_parser(__doc__, quick_help="the first case only")
    args = bu.parse_bench_args(p)
    dev = args.device
    env = bu.environment(dev)
    rows, table = [], []
    for case, B, n, m, steps in CASES[:1] if args.quick else CASES:
        gen = torch.Generator().manual_seed(0)
        S64, W64, V64 = (torch.randn(B, n, m, generator=gen, dtype=torch.float64).to(dev)
                         for _ in range(3))
        S, W, V = (t.float() for t in (S64, W64, V64))
        ours = hvp_fn(lambda s: sinkhorn_ops.sinkhorn(s, steps=steps), S, W, V)
        eager = hvp_fn(lambda s: sinkhorn_reference(s, steps=steps).plan, S, W, V)
        truth = hvp_fn(lambda s: sinkhorn_reference(s, steps=steps).plan, S64, W64, V64)()
        err = (ours().double() - truth).abs().max().item()
        err_eager = (eager().double() - truth).abs().max().item()
        ok = err <= 2 * err_eager + 1e-5 * truth.abs().max().item()

        def first_order():
            s = S.detach().requires_grad_()
            (sinkhorn_ops.sinkhorn(s, steps=steps) * W).sin().sum().backward()

        t_ours = bu.quantiles(bu.time_ms(ours, dev, POLICY))
        t_eager = bu.quantiles(bu.time_ms(eager, dev, POLICY))
        t_first = bu.quantiles(bu.time_ms(first_order, dev, POLICY))
        row = {"case": case, "shape": f"{B}x{n}x{m}", "steps": steps, "dtype": "fp32",
               "ms_p50": t_ours[1], "eager_ms_p50": t_eager[1], "first_order_ms_p50": t_first[1],
               "x_eager": t_eager[1] / t_ours[1], "err": err, "err_eager": err_eager,
               "check": "ok" if ok else "FAIL"}
        base_row = {"ms_p50": t_eager[1]}
        bu.set_paired(base_row, ours, eager, dev, t_ours[1], POLICY)
        row.update(paired=base_row["paired_speedup"], paired_min=base_row["paired_min"],
                   paired_max=base_row["paired_max"])
        rows.append(row)
        table.append([case, row["shape"], steps, bu.fmt(t_ours[1]), bu.fmt(t_first[1]),
                      bu.fmt(t_eager[1]),
                      f"{row['paired']:.2f} ({row['paired_min']:.2f}–{row['paired_max']:.2f})",
                      f"{err:.2e} / {err_eager:.2e}", row["check"]])
    rows, table = layer_case(dev, args.quick, rows, table)
    body = [
        "- hvp = d/dS <d loss/dS, V>, loss = sum(sin(P W)), fp32; ours: the fused forward and "
        "backward, then the backward's ATen form differentiated; eager: autograd twice through "
        "sinkhorn_ops.reference.sinkhorn_reference in fp32. first order: ours' forward + "
        "backward of the same loss, for scale.",
        "- × eager: paired ratio (eager / ours, timed in alternation; median, rounds' range).",
        "- check: ours' max abs error against the float64 reference's hvp is at most twice the "
        "fp32 eager one's (+1e-5 · max|truth|).",
        "",
        bu.markdown_table(["case", "B×n×m", "steps", "ours hvp ms p50", "ours first order ms",
                           "eager hvp ms", "× eager (paired)", "err ours / eager", "check"],
                          table),
    ]
    bu.write_results(args.out, f"second_order_{dev}", f"Second order ({dev})", rows, env, body)


if __name__ == "__main__":
    main()
