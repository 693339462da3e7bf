"""A tol run's `steps` is a cap: the unrolled backward's work follows the steps each problem
ran, not the cap (MATH.md section 2.1: O(K(n + m)) memory, K the steps run), where they can be
read without a host synchronisation (a CPU tensor). On CUDA the cap sizes the backward's LSE
records, and a cap whose records would overflow a byte count is a clear error."""
import pytest
import torch
from conftest import load_ops, run_python

load_ops()  # registers torch.ops.sinkhorn_ops

HUGE = 1 << 62

# Each check compares a huge cap with a cap of exactly the steps run, bit for bit. Before:
# - first order, tiny problems (sides <= 16): history reserved for the cap, 1 KB a step of it a
#   thread ("out of memory for 102400000000 bytes" at cap 1e8); at 2^62 the size wrapped around
#   and the backward overran it (segmentation fault, "double free or corruption");
# - second order: the replay built and kept n x m tensors for every step of the cap (100 x 100
#   at cap 4000: 3.9 s and 2.7 GB for 4 steps run), at 2^62 a hang;
# - forward mode (torch.autograd.forward_ad): the same replay.
# In a subprocess with a timeout, since the failures were crashes and hangs.
SCRIPT = f"""
import torch, sinkhorn_ops
import torch.autograd.forward_ad as fwAD
torch.manual_seed(0)

def run(S, steps, order):
    S = S.detach().requires_grad_()
    r = sinkhorn_ops.sinkhorn(S, steps=steps, tol=1e-6, return_potentials=True)
    loss = (r.plan.square() * torch.arange(S.shape[-1], dtype=S.dtype)).sum() + r.f.sum()
    (g,) = torch.autograd.grad(loss, S, create_graph=order == 2)
    if order == 2:
        (g,) = torch.autograd.grad((g * torch.cos(S)).sum(), S)
    return int(r.steps.max()), g

for shape, order in [((3, 4, 4), 1), ((2, 5, 7), 1), ((2, 20, 20), 1), ((1, 60, 60), 2),
                     ((2, 4, 4), 2)]:
    S = torch.randn(shape, dtype=torch.float64)
    used, g = run(S, {HUGE}, order)
    assert used < 1000, used
    assert torch.equal(g, run(S, used, order)[1]), (shape, order)

S, V = torch.randn(2, 8, 8, dtype=torch.float64), torch.randn(2, 8, 8, dtype=torch.float64)
tangents, used = [], None
for cap in ({HUGE}, None):
    with fwAD.dual_level():
        r = sinkhorn_ops.sinkhorn(fwAD.make_dual(S, V), steps=cap or used, tol=1e-6,
                                  return_potentials=True)
        tangents.append(fwAD.unpack_dual(r.plan).tangent)
        used = int(fwAD.unpack_dual(r.steps).primal.max())
assert torch.equal(*tangents)

# Where the steps run cannot be read (steps_used given to the public backward operator), a
# history whose byte count overflows is a clear error: the tiny backward's at 2^56 passed the
# front door's count and overran its buffer.
op = torch.ops.sinkhorn_ops.sinkhorn_backward_unrolled
S = torch.randn(1, 4, 4)
try:
    op(torch.ones_like(S), None, None, S, None, None, None, torch.full((1,), 2**56), 2**56, "row")
    raise AssertionError("no error")
except ValueError as e:
    assert "sinkhorn_backward: the history of 72057594037927936 steps overflows" in str(e), e
print("ok")
"""


def test_huge_caps_cost_the_steps_run():
    out = run_python(SCRIPT, timeout=300)
    assert out is not None, "a backward at a cap of 2^62 hung"
    assert out.returncode == 0 and "ok" in out.stdout, (out.returncode, out.stderr[-3000:])


def test_a_cap_whose_records_overflow_is_a_clear_error():
    """Where the steps run cannot be read (here: steps_used itself at 2^62, as the public
    backward operator may be given), B x steps x max(n, m) LSE records that overflow a 64-bit
    byte count raise instead of wrapping around to a small buffer (the CUDA block backward)."""
    S = torch.randn(2, 4, 4)
    op = torch.ops.sinkhorn_ops.sinkhorn_backward_unrolled
    used = torch.full((2,), HUGE, dtype=torch.long)
    with pytest.raises(ValueError, match=r"sinkhorn_backward: the unrolled backward keeps every "
                                         r"step's LSEs, batch 2 x steps 4611686018427387904"):
        op(torch.ones_like(S), None, None, S, None, None, None, used, HUGE, "row")


def test_a_replay_of_a_cap_that_cannot_fit_is_a_clear_error():
    """torch.func's transforms wrap steps_used, so the forward-mode replay runs to the cap: at
    2^62 it failed with a bare "vector::_M_default_append"."""
    S = torch.randn(2, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sinkhorn: the differentiable replay \(second order, "
                                         r"forward mode\) keeps every step of steps = "
                                         r"4611686018427387904"):
        torch.func.jvp(lambda s: torch.ops.sinkhorn_ops.sinkhorn.default(
            s, None, None, None, HUGE, "row", 1e-6, "unrolled", 1e-6, 100)[0], (S,), (S,))
