"""CUDA graphs: every CUDA path of the forward, of both backwards, the mHC Sinkhorn and layer,
captured by torch.cuda.graph and replayed on new inputs, equals the eager call on those inputs.
A capture fails if an operator synchronises with the host or launches what a graph cannot hold;
a replay that differs from eager would mean a launch parameter read on the host at capture time
(a count of steps, a stopping decision). CUDA only."""

import pytest
import torch
from conftest import TOLERANCES, assert_close, load_ops

sinkhorn_ops = load_ops()

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (batch, n, m, steps, tol): the tiny path, the block path, the large path's host loop (no tol)
# and its device loop (tol: one cooperative kernel that ends on the device), and few problems too
# large for shared memory (the large path's host loop at 8 x 512 x 512).
FORWARD_CASES = {
    "tiny": (64, 4, 4, 20, 0.0),
    "block": (6, 100, 70, 9, 0.0),
    "block-tol": (6, 100, 70, 300, 1e-5),
    "large": (1, 1024, 1100, 7, 0.0),
    "large-tol": (2, 1024, 1030, 400, 1e-4),
    "few-off-chip": (8, 512, 512, 5, 0.0),
}


def _capture(fn, *static_inputs):
    """Warms fn up on a side stream (as torch.cuda.graph asks), captures it, returns the graph
    and its static outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*static_inputs)
    return graph, outputs


def _replays_like_eager(fn, static, fresh, names, label):
    """Captures fn(static), replays it on fresh's values and compares each output named in names
    with the eager fn(fresh); returns both output tuples."""
    graph, outputs = _capture(fn, static)
    with torch.no_grad():
        static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    want = fn(fresh.requires_grad_(static.requires_grad))
    atol, rtol = TOLERANCES[torch.float32]
    for name, got, expected in zip(names, outputs, want):
        assert_close(got, expected, atol=atol, rtol=rtol, name=f"{label}: {name}")
    return outputs, want


def _scores(B, n, m, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, n, m, generator=g, dtype=torch.float64) * 2).to("cuda", dtype)


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_replays_like_eager(case):
    B, n, m, steps, tol = FORWARD_CASES[case]

    def fn(S):
        return tuple(sinkhorn_ops.sinkhorn(S, steps=steps, tol=tol, return_potentials=True))

    outputs, want = _replays_like_eager(fn, _scores(B, n, m, 0), _scores(B, n, m, 1),
                                        ("plan", "f", "g"), case)
    assert torch.equal(outputs[3], want[3]), (case, outputs[3], want[3])  # steps used
    if tol > 0:
        assert (want[3] < steps).all(), "the case should stop before its cap"


@pytest.mark.parametrize("grad", ["unrolled", "implicit"])
@pytest.mark.parametrize("case", ["block", "large"])
def test_forward_and_backward_replay_like_eager(case, grad):
    B, n, m, steps, _ = FORWARD_CASES[case]
    W = _scores(B, n, m, 2)

    def fn(S):
        plan = sinkhorn_ops.sinkhorn(S, steps=steps, grad=grad)
        (gS,) = torch.autograd.grad((plan * W).sum(), S)
        return plan, gS

    _replays_like_eager(fn, _scores(B, n, m, 0).requires_grad_(), _scores(B, n, m, 1),
                        ("plan", "grad_scores"), f"{case}, {grad}")


def test_mhc_sinkhorn_replays_like_eager():
    def fn(logits):
        h = sinkhorn_ops.mhc_sinkhorn(logits)
        (g,) = torch.autograd.grad(h.square().sum(), logits)
        return h, g

    def logits(seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(4096, 4, 4, generator=gen).to("cuda")

    _replays_like_eager(fn, logits(0).requires_grad_(), logits(1), ("H", "grad"), "mhc")


def test_mhc_layer_replays_like_eager():
    """The whole mHC layer (the fused coefficients, both stream mixings, an MLP
    branch), forward and the gradient of x, in one graph: the way to take its many small
    launches off the host (torch.compile(mode="reduce-overhead") does the same)."""
    from sinkhorn_ops.nn import ManifoldConstrainedHyperConnections

    torch.manual_seed(0)
    branch = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh())
    layer = ManifoldConstrainedHyperConnections(4, 64, branch).cuda()

    def fn(x):
        out = layer(x)
        (g,) = torch.autograd.grad(out.square().sum(), x)
        return out, g

    def streams(seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(256, 4, 64, generator=gen).to("cuda")

    _replays_like_eager(fn, streams(0).requires_grad_(), streams(1), ("out", "grad_x"), "layer")
