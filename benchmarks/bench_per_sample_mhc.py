"""Per-sample gradients of the mHC layer (torch.func.vmap of torch.func.grad over the samples,
as DP-SGD or influence functions take them): ours against the same layer written in PyTorch ops
(tests/test_mhc.py mhc_reference) under the same transforms, and against a Python loop of
torch.func.grad over the samples, in the same run.

    python benchmarks/bench_per_sample_mhc.py [--device cpu|cuda] [--quick] [--out DIR]

Ours runs each mHC operator once for all samples: its weight gradients' batching rules
(sinkhorn_ops/_vmap_mhc_weights.py) sum the fused backward's per-token gradients per sample.
Writes <out>/per_sample_mhc_<device>.csv and .md.
"""
from __future__ import annotations

import sys
import warnings

import _bench_util as bu
import torch
from torch import func

sys.path.append(str(bu.ROOT))  # run from a checkout without installing; an install wins
from sinkhorn_ops.nn import ManifoldConstrainedHyperConnections  # noqa: E402

sys.path.insert(0, str(bu.ROOT / "tests"))  # the literal layer reference lives in the test suite
from test_mhc import mhc_reference  # noqa: E402

# (samples, tokens per sample, n, C)
CASES = [(32, 16, 4, 64), (256, 4, 4, 64)]
POLICY = {"slow_s": 2.0, "budget_s": 1.0, "min_reps": 3, "max_reps": 30, "paired_rounds": 5}


class Reference(torch.nn.Module):
    """The layer's parameters, run by the reference in PyTorch ops."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mhc_reference(self.layer, x, self.layer.branch, sinkhorn_dtype=torch.float32)


def main() -> None:
    p = bu.bench_parser(__doc__, quick_help="the first case only")
    args = bu.parse_bench_args(p)
    dev = args.device
    env = bu.environment(dev)
    rows, table = [], []
    warnings.filterwarnings("ignore", message=".*batching rule.*")  # the reference's fallbacks
    for V, T, n, C in CASES[:1] if args.quick else CASES:
        torch.manual_seed(0)
        layer = ManifoldConstrainedHyperConnections(n, C, torch.nn.Linear(C, C)).to(dev)
        params = {k: v.detach() for k, v in layer.named_parameters()}
        x = torch.randn(V, T, n, C, device=dev)

        ref_layer = Reference(layer)

        def ours_loss(p, x):
            return func.functional_call(layer, p, (x,)).sin().sum()

        def ref_loss(p, x):
            return func.functional_call(ref_layer, {f"layer.{k}": v for k, v in p.items()},
                                        (x,)).sin().sum()

        ours = lambda: func.vmap(func.grad(ours_loss), in_dims=(None, 0))(params, x)  # noqa: E731
        ref = lambda: func.vmap(func.grad(ref_loss), in_dims=(None, 0))(params, x)  # noqa: E731
        loop = lambda: [func.grad(ours_loss)(params, x[i]) for i in range(V)]  # noqa: E731
        got, want = ours(), ref()
        err = max((got[k] - want[k]).abs().max().item() / max(want[k].abs().max().item(), 1e-30)
                  for k in params)
        t = {name: bu.quantiles(bu.time_ms(fn, dev, POLICY))[1]
             for name, fn in (("ours", ours), ("ref", ref), ("loop", loop))}
        paired_ref = bu.paired_ratio(ours, ref, dev, (t["ours"], t["ref"]),
                                     POLICY["paired_rounds"])
        paired_loop = bu.paired_ratio(ours, loop, dev, (t["ours"], t["loop"]),
                                      POLICY["paired_rounds"])
        rows.append({"samples": V, "tokens": T, "n": n, "C": C, "ms_p50": t["ours"],
                     "ref_ms_p50": t["ref"], "loop_ms_p50": t["loop"],
                     "paired_ref": paired_ref[0], "paired_ref_min": paired_ref[1],
                     "paired_ref_max": paired_ref[2], "paired_loop": paired_loop[0],
                     "paired_loop_min": paired_loop[1], "paired_loop_max": paired_loop[2],
                     "max_rel_err_vs_ref": err})
        table.append([V, T, f"{n}×{C}", bu.fmt(t["ours"]), bu.fmt(t["ref"]), bu.fmt(t["loop"]),
                      f"{paired_ref[0]:.2f} ({paired_ref[1]:.2f}–{paired_ref[2]:.2f})",
                      f"{paired_loop[0]:.2f} ({paired_loop[1]:.2f}–{paired_loop[2]:.2f})",
                      f"{err:.1e}"])
    body = [
        "- per-sample gradients of every parameter of the layer (a Linear branch, 20 iterations, "
        "fp32), loss = sum(sin(layer(x))) per sample: vmap(grad) over the samples.",
        "- ref: the same layer in PyTorch ops (tests/test_mhc.py mhc_reference) under "
        "vmap(grad); loop: a Python loop of grad over the samples, through our layer.",
        "- × ref, × loop: paired ratios (baseline / ours, timed in alternation; median, rounds' "
        "range). err: max relative difference of ours against ref over the parameters.",
        "",
        bu.markdown_table(["samples", "tokens", "n×C", "ours ms", "ref ms", "loop ms",
                           "× ref (paired)", "× loop (paired)", "err"], table),
    ]
    bu.write_results(args.out, f"per_sample_mhc_{dev}", f"Per-sample gradients of mHC ({dev})",
                     rows, env, body)


if __name__ == "__main__":
    main()
