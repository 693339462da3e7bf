"""mHC (MATH.md section 4): the module and its Sinkhorns against a literal pure-PyTorch reference
written here: forward and the gradient of every parameter in float64, fp32 and bf16, the
doubly-stochastic property, n in {2, 4, 8}, the DeepSeek-V4 variant, torch.compile."""
import doctest

import pytest
import torch
from conftest import DEVICES, assert_close, assert_flash_rule, load_ops

ops = load_ops()
from sinkhorn_ops.nn import (
    ManifoldConstrainedHyperConnections,
    expand_streams,
    reduce_streams,
)

C = 8  # stream width of the small test problems


# ----------------------------------------------------------------------------- reference
def sinkhorn_knopp_reference(logits, iters=20):
    """mHC paper eq. 9 literally, in the log domain: M⁰ = exp(H̃), then `iters` times a column
    normalisation followed by a row normalisation."""
    log_m = logits
    for _ in range(iters):
        log_m = log_m - torch.logsumexp(log_m, dim=-2, keepdim=True)  # T_c: columns sum to 1
        log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)  # T_r: rows sum to 1
    return log_m.exp()


def v4_sinkhorn_reference(x, iters=20, eps=1e-6):
    """DeepSeek-V4's production formula, as in the MATH.md section 1 table."""
    comb = torch.softmax(x, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def mhc_reference(layer, x, branch, *, sinkhorn_dtype):
    """x_{l+1} = H_res x + H_postᵀ F(H_pre x) from the layer's parameters, token by token
    formulas of MATH.md section 4 (batched over leading dims); mappings in `sinkhorn_dtype`,
    mixing in x's dtype."""
    n, dim = layer.num_streams, layer.dim
    p = {k: v.to(sinkhorn_dtype) for k, v in layer.named_parameters() if "." not in k}
    vec = x.reshape(*x.shape[:-2], n * dim).to(sinkhorn_dtype)
    x_norm = vec / torch.sqrt((vec * vec).mean(-1, keepdim=True) + layer.norm_eps)
    h_pre = torch.sigmoid(p["alpha_pre"] * (x_norm @ p["phi_pre"]) + p["b_pre"])
    h_post = 2 * torch.sigmoid(p["alpha_post"] * (x_norm @ p["phi_post"]) + p["b_post"])
    res = p["alpha_res"] * (x_norm @ p["phi_res"]).reshape(*x.shape[:-2], n, n) + p["b_res"]
    if layer.variant == "v4":
        h_pre = h_pre + layer.eps
        h_res = v4_sinkhorn_reference(res, layer.iters, layer.eps).transpose(-1, -2)
    else:
        h_res = sinkhorn_knopp_reference(res, layer.iters)
    h_pre, h_post, h_res = (t.to(x.dtype) for t in (h_pre, h_post, h_res))
    out = branch((h_pre.unsqueeze(-2) @ x).squeeze(-2))
    return h_res @ x + h_post.unsqueeze(-1) * out.unsqueeze(-2)


# ----------------------------------------------------------------------------- helpers
def make_layer(n, *, dtype=torch.float64, device="cpu", seed=0, **kwargs):
    """A layer with a tanh(Linear) branch and parameters moved away from their init (gates 0.3,
    random biases) so that the dynamic part of every mapping matters."""
    torch.manual_seed(seed)
    branch = torch.nn.Sequential(torch.nn.Linear(C, C), torch.nn.Tanh())
    layer = ManifoldConstrainedHyperConnections(n, C, branch, **kwargs)
    with torch.no_grad():
        for name in ("alpha_pre", "alpha_post", "alpha_res"):
            getattr(layer, name).fill_(0.3)
        for name in ("b_pre", "b_post", "b_res"):
            getattr(layer, name).add_(torch.randn_like(getattr(layer, name)))
    return layer.to(device=device, dtype=dtype)


def make_streams(n, *, dtype=torch.float64, device="cpu", seed=1, shape=(3, 5)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, n, C, generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=dtype).requires_grad_(True)


def run(layer, x, fn):
    """Output and the gradients of x and of every parameter of a fixed random loss."""
    out = fn(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7),
                         dtype=torch.float64).to(out.device, out.dtype)
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad((out * weight).sum(), [x, *params.values()])
    return out, dict(zip(["x", *params], grads))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("variant", ["paper", "v4"])
@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_every_gradient_float64(n, variant, device):
    layer = make_layer(n, device=device, variant=variant)
    x = make_streams(n, device=device)
    out, grads = run(layer, x, layer)
    ref, ref_grads = run(layer, x, lambda t: mhc_reference(layer, t, layer.branch,
                                                           sinkhorn_dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert_close(out, ref, atol=1e-12, rtol=1e-10, name="output")
    assert len(grads) == 1 + 9 + 2  # x, the nine mHC parameters, the branch's weight and bias
    for name, g in grads.items():
        assert_close(g, ref_grads[name], atol=1e-11, rtol=1e-9, name=f"grad {name}")


# Floors of FlashAttention's rule (error <= 2 x the same-dtype reference's error + floor): absolute
# for the output, relative to max |gradient| for the gradients, which sum over every token and
# are accumulated in another order by the operator's fused backward than by autograd.
FLOORS = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_against_float64(dtype, device):
    n = 4
    layer64 = make_layer(n, device=device)
    x64 = make_streams(n, device=device)
    truth, truth_grads = run(layer64, x64, lambda t: mhc_reference(
        layer64, t, layer64.branch, sinkhorn_dtype=torch.float64))
    layer = make_layer(n, device=device, dtype=dtype)
    x = x64.detach().to(dtype).requires_grad_(True)
    out, grads = run(layer, x, layer)
    ref, ref_grads = run(layer, x, lambda t: mhc_reference(layer, t, layer.branch,
                                                           sinkhorn_dtype=torch.float32))
    assert out.dtype == dtype
    assert_flash_rule(out, ref, truth, floor=FLOORS[dtype][0], name=f"{dtype} output")
    for name, g in grads.items():
        assert g.dtype == dtype, name
        scale = truth_grads[name].abs().max().item()
        assert_flash_rule(g, ref_grads[name], truth_grads[name], floor=FLOORS[dtype][1] * scale,
                          name=f"{dtype} grad {name}")


@pytest.mark.parametrize("n", [2, 4, 8])
def test_h_res_doubly_stochastic_after_20_iterations(n):
    """After 20 iterations in fp32, entries are >= 0, rows sum to 1 within 1e-6 (the last step
    is a row step: rounding only), and columns within the convergence error, which grows with
    the spread of the logits: <= 1e-3 for the layer at its init (H̃_res about 4 I) and <= 1e-5
    for N(0, 0.5^2) logits. (Measured on 4096 draws: N(0, 1) logits reach 5e-3 and N(0, 2^2)
    logits 3e-2, at n = 2, 4, 8; the reference loop has the same error, see the forward tests.)"""
    torch.manual_seed(0)
    layer = ManifoldConstrainedHyperConnections(n, C)
    x = make_streams(n, dtype=torch.float32, shape=(256,))
    cases = (("at init", layer.mappings(x).res, 1e-3),
             ("N(0, 0.5^2)", ops.mhc_sinkhorn(torch.randn(1024, n, n) * 0.5), 1e-5))
    for name, h_res, col_err in cases:
        assert h_res.dtype == torch.float32 and h_res.shape[-2:] == (n, n)
        assert bool((h_res >= 0).all()), name
        ones = torch.ones(h_res.shape[:-1])
        assert_close(h_res.sum(-1), ones, atol=1e-6, name=f"{name}: row sums")
        assert_close(h_res.sum(-2), ones, atol=col_err, name=f"{name}: column sums")


def test_mhc_sinkhorn_is_the_paper_loop_on_the_operator():
    logits = torch.randn(16, 4, 4, dtype=torch.float64) * 2
    assert_close(ops.mhc_sinkhorn(logits), sinkhorn_knopp_reference(logits), atol=1e-12,
                 name="20 iterations")
    assert_close(ops.mhc_sinkhorn(logits, iters=3), sinkhorn_knopp_reference(logits, 3),
                 atol=1e-12, name="3 iterations")
    assert ops.mhc_sinkhorn(logits.to(torch.bfloat16)).dtype == torch.float32  # fp32 Sinkhorn


def test_implicit_gradient_option():
    """grad="implicit" reaches the Sinkhorn: at convergence (250 iterations, float64) it equals
    autograd through the literal loop (MATH.md 2.2: about 1e-6), and at 20 iterations it differs
    from the unrolled gradient (so the option is not silently ignored)."""
    n = 4
    x = make_streams(n)
    grads = {}
    for grad, iters in (("implicit", 250), ("unrolled", 250), ("implicit", 20), ("unrolled", 20)):
        layer = make_layer(n, iters=iters, grad=grad)
        grads[grad, iters] = run(layer, x, layer)[1]
    layer = make_layer(n, iters=250)
    ref = run(layer, x, lambda t: mhc_reference(layer, t, layer.branch,
                                                sinkhorn_dtype=torch.float64))[1]
    for name in ref:
        assert_close(grads["implicit", 250][name], ref[name], atol=1e-6, rtol=1e-5,
                     name=f"implicit grad {name}")
    gap = (grads["implicit", 20]["b_res"] - grads["unrolled", 20]["b_res"]).abs().max()
    assert gap > 1e-8, "grad='implicit' gave the unrolled gradient at 20 iterations"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_v4_sinkhorn_is_the_published_formula(dtype):
    logits = (torch.randn(10, 4, 4, dtype=torch.float64) * 3).to(dtype)
    for iters, eps in ((20, 1e-6), (1, 1e-6), (5, 1e-2)):
        out = ops.mhc_v4_sinkhorn(logits, iters=iters, eps=eps)  # the fused kernel
        # Rounding apart (the kernel multiplies by reciprocals; tests/test_mhc_v4.py bounds it).
        assert_close(out, v4_sinkhorn_reference(logits, iters, eps),
                     atol=1e-14 if dtype == torch.float64 else 1e-6, name=f"{iters}, {eps}")
        assert torch.equal(ops.mhc_v4_sinkhorn_loop(logits, iters, eps),
                           v4_sinkhorn_reference(logits, iters, eps))
    # At convergence (N(0, 1) logits, 300 iterations, float64) it is within O(n eps) of the
    # paper's log-domain Sinkhorn (measured: 9e-6 at n = 2, 4, 8).
    unit = torch.randn(10, 4, 4, dtype=torch.float64)
    diff = (ops.mhc_v4_sinkhorn(unit, 300) - sinkhorn_knopp_reference(unit, 300)).abs().max()
    assert 0 < diff < 4 * 4 * 1e-6, diff
    assert ops.mhc_v4_sinkhorn(logits.to(torch.bfloat16)).dtype == torch.float32


def test_starts_as_a_plain_residual():
    """With copied streams and gates at 0, every stream of the output is x + F(x): the
    doubly-stochastic H_res leaves identical streams unchanged, H_pre = 1/n, H_post = 1."""
    n = 4
    torch.manual_seed(0)
    branch = torch.nn.Linear(C, C).double()
    layer = ManifoldConstrainedHyperConnections(n, C, branch, dtype=torch.float64)
    with torch.no_grad():
        for name in ("alpha_pre", "alpha_post", "alpha_res"):
            getattr(layer, name).zero_()
    h = torch.randn(3, 5, C, dtype=torch.float64)
    x = expand_streams(h, n)
    assert x.shape == (3, 5, n, C)
    out = layer(x)
    assert_close(out, expand_streams(h + branch(h), n), atol=1e-12, name="x + F(x)")
    assert_close(reduce_streams(out, "mean"), h + branch(h), atol=1e-12, name="mean")
    assert_close(reduce_streams(out), n * (h + branch(h)), atol=1e-12, name="sum")
    maps = layer.mappings(x)
    assert_close(maps.pre, torch.full((3, 5, n), 1 / n, dtype=torch.float64), atol=1e-12,
                 name="H_pre at init")


def test_width_and_depth_connection_with_branch_arguments():
    n = 4
    layer = make_layer(n)
    scale = torch.tensor(0.5, dtype=torch.float64)
    x = make_streams(n)
    h, maps = layer.width_connection(x)
    assert h.shape == (3, 5, C) and maps.res.shape == (3, 5, n, n)
    manual = layer.depth_connection(x, layer.branch(h) * scale, maps)
    wrapped = ManifoldConstrainedHyperConnections(n, C, lambda t, s: layer.branch(t) * s)
    wrapped.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if not k.startswith("branch.")})
    assert_close(wrapped.double()(x, scale), manual, atol=1e-14, name="forward(x, *args)")


def test_docstring_example():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for test in finder.find(ManifoldConstrainedHyperConnections):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted >= 10 and result.failed == 0, result


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_streams"):
        ManifoldConstrainedHyperConnections(1, C)
    with pytest.raises(ValueError, match="variant"):
        ManifoldConstrainedHyperConnections(4, C, variant="v3")
    with pytest.raises(ValueError, match="expected grad in"):
        ManifoldConstrainedHyperConnections(4, C, grad="implicitt")
    with pytest.raises(ValueError, match="grad='unrolled'"):
        ManifoldConstrainedHyperConnections(4, C, variant="v4", grad="implicit")
    layer = ManifoldConstrainedHyperConnections(4, C)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4, 8\), got \(2, 3, 8\)"):
        layer.mappings(torch.randn(2, 3, C))
    with pytest.raises(TypeError, match="no branch"):
        layer(torch.randn(2, 4, C))
    with pytest.raises(ValueError, match=r"\(\.\.\., n, n\), got \(4, 3\)"):
        ops.mhc_sinkhorn(torch.randn(4, 3))
    with pytest.raises(ValueError, match="iters"):
        ops.mhc_v4_sinkhorn(torch.randn(4, 4), iters=0)
    with pytest.raises(ValueError, match="reduce"):
        reduce_streams(torch.randn(2, 4, C), "max")


def test_bad_dtypes_shapes_and_options_raise_clearly():
    """Each names the op and the argument: integer streams were mixed in integer arithmetic (h
    of 0.25 became 0, an all-zero result), complex logits lost their imaginary part, bad shapes
    raised broadcasting errors that named neither."""
    x = torch.randn(2, 3, 4, 5)
    h = torch.rand(2, 3, 4)
    r = torch.rand(2, 3, 4, 4)
    y = torch.randn(2, 3, 5)
    cases = [
        (TypeError, r"mhc_branch_input: expected x of a floating-point dtype, got torch.int32",
         lambda: ops.mhc_branch_input(torch.ones(2, 4, 8, dtype=torch.int32), torch.rand(2, 4))),
        (TypeError, r"mhc_branch_input: expected h_pre of a floating-point dtype",
         lambda: ops.mhc_branch_input(x, torch.ones(2, 3, 4, dtype=torch.long))),
        (TypeError, r"mhc_combine: expected x of a floating-point dtype",
         lambda: ops.mhc_combine(x.long(), y, h, r)),
        (TypeError, r"mhc_sinkhorn: expected logits of a floating-point dtype, got "
                    r"torch.complex64",
         lambda: ops.mhc_sinkhorn(torch.randn(2, 4, 4, dtype=torch.complex64))),
        (TypeError, r"mhc_v4_sinkhorn: expected logits of a floating-point dtype, got torch.int64",
         lambda: ops.mhc_v4_sinkhorn(torch.ones(2, 4, 4, dtype=torch.long))),
        (TypeError, r"mhc_mappings: expected alpha_pre to be a torch.Tensor, got float",
         lambda: ops.mhc_mappings(torch.randn(3, 24), 0.1, 0.1, 0.1, torch.zeros(4),
                                  torch.zeros(4), torch.zeros(4, 4))),
        (ValueError, r"mhc_branch_input: expected h_pre broadcastable to x's \(\.\.\., n\) = "
                     r"\(2, 3, 4\), got shape \(2, 3, 5\)",
         lambda: ops.mhc_branch_input(x, torch.rand(2, 3, 5))),
        (ValueError, r"mhc_combine: expected branch_output broadcastable to x's \(\.\.\., C\) "
                     r"= \(2, 3, 5\), got shape \(2, 3, 6\)",
         lambda: ops.mhc_combine(x, torch.randn(2, 3, 6), h, r)),
        (ValueError, r"mhc_combine: expected h_res broadcastable to \(\.\.\., n, n\)",
         lambda: ops.mhc_combine(x, y, h, torch.rand(2, 3, 4, 3))),
        (ValueError, r"mhc_combine: expected h_post broadcastable",  # n > 8: the composite path
         lambda: ops.mhc_combine(torch.randn(2, 9, 5), torch.randn(2, 5), torch.rand(2, 6),
                                 torch.rand(2, 9, 9))),
        (ValueError, r"expand_streams: expected h of shape \(\.\.\., C\), got \(\)",
         lambda: expand_streams(torch.tensor(1.0), 4)),
        (ValueError, r"reduce_streams: expected x of shape \(\.\.\., n, C\), got \(5,\)",
         lambda: reduce_streams(torch.randn(5))),
        (ValueError, r"mhc_v4_sinkhorn_loop: expected iters to be an int >= 1, got 0",
         lambda: ops.mhc_v4_sinkhorn_loop(torch.randn(2, 4, 4), 0)),
        (ValueError, r"ManifoldConstrainedHyperConnections: expected a finite eps > 0 for variant "
                     r"'v4', got 0",
         lambda: ManifoldConstrainedHyperConnections(4, 5, variant="v4", eps=0)),
        (ValueError, r"ManifoldConstrainedHyperConnections: expected a finite alpha_init, got nan",
         lambda: ManifoldConstrainedHyperConnections(4, 5, alpha_init=float("nan"))),
        (ValueError, r"ManifoldConstrainedHyperConnections: expected a finite alpha_init, got 'x'",
         lambda: ManifoldConstrainedHyperConnections(4, 5, alpha_init="x")),
        (TypeError, r"ManifoldConstrainedHyperConnections: expected the branch to return a tensor "
                    r"of shape \(\.\.\., C\), got tuple",
         lambda: ManifoldConstrainedHyperConnections(4, 5, branch=lambda t: (t, None))(x)),
        (TypeError, r"ManifoldConstrainedHyperConnections: expected x of a floating-point dtype",
         lambda: ManifoldConstrainedHyperConnections(3, 5).mappings(torch.ones(2, 3, 5).long())),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
    np = pytest.importorskip("numpy")  # NumPy scalars are numbers too
    layer = ManifoldConstrainedHyperConnections(4, 5, variant="v4", alpha_init=np.float32(0.5),
                                                eps=np.float32(1e-6))
    assert layer.alpha_init == 0.5 and layer.eps == pytest.approx(1e-6)


def test_meta_device_forward():
    """Shape analysis on the meta device (the composite mappings path there disabled autocast,
    which torch.autocast refuses for meta)."""
    layer = ManifoldConstrainedHyperConnections(4, C, branch=torch.nn.Linear(C, C),
                                                device="meta")
    layer.branch.to("meta")
    out = layer(torch.empty(2, 5, 4, C, device="meta"))
    assert out.shape == (2, 5, 4, C) and out.device.type == "meta"


def test_overridden_residual_matrix_ignores_autocast():
    """The mappings run in fp32 whatever autocast says, on the fused path and on the composite
    path that an overridden residual_matrix takes (its projection ran in bf16: 1e-3 off)."""

    class Same(ManifoldConstrainedHyperConnections):
        def residual_matrix(self, logits):
            return super().residual_matrix(logits)

    torch.manual_seed(0)
    layers = [ManifoldConstrainedHyperConnections(4, 64), Same(4, 64)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(8, 4, 64)
    for layer in layers:
        with torch.no_grad():
            for gate in (layer.alpha_pre, layer.alpha_post, layer.alpha_res):
                gate.fill_(1.0)
        want = layer.mappings(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer.mappings(x)
        for g, w, name in zip(got, want, ("pre", "post", "res")):
            assert g.dtype == torch.float32
            assert_close(g, w, atol=0, rtol=0, name=f"{type(layer).__name__} {name}")


class TinyModel(torch.nn.Module):
    """Embedding, `layers` blocks of (MLP under mHC), reduction, head: a model for compile."""

    def __init__(self, n, variant="paper", layers=2):
        super().__init__()
        self.n = n
        self.embed = torch.nn.Embedding(11, C)
        self.layers = torch.nn.ModuleList(
            ManifoldConstrainedHyperConnections(
                n, C, torch.nn.Sequential(torch.nn.LayerNorm(C), torch.nn.Linear(C, C),
                                          torch.nn.GELU()), variant=variant)
            for _ in range(layers))
        self.head = torch.nn.Linear(C, 11)

    def forward(self, tokens):
        x = expand_streams(self.embed(tokens), self.n)
        for layer in self.layers:
            x = layer(x)
        return self.head(reduce_streams(x))


def _compile_check(backend, variant, layers=2):
    """Compiled against eager in float64, so that only a real difference can fail (in fp32 both
    carry ~1e-5 cancellation errors in gradients such as alpha_res's)."""
    torch.manual_seed(0)
    model = TinyModel(4, variant, layers).double()
    tokens = torch.randint(0, 11, (2, 6))
    weight = torch.randn(2, 6, 11, dtype=torch.float64)
    eager = model(tokens)
    eager_grads = torch.autograd.grad((eager * weight).sum(), list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(tokens)
    grads = torch.autograd.grad((out * weight).sum(), list(model.parameters()))
    assert_close(out, eager, atol=1e-12, rtol=1e-10, name=f"{backend} output")
    for (name, _), g, e in zip(model.named_parameters(), grads, eager_grads):
        assert_close(g, e, atol=1e-11, rtol=1e-9, name=f"{backend} grad {name}")


@pytest.mark.parametrize("variant", ["paper", "v4"])
def test_compile_fullgraph_aot_eager(variant):
    _compile_check("aot_eager", variant)


def test_compile_fullgraph_inductor():
    """One mHC layer, forward and backward: about 30 s of compilation on 2 busy cores (cold
    cache), 3 s with inductor's cache warm."""
    _compile_check("inductor", "paper", layers=1)
