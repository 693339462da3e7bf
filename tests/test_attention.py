"""Sinkhorn attention: the functional against the Sinkformers formula and SDPA, the module against
nn.MultiheadAttention, masks, gradients, dtypes, causal behaviour, the converter and compile."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_DTYPES, DEVICES, LOW_PRECISION, assert_close, load_ops
from torch import nn

sinkhorn_ops = load_ops()
from sinkhorn_ops.nn import SinkhornMultiheadAttention, convert_to_sinkhorn_attention

sinkhorn_attention = sinkhorn_ops.sinkhorn_attention


def sinkformer_reference(q, k, v, n_it, scale=None):
    """The Sinkformers attention as published (Sander et al. 2022): log-domain, n_it half-steps
    starting with the rows (key axis), uniform marginals 1/n_q and 1/n_k, plan times n_k."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale
    f = torch.zeros_like(s[..., :, :1])
    g = torch.zeros_like(s[..., :1, :])
    for it in range(n_it):
        if it % 2 == 0:
            f = -math.log(n_q) - torch.logsumexp(s + g, dim=-1, keepdim=True)
        else:
            g = -math.log(n_k) - torch.logsumexp(s + f, dim=-2, keepdim=True)
    plan = torch.exp(s + f + g) * n_k
    return plan @ v, plan


def qkv(batch, L, S, E, Ev, *, dtype=torch.float64, device="cpu", seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(*batch, n, e, generator=gen, dtype=torch.float64)
           for n, e in ((L, E), (S, E), (S, Ev))]
    return [x.to(dtype=dtype, device=device).requires_grad_(requires_grad) for x in out]


# ---------------------------------------------------------------- functional


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("steps", [1, 3, 5, 7])
def test_sinkformer_parity(device, steps):
    q, k, v = qkv((2, 3), 9, 9, 8, 5, device=device)
    out = sinkhorn_attention(q, k, v, steps=steps)
    ref, _ = sinkformer_reference(q, k, v, steps)
    assert_close(out, ref, atol=1e-10, rtol=1e-9, name=f"steps={steps}")


@pytest.mark.parametrize("steps", [3, 5])
def test_rectangular_marginals(steps):
    """L != S: ours has marginals (1, L/S), the Sinkformer (1/L, 1/S) then times S, so the two
    plans differ by the factor L/S."""
    q, k, v = qkv((2,), 6, 10, 4, 3)
    _, ref_plan = sinkformer_reference(q, k, v, steps)
    _, plan = sinkhorn_ops.attention._sinkhorn_attention_with_weights(
        q, k, v, None, 0.0, False, None, steps, "unrolled")
    # ours = L * (theirs / S): both have the same shape, only the total mass differs.
    assert_close(plan, ref_plan * 6 / 10, atol=1e-12, rtol=1e-9, name="plan")
    assert_close(plan.sum(-1), torch.ones(2, 6, dtype=plan.dtype), atol=1e-12, name="row sums")
    steps_many = sinkhorn_ops.attention._sinkhorn_attention_with_weights(
        q, k, v, None, 0.0, False, None, 200, "unrolled")[1]
    assert_close(steps_many.sum(-2), torch.full((2, 10), 0.6, dtype=plan.dtype), atol=1e-8,
                 name="column sums at convergence")


@pytest.mark.parametrize("device", DEVICES)
def test_steps1_equals_sdpa(device):
    q, k, v = qkv((2, 3), 7, 11, 8, 5, dtype=torch.float32, device=device)
    bool_mask = torch.rand(7, 11, generator=torch.Generator().manual_seed(1)) > 0.3
    bool_mask[:, 0] = True
    float_mask = torch.randn(2, 1, 7, 11).to(device)
    for mask in (None, bool_mask.to(device), float_mask):
        for scale in (None, 0.3):
            out = sinkhorn_attention(q, k, v, attn_mask=mask, scale=scale, steps=1)
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            assert_close(out, ref, atol=2e-6, rtol=1e-5, name="steps=1 vs SDPA")
    out = sinkhorn_attention(q, k, v, is_causal=True, steps=1)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(out, ref, atol=2e-6, rtol=1e-5, name="causal steps=1 vs SDPA")


def test_broadcasting_and_shapes():
    """Batch dimensions broadcast as in SDPA (key/value shared across heads, mask per batch)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 1, 7, 6, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 1, 7, 3, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., 5:] = False
    out = sinkhorn_attention(q, k, v, attn_mask=mask, steps=3)
    assert out.shape == (2, 4, 5, 3)
    for h in range(4):
        ref = sinkhorn_attention(q[:, h], k[:, 0], v[:, 0], attn_mask=mask[:, 0], steps=3)
        assert_close(out[:, h], ref, atol=1e-12, name=f"head {h}")
    # unbatched (L, E)
    assert sinkhorn_attention(q[0, 0], k[0, 0], v[0, 0]).shape == (5, 3)


def test_non_contiguous_and_empty():
    q, k, v = qkv((3,), 5, 7, 4, 6, seed=4)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    vt = v.transpose(-2, -1).contiguous().transpose(-2, -1)
    assert not qt.is_contiguous() and not vt.is_contiguous()
    assert_close(sinkhorn_attention(qt, k, vt, steps=3), sinkhorn_attention(q, k, v, steps=3),
                 atol=1e-12, name="non-contiguous")
    assert sinkhorn_attention(q[:, :0], k, v, steps=3).shape == (3, 0, 6)
    out = sinkhorn_attention(q, k[:, :0], v[:, :0], steps=3)  # no keys: zero rows, not NaN
    assert out.shape == (3, 5, 6) and (out == 0).all()


def test_key_padding_is_exact():
    """Padded keys (MATH.md section 1 mask paragraph): the result equals the unpadded problem."""
    q, k, v = qkv((3,), 8, 8, 4, 4, seed=5)
    keep = torch.ones(3, 1, 8, dtype=torch.bool)
    keep[1, :, 6:] = False
    out = sinkhorn_attention(q, k, v, attn_mask=keep, steps=5)
    ref = sinkhorn_attention(q[1], k[1, :6], v[1, :6], steps=5)
    assert_close(out[1], ref, atol=1e-12, name="padded == unpadded")
    # float mask with -inf is the same as the bool mask
    add = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, float("-inf"))
    assert_close(sinkhorn_attention(q, k, v, attn_mask=add, steps=5), out, atol=1e-12,
                 name="float -inf == bool")
    # padded queries too: both axes, row and column sums of the allowed block
    keep2 = keep & torch.ones(3, 8, 1, dtype=torch.bool)
    keep2[1, 5:, :] = False
    _, plan = sinkhorn_ops.attention._sinkhorn_attention_with_weights(
        q, k, v, keep2, 0.0, False, None, 201, "unrolled")
    assert torch.isfinite(plan).all()
    assert_close(plan[1].sum(-1), torch.tensor([1.0] * 5 + [0.0] * 3, dtype=q.dtype),
                 atol=1e-10, name="row sums")
    assert_close(plan[1].sum(-2), torch.tensor([5 / 6] * 6 + [0.0] * 2, dtype=q.dtype),
                 atol=1e-6, name="column sums")


def test_fully_masked_row_is_zero_not_nan():
    q, k, v = qkv((2,), 4, 5, 3, 3)
    keep = torch.ones(4, 5, dtype=torch.bool)
    keep[2] = False
    out = sinkhorn_attention(q, k, v, attn_mask=keep, steps=3)
    assert torch.isfinite(out).all()
    assert (out[:, 2] == 0).all()


@pytest.mark.parametrize("grad", ["unrolled", "implicit"])
def test_gradients_vs_reference(grad):
    q, k, v = qkv((2,), 6, 6, 4, 3, requires_grad=True, seed=7)
    w = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    steps = 5 if grad == "unrolled" else 400
    (sinkhorn_attention(q, k, v, steps=steps, grad=grad) * w).sum().backward()
    ours = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    (sinkformer_reference(q, k, v, steps)[0] * w).sum().backward()
    tol = 1e-9 if grad == "unrolled" else 1e-6
    for name, a, b in zip("qkv", ours, (q.grad, k.grad, v.grad)):
        assert_close(a, b, atol=tol, rtol=tol, name=f"d{name} ({grad})")


def test_gradcheck():
    q, k, v = qkv((1,), 4, 5, 3, 2, requires_grad=True, seed=9)
    mask = torch.randn(4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: sinkhorn_attention(q, k, v, attn_mask=mask, steps=4), (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_dtypes(device, dtype):
    """FlashAttention's rule against the float64 truth: at most twice the error of the
    reference formula computed in the same dtype, plus a floor."""
    q, k, v = qkv((2, 2), 17, 17, 16, 8, seed=11)
    truth, _ = sinkformer_reference(q, k, v, 3)
    lq, lk, lv = (x.to(device=device, dtype=dtype) for x in (q, k, v))
    out = sinkhorn_attention(lq, lk, lv, steps=3)
    assert out.dtype == dtype and out.device.type == device
    if dtype == torch.float64:
        assert_close(out, truth, atol=1e-10, rtol=1e-9, name="float64")
        return
    low_ref, _ = sinkformer_reference(lq, lk, lv, 3)
    err = (out.double().cpu() - truth).abs().max().item()
    ref_err = (low_ref.double().cpu() - truth).abs().max().item()
    floor = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert err <= 2 * ref_err + floor, f"{dtype}: error {err:.3e} vs reference {ref_err:.3e}"


def test_autocast_bf16_cpu():
    q, k, v = qkv((2,), 8, 8, 8, 4, dtype=torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sinkhorn_attention(q, k, v, steps=3)
        ref = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == ref.dtype == torch.bfloat16
    truth, _ = sinkformer_reference(*(x.detach().double() for x in (q, k, v)), 3)
    assert (out.double() - truth).abs().max() < 5e-2
    out.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_dropout():
    q, k, v = qkv((2,), 16, 16, 4, 16, dtype=torch.float32)
    v = torch.eye(16).expand(2, 16, 16)  # the output is the plan itself
    torch.manual_seed(0)
    out = sinkhorn_attention(q, k, v, dropout_p=0.5, steps=3)
    plan = sinkhorn_attention(q, k, v, steps=3)
    zeros = out == 0
    assert 0.3 < zeros.float().mean() < 0.7
    assert_close(out[~zeros], 2 * plan[~zeros], atol=1e-6, rtol=1e-5, name="kept entries x2")
    assert torch.equal(sinkhorn_attention(q, k, v, dropout_p=0.0, steps=3), plan)


def test_causal():
    """steps=1 is causal softmax; more steps raise, explaining why (MATH.md section 3)."""
    q, k, v = qkv((1,), 5, 7, 4, 4)
    assert_close(sinkhorn_attention(q, k, v, is_causal=True, steps=1),
                 F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-12,
                 name="causal steps=1")
    with pytest.raises(ValueError, match="infeasible.*positions after i"):
        sinkhorn_attention(q, k, v, is_causal=True, steps=3)
    with pytest.raises(ValueError, match="attn_mask"):
        sinkhorn_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool),
                           is_causal=True, steps=1)
    mha = SinkhornMultiheadAttention(8, 2, steps=3)
    x = torch.randn(5, 1, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with pytest.raises(ValueError, match="infeasible"):
        mha(x, x, x, attn_mask=causal, is_causal=True)
    with pytest.raises(RuntimeError, match="attn_mask"):  # as nn.MultiheadAttention
        mha(x, x, x, is_causal=True)
    mha.steps = 1
    ref = nn.MultiheadAttention(8, 2)
    ref.load_state_dict(mha.state_dict())
    assert_close(mha(x, x, x, attn_mask=causal, is_causal=True)[0],
                 ref(x, x, x, attn_mask=causal, is_causal=True)[0], atol=2e-6, name="mha causal")


def test_causal_leak_is_why():
    """The reason for the error: with column steps, the output at position i under a causal
    pattern depends on later positions (here given as a plain attn_mask, which is not detected)."""
    q, k, v = qkv((1,), 6, 6, 4, 4, seed=13)
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, 4:] += 1.0  # change only later positions
    k2[:, 4:] += 1.0
    v2[:, 4:] += 1.0
    for steps, leaks in ((1, False), (3, True)):
        a = sinkhorn_attention(q, k, v, attn_mask=keep, steps=steps)[:, :4]
        b = sinkhorn_attention(q2, k2, v2, attn_mask=keep, steps=steps)[:, :4]
        assert ((a - b).abs().max() > 1e-6) == leaks, f"steps={steps}"


def test_encoder_with_causal_mask():
    """nn.TransformerEncoder detects a causal src mask and passes is_causal=True to the
    converted attention: steps > 1 raise instead of leaking, steps=1 is the softmax model."""
    ref = encoder()
    model = convert_to_sinkhorn_attention(encoder(), steps=5)
    x = torch.randn(2, 6, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    with pytest.raises(ValueError, match="infeasible"):
        model(x, mask=causal)
    convert_to_sinkhorn_attention(model, steps=1)
    assert_close(model(x, mask=causal), ref(x, mask=causal), atol=1e-5, name="steps=1")


# ---------------------------------------------------------------- module


def paired(seed=0, **kwargs):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(**kwargs)
    ours = SinkhornMultiheadAttention(**kwargs, steps=1)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


MHA_CONFIGS = [
    {"embed_dim": 8, "num_heads": 2},
    {"embed_dim": 8, "num_heads": 2, "batch_first": True, "bias": False},
    {"embed_dim": 8, "num_heads": 4, "kdim": 6, "vdim": 5, "add_bias_kv": True, "add_zero_attn": True},
    {"embed_dim": 6, "num_heads": 3, "batch_first": True, "add_zero_attn": True},
]


@pytest.mark.parametrize("config", MHA_CONFIGS, ids=lambda c: "-".join(f"{k}" for k in c))
def test_module_steps1_equals_mha(config):
    ref, ours = paired(**config)
    kdim, vdim = config.get("kdim") or config["embed_dim"], config.get("vdim") or config["embed_dim"]
    N, L, S, E, H = 3, 5, 7, config["embed_dim"], config["num_heads"]
    bf = config.get("batch_first", False)
    gen = torch.Generator().manual_seed(2)
    shape = lambda n, d: (N, n, d) if bf else (n, N, d)
    q = torch.randn(*shape(L, E), generator=gen)
    k = torch.randn(*shape(S, kdim), generator=gen)
    v = torch.randn(*shape(S, vdim), generator=gen)
    kpm_bool = torch.zeros(N, S, dtype=torch.bool)
    kpm_bool[1, 5:] = True
    kpm_float = torch.zeros(N, S).masked_fill(kpm_bool, float("-inf"))
    am_bool = torch.rand(L, S, generator=gen) > 0.7
    am_bool[:, 0] = False
    am_float3 = torch.randn(N * H, L, S, generator=gen)
    cases = [{}, {"key_padding_mask": kpm_bool}, {"key_padding_mask": kpm_float},
             {"attn_mask": am_bool}, {"attn_mask": am_float3},
             {"attn_mask": am_float3, "key_padding_mask": kpm_float},
             {"average_attn_weights": False}]
    for case in cases:
        out_r, w_r = ref(q, k, v, **case)
        out_o, w_o = ours(q, k, v, **case)
        assert_close(out_o, out_r, atol=2e-6, rtol=1e-5, name=f"output {list(case)}")
        assert_close(w_o, w_r, atol=2e-6, rtol=1e-5, name=f"weights {list(case)}")
        out_o, none = ours(q, k, v, need_weights=False, **case)
        assert none is None
        assert_close(out_o, out_r, atol=2e-6, rtol=1e-5, name=f"need_weights=False {list(case)}")
    # unbatched
    q1, k1, v1 = (x[0] if bf else x[:, 0] for x in (q, k, v))
    out_r, w_r = ref(q1, k1, v1, key_padding_mask=kpm_bool[1])
    out_o, w_o = ours(q1, k1, v1, key_padding_mask=kpm_bool[1])
    assert_close(out_o, out_r, atol=2e-6, rtol=1e-5, name="unbatched output")
    assert_close(w_o, w_r, atol=2e-6, rtol=1e-5, name="unbatched weights")


def test_module_weights_are_doubly_stochastic():
    torch.manual_seed(0)
    mha = SinkhornMultiheadAttention(8, 2, steps=41, batch_first=True)
    x = torch.randn(2, 6, 8)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    _, w = mha(x, x, x, key_padding_mask=kpm, average_attn_weights=False)
    assert_close(w.sum(-1), torch.ones(2, 2, 6), atol=1e-5, name="row sums")
    cols = torch.ones(2, 2, 6)
    cols[1, :, :4] = 6 / 4
    cols[1, :, 4:] = 0
    assert_close(w.sum(-2), cols, atol=1e-4, name="column sums")


def test_state_dict_round_trip():
    for config in MHA_CONFIGS:
        ref = nn.MultiheadAttention(**config)
        ours = SinkhornMultiheadAttention(**config, steps=3)
        assert list(ref.state_dict()) == list(ours.state_dict())
        ours.load_state_dict(ref.state_dict())  # strict, both ways
        back = nn.MultiheadAttention(**config)
        back.load_state_dict(ours.state_dict())
        for name, t in ref.state_dict().items():
            assert torch.equal(back.state_dict()[name], t), name
    assert "steps=3" in repr(SinkhornMultiheadAttention(8, 2, steps=3))


def test_module_gradients_and_dropout():
    torch.manual_seed(0)
    mha = SinkhornMultiheadAttention(8, 2, dropout=0.5, steps=3, batch_first=True).train()
    x = torch.randn(2, 5, 8, requires_grad=True)
    out, _ = mha(x, x, x)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and mha.in_proj_weight.grad.abs().sum() > 0
    mha.eval()
    a, _ = mha(x, x, x)
    b, _ = mha(x, x, x)
    assert torch.equal(a, b)  # no dropout in eval


# ---------------------------------------------------------------- converter and compile


def encoder(seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)


@pytest.mark.parametrize("train", [False, True])
def test_converter_on_transformer_encoder(train):
    model = encoder().train(train)
    ref = encoder().train(train)
    x = torch.randn(3, 6, 8)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    params_before = [id(p) for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    convert_to_sinkhorn_attention(model, steps=1)
    assert [id(p) for p in model.parameters()] == params_before
    assert all(type(layer.self_attn) is SinkhornMultiheadAttention for layer in model.layers)
    with torch.no_grad():  # the eval fast path needs no_grad: it must not bypass us
        y_ref = ref(x, src_key_padding_mask=kpm)
        y1 = model(x, src_key_padding_mask=kpm)
        ok = ~kpm  # padded positions are unspecified (the nested fast path gives zeros)
        assert_close(y1[ok], y_ref[ok], atol=1e-5, rtol=1e-5, name="steps=1 == softmax")
        convert_to_sinkhorn_attention(model, steps=5)
        y5 = model(x, src_key_padding_mask=kpm)
        assert (y5[ok] - y_ref[ok]).abs().max() > 1e-3, "converted model still runs softmax"
        y5_plain = model(x)
        assert (y5_plain - ref(x)).abs().max() > 1e-3
    # an optimizer built before the conversion still trains the converted parameters
    model.train()
    before = model.layers[0].self_attn.in_proj_weight.detach().clone()
    model(x, src_key_padding_mask=kpm).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.layers[0].self_attn.in_proj_weight)


def test_compile_fullgraph():
    """A converted TransformerEncoder under torch.compile(fullgraph=True): same output and a
    backward (aot_eager keeps the test fast on CPU; the op's fake kernel is what is tested)."""
    model = convert_to_sinkhorn_attention(encoder(), steps=3)
    x = torch.randn(2, 5, 8, requires_grad=True)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[0, 3:] = True
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x, src_key_padding_mask=kpm)
    assert_close(y, model(x, src_key_padding_mask=kpm), atol=1e-6, rtol=1e-5, name="compiled")
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", LOW_PRECISION[1:])
def test_module_low_precision(dtype):
    torch.manual_seed(0)
    mha = SinkhornMultiheadAttention(8, 2, steps=3, batch_first=True, dtype=dtype)
    x = torch.randn(2, 5, 8, dtype=dtype)
    out, w = mha(x, x, x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(w.float().sum(-1), torch.ones(2, 5), atol=3e-2, name="row sums")


def test_fp16_scores_that_fit_do_not_overflow():
    """Q Kᵀ of fp16 inputs can overflow (|q|² about 1e5 here) where the scaled scores fit
    (1.4e4): the query is scaled before the product, as scaled_dot_product_attention does, so
    the output is finite and steps=1 matches SDPA."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(1, 2, 4, 64, generator=gen) * 40).half()
    v = torch.randn(1, 2, 4, 64, generator=gen).half()
    assert torch.isinf(x @ x.transpose(-2, -1)).any()  # the unscaled product overflows
    want = F.scaled_dot_product_attention(x.float(), x.float(), v.float())
    assert_close(sinkhorn_attention(x, x, v, steps=1).float(), want, atol=2e-3, name="steps=1")
    for steps in (2, 3):
        got = sinkhorn_attention(x, x, v, steps=steps)
        want = sinkhorn_attention(x.float(), x.float(), v.float(), steps=steps)
        assert torch.isfinite(got).all(), steps
        assert_close(got.float(), want, atol=2e-3, name=f"steps={steps}")


@pytest.mark.parametrize("fill", [-1e4, -1e9, torch.finfo(torch.float32).min],
                         ids=["bert", "1e9", "finfo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_large_negative_masks_mask(fill, dtype):
    """A finite "large negative" float mask (-1e9, finfo.min, BERT's -10000) masks as -inf does:
    Sinkhorn undoes a bias constant on a key's column, so a padding column of -1e9 got its full
    mass back at the first column step (2.0 of each row on two padded keys of six, and row sums
    of 2.6 in fp32). Functional and module (float key_padding_mask)."""
    q, k, v = qkv((2,), 4, 6, 8, 3, dtype=dtype, seed=11)
    pad = torch.arange(6) >= 4
    finite = torch.zeros(4, 6, dtype=dtype).masked_fill(pad, fill)
    infinite = torch.zeros(4, 6, dtype=dtype).masked_fill(pad, float("-inf"))
    for steps in (1, 3, 8):
        _, got = sinkhorn_ops.attention._sinkhorn_attention_with_weights(
            q, k, v, finite, 0.0, False, None, steps, "unrolled")
        _, want = sinkhorn_ops.attention._sinkhorn_attention_with_weights(
            q, k, v, infinite, 0.0, False, None, steps, "unrolled")
        assert (got[..., pad] == 0).all(), steps
        assert_close(got, want, atol=1e-6 if dtype == torch.float32 else 1e-12,
                     name=f"steps={steps}")
    attn = SinkhornMultiheadAttention(8, 2, batch_first=True, dtype=dtype)
    x = torch.randn(2, 6, 8, dtype=dtype)
    kpm = torch.zeros(2, 6, dtype=dtype).masked_fill(pad, fill)
    out, weights = attn(x, x, x, key_padding_mask=kpm)
    ref, _ = attn(x, x, x, key_padding_mask=pad.expand(2, 6))
    assert (weights[..., pad] == 0).all()
    assert_close(out, ref, atol=1e-6 if dtype == torch.float32 else 1e-12, name="module")


def test_bias_masks_above_the_threshold_stay_biases():
    """Only entries at or below -1e4 count as masked; a bias of -20 is added (a small positive
    weight at steps=1, as softmax), and its gradient reaches a learnable mask. A column bias of
    -1000, which Sinkhorn undoes, stays finite and unmasked at steps > 1."""
    q, k, v = qkv((2,), 4, 6, 8, 3, seed=12)
    bias = torch.zeros(4, 6, dtype=q.dtype)
    bias[:, 0] = -20.0
    bias.requires_grad_(True)
    _, plan = sinkhorn_ops.attention._sinkhorn_attention_with_weights(
        q, k, v, bias, 0.0, False, None, 1, "unrolled")
    want = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8) + bias, dim=-1)
    assert_close(plan, want, atol=1e-14, name="steps=1 bias")
    assert (plan[..., 0] > 0).all()
    plan.sum(dim=(0, 1))[0].backward()
    assert bias.grad.abs().sum() > 0
    column = torch.zeros(4, 6, dtype=q.dtype)
    column[:, 0] = -1000.0
    for steps in (2, 3, 400):
        _, got = sinkhorn_ops.attention._sinkhorn_attention_with_weights(
            q, k, v, column, 0.0, False, None, steps, "unrolled")
        assert torch.isfinite(got).all() and (got[..., 0] > 0.01).all(), steps
    # converged, the column bias is undone: the fixed point ignores a constant on a column
    _, plain = sinkhorn_ops.attention._sinkhorn_attention_with_weights(
        q, k, v, None, 0.0, False, None, 400, "unrolled")
    assert_close(got, plain, atol=1e-9, name="converged: the column bias is undone")


def test_functional_bad_masks_and_dtypes():
    q, k, v = qkv((2,), 7, 8, 4, 4)
    with pytest.raises(TypeError, match=r"sinkhorn_attention: expected attn_mask of dtype bool "
                                        r"or floating point, got torch.uint8"):
        sinkhorn_attention(q, k, v, attn_mask=torch.ones(7, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="got torch.int64"):
        sinkhorn_attention(q, k, v, attn_mask=torch.ones(7, 8, dtype=torch.long))
    for dtype in (torch.bool, torch.float64):
        with pytest.raises(ValueError, match=r"sinkhorn_attention: expected attn_mask "
                                             r"broadcastable to .*\(2, 7, 8\), got shape \(5, 8\)"):
            sinkhorn_attention(q, k, v, attn_mask=torch.ones(5, 8, dtype=dtype))
    with pytest.raises(TypeError, match="sinkhorn_attention: expected query and key of the same "
                                        "dtype, got torch.float64 and torch.float32"):
        sinkhorn_attention(q, k.float(), v)
    # a mask may add batch dimensions, not queries or keys (SDPA raises too)
    with pytest.raises(ValueError, match=r"expected attn_mask broadcastable to the scores' shape"):
        sinkhorn_attention(q[:, :1], k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool).tril())
    # under autocast, mixed query and key dtypes are the matmul's to cast (as SDPA)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sinkhorn_attention(q.float(), k.bfloat16(), v.float())
    assert torch.isfinite(out).all()


def test_module_bad_masks_and_options():
    attn = SinkhornMultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"SinkhornMultiheadAttention: expected attn_mask of "
                                         r"shape \(L, S\) = \(5, 5\) or \(N \* num_heads, L, S\) "
                                         r"= \(4, 5, 5\), got \(3, 5, 5\)"):
        attn(x, x, x, attn_mask=torch.zeros(3, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got \(5, 4\)"):
        attn(x, x, x, attn_mask=torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"SinkhornMultiheadAttention: expected key_padding_mask "
                                         r"of shape \(N, S\) = \(2, 5\) .*got \(2, 6\)"):
        attn(x, x, x, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="SinkhornMultiheadAttention: expected grad in "
                                         r"\('unrolled', .*got 'bogus'"):
        SinkhornMultiheadAttention(8, 2, grad="bogus")
    # unbatched key_padding_mask (S,) still works
    out, _ = attn(x[0], x[0], x[0], key_padding_mask=torch.tensor([False] * 4 + [True]))
    assert out.shape == (5, 8) and torch.isfinite(out).all()
