"""The raw operator under torch.library.opcheck (schema, fake kernel, autograd registration,
AOT dispatch) and the Python wrapper under torch.compile(fullgraph=True), equal to eager."""

import math

import pytest
import torch
from conftest import assert_result_close, load_ops, random_marginals, random_scores

sinkhorn_ops = load_ops()
RAW = torch.ops.sinkhorn_ops.sinkhorn.default


def raw_args(scores, a=None, b=None, mask=None, steps=5, start="row", tol=0.0):
    """Positional arguments of the forward in the order of the registered schema; arguments
    the schema adds beyond these (backward options) keep their defaults."""
    values = {"scores": scores, "a": a, "b": b, "mask": mask, "steps": steps, "start": start}
    values["tol"] = tol
    args = []
    for arg in RAW._schema.arguments:
        if arg.name in values:
            args.append(values.pop(arg.name))
        else:
            assert arg.has_default_value(), f"schema argument {arg.name} unknown to the test"
    assert mask is None or "mask" not in values, "the schema takes no mask"
    return tuple(args)


def _opcheck_cases(device, dtype):
    S = random_scores((2, 3, 5), seed=0, dtype=dtype, device=device)
    a, b = random_marginals((2,), 3, 5, seed=0, dtype=dtype, device=device)
    mask = (torch.arange(5, device=device) < 4).expand(2, 3, 5).contiguous()
    return {
        "default": raw_args(S),
        "given": raw_args(S, a, b, steps=4, start="col"),
        "tol": raw_args(S, a, b, steps=30, tol=1e-3),
        "single": raw_args(S[0], steps=1),
        "batch4d": raw_args(
            random_scores((2, 2, 4, 4), seed=1, dtype=dtype, device=device), steps=3
        ),
        "empty_batch": raw_args(S[:0]),
        "mask": raw_args(S, mask=mask, steps=6)
        if "mask" in [x.name for x in RAW._schema.arguments]
        else None,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize(
    "case", ["default", "given", "tol", "single", "batch4d", "empty_batch", "mask"]
)
def test_opcheck(device, dtype, case):
    args = _opcheck_cases(device, dtype)[case]
    if args is None:
        pytest.skip("the schema takes no mask")
    torch.library.opcheck(RAW, args)


def _potentials(S, a, b, mask=None):
    return sinkhorn_ops.sinkhorn(
        S, a, b, mask=mask, steps=7, start="col", tol=1e-4, return_potentials=True
    )


def _plan_only(S):
    return sinkhorn_ops.sinkhorn(S, steps=3)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager(device, backend, dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(_potentials, fullgraph=True, backend=backend, dynamic=dynamic)
    for batch, n, m in [(2, 5, 7), (3, 6, 4), (1, 9, 9)]:
        S = random_scores((batch, n, m), seed=n, device=device)
        a, b = random_marginals((batch,), n, m, seed=n, device=device)
        mask = torch.ones(batch, n, m, dtype=torch.bool, device=device)
        mask[0, -1, :] = False
        eager = _potentials(S, None, None, mask)
        out = compiled(S, None, None, mask)
        assert_result_close(out, eager, dtype=torch.float64, name=f"{backend} masked {n}x{m}")
        assert_result_close(
            compiled(S, a, b), _potentials(S, a, b), dtype=torch.float64, name=f"{backend} {n}x{m}"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compile_inductor(device, dtype):
    """One real code-generating backend, with other ops around the custom op."""
    torch._dynamo.reset()

    def attention_like(q, k, v):
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return _plan_only(scores) @ v

    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 8, 16, generator=gen).to(device=device, dtype=dtype) for _ in range(3)
    )
    compiled = torch.compile(attention_like, fullgraph=True, backend="inductor")
    out, eager = compiled(q, k, v), attention_like(q, k, v)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, eager, atol=atol, rtol=atol)


@pytest.mark.parametrize("grad", [False, True])
def test_compile_dynamic_shapes_with_marginals_compile_once(device, grad):
    """dynamic=True with marginals given: three shapes share one graph, differentiated or not
    (the autograd kernel keeps the marginals' sizes symbolic; reading them as integers once
    specialised the graph to each shape)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    fn = torch.compile(lambda S, a, b: sinkhorn_ops.sinkhorn(S, a, b, steps=5), backend=counter,
                       dynamic=True)
    for batch, n, m in [(2, 4, 5), (3, 6, 7), (5, 8, 3)]:
        S = random_scores((batch, n, m), seed=n, device=device)
        a, b = random_marginals((batch,), n, m, seed=n, device=device)
        if grad:
            for x in (S, a, b):
                x.requires_grad_()
            fn(S, a, b).sum().backward()
            assert a.grad is not None and a.grad.shape == a.shape
        else:
            fn(S, a, b)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for three shapes"
