"""Host cost of one differentiated call: each operator's forward + backward on a tiny input, where
the kernels take microseconds and the host (Python wrapper, dispatcher, autograd) decides.

Per operator, three timings of the same input in one run:
- "autograd": out = op(x); torch.autograd.grad((out * W).sum(), x), the way a model calls it;
- "direct": the forward op without grad, then its backward op called directly (no mul/sum; the
  calls still pass the operators' C++ Autograd kernels, which record no node when nothing
  requires grad), i.e. the kernels plus the dispatcher;
- "softmax": torch.softmax over the last dimension of the same input, differentiated the same
  way: what PyTorch's own cheapest autograd call costs on this host.
"autograd - direct" is what the autograd layer (the node, saved tensors, the engine, the mul and
sum of the loss) adds. On CUDA every call is asynchronous and the loop is timed with one
synchronisation at the end, so the numbers are host time per call as long as the kernels are
shorter than it.

    python benchmarks/bench_host_overhead.py --device cpu|cuda [--out DIR] [--stem NAME] [--threads N]

Writes <out>/<stem>.csv and .md (stem default host_overhead_<device>).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import _bench_util as bu
import torch

import sinkhorn_ops

ROUNDS, CALLS, WARMUP = 9, 200, 50
OPS = torch.ops.sinkhorn_ops


def per_call_us(fns: list[Callable[[], object]], device: str) -> list[float]:
    """Per function, the median over ROUNDS of (CALLS calls, synchronised once) / CALLS, in
    microseconds; the functions take turns within each round, so that a noisy minute of a shared
    host slows all of them, not one."""
    for fn in fns:
        for _ in range(WARMUP):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(ROUNDS):
        for fn, t in zip(fns, times):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(CALLS):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            t.append((time.perf_counter() - t0) / CALLS * 1e6)
    return [statistics.median(t) for t in times]


def differentiated(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
                   weight: torch.Tensor) -> Callable[[], object]:
    leaves = [x.detach().requires_grad_() for x in inputs]
    return lambda: torch.autograd.grad((fn(*leaves) * weight).sum(), leaves)


def cases(device: str) -> dict[str, tuple]:
    """name -> (differentiated call, direct call, the input whose softmax is the yardstick)."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    logits, w44 = rand(8, 4, 4), rand(8, 4, 4)
    x, y, w_pre, w_post = rand(8, 4, 64), rand(8, 64), rand(8, 64), rand(8, 4, 64)
    h_pre, h_post = torch.rand(8, 4, generator=g).to(device), torch.rand(8, 4, generator=g).to(device)
    h_res = sinkhorn_ops.mhc_sinkhorn(rand(8, 4, 4))
    scores, w16 = rand(8, 16, 16), rand(8, 16, 16)

    def sinkhorn_direct(grad: str) -> Callable[[], object]:
        def run():
            plan, f, gg, used, err = OPS.sinkhorn.default(scores, None, None, None, 5, "row", 0.0,
                                                          grad, 1e-6, 100)
            if grad == "unrolled":
                return OPS.sinkhorn_backward_unrolled.default(w16, None, None, scores, None, None,
                                                              None, used, 5, "row")
            return OPS.sinkhorn_backward_implicit.default(w16, None, None, plan, grad, 1e-6, 100)
        return run

    return {
        "mhc_sinkhorn 8x4x4, 20 iters": (
            differentiated(sinkhorn_ops.mhc_sinkhorn, [logits], w44),
            lambda: (OPS.mhc_sinkhorn.default(logits, 20),
                     OPS.mhc_sinkhorn_backward.default(w44, logits, 20)), logits),
        "mhc_v4_sinkhorn 8x4x4, 20 iters": (
            differentiated(sinkhorn_ops.mhc_v4_sinkhorn, [logits], w44),
            lambda: (OPS.mhc_v4_sinkhorn.default(logits, 20, 1e-6),
                     OPS.mhc_v4_sinkhorn_backward.default(w44, logits, 20, 1e-6)), logits),
        "mhc_branch_input 8x4x64": (
            differentiated(sinkhorn_ops.mhc_branch_input, [x, h_pre], w_pre),
            lambda: (OPS.mhc_pre_mix.default(x, h_pre),
                     OPS.mhc_pre_mix_backward.default(w_pre, x, h_pre)), x),
        "mhc_combine 8x4x64": (
            differentiated(sinkhorn_ops.mhc_combine, [x, y, h_post, h_res], w_post),
            lambda: (OPS.mhc_post_mix.default(x, y, h_post, h_res),
                     OPS.mhc_post_mix_backward.default(w_post, x, y, h_post, h_res)), x),
        "sinkhorn 8x16x16, 5 steps, unrolled": (
            differentiated(lambda s: sinkhorn_ops.sinkhorn(s, steps=5), [scores], w16),
            sinkhorn_direct("unrolled"), scores),
        "sinkhorn 8x16x16, 5 steps, implicit": (
            differentiated(lambda s: sinkhorn_ops.sinkhorn(s, steps=5, grad="implicit"),
                           [scores], w16),
            sinkhorn_direct("implicit"), scores),
    }


def main() -> int:
    p = bu.bench_parser(__doc__)
    p.add_argument("--stem", default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: on tiny inputs, waking a thread pool "
                        "costs more than the work and is not the host cost measured here)")
    args = bu.parse_bench_args(p)
    torch.set_num_threads(args.threads)
    env = bu.environment(args.device)
    rows, table = [], []
    for name, (ours, direct, x) in cases(args.device).items():
        soft_w = torch.randn_like(x)
        soft = differentiated(lambda t: torch.softmax(t, -1), [x], soft_w)
        t_ours, t_direct, t_soft = per_call_us([ours, direct, soft], args.device)
        rows.append(dict(case=name, autograd_us=t_ours, direct_us=t_direct, softmax_us=t_soft,
                         autograd_minus_direct_us=t_ours - t_direct, vs_softmax=t_ours / t_soft))
        table.append([name, t_ours, t_direct, t_ours - t_direct, t_soft, t_ours / t_soft])
        print(f"{name}: autograd {t_ours:.1f} us, direct {t_direct:.1f} us, softmax {t_soft:.1f} us",
              flush=True)
    body = [
        "Microseconds per call (median of 9 rounds of 200 calls, the three timings of a row taking turns within each round). autograd: forward + "
        "torch.autograd.grad of (out * W).sum(); direct: the forward op and the backward op "
        "called directly; softmax: torch.softmax of the same input differentiated the same way.",
        "",
        bu.markdown_table(["case", "autograd µs", "direct µs", "autograd − direct µs",
                           "softmax µs", "autograd / softmax"], table),
    ]
    bu.write_results(args.out, args.stem or f"host_overhead_{args.device}",
                     "Host cost of a differentiated call", rows, env, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
