"""OptVQ (MATH.md section 5): sinkhorn_assign against the operator and the published loop, its
memory, balanced_assignment against SwAV, the quantiser module, and the distributed column
reductions on two gloo processes."""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, assert_close, gloo_group, load_ops, run_on_gloo

sinkhorn_ops = load_ops()
from sinkhorn_ops.nn import SinkhornVectorQuantizer, codebook_stats
from sinkhorn_ops.optvq import (
    optvq_normalize_reference,
    optvq_sinkhorn_reference,
    swav_sinkhorn_reference,
)

sinkhorn_assign = sinkhorn_ops.sinkhorn_assign
balanced_assignment = sinkhorn_ops.balanced_assignment


def problem(n, k, d, *, seed=0, dtype=torch.float64, device="cpu", near=True):
    """x ~ N(0, I); codes are data points plus noise (near=True), so every code has mass nearby
    and the published loop's 1e-8 guards stay negligible, or independent draws (near=False)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if near:
        e = x[torch.randint(0, n, (k,), generator=gen)] + 0.3 * torch.randn(k, d, generator=gen,
                                                                            dtype=torch.float64)
    else:
        e = torch.randn(k, d, generator=gen, dtype=torch.float64)
    return x.to(device, dtype), e.to(device, dtype)


def op_assignment(x, e, *, epsilon=10.0, iters=5, normalize="all"):
    """The core operator on the materialised matrix: S = -eps A, a = 1, b = N/K, 2 iters steps
    starting with the columns (MATH.md section 1, table row OptVQ)."""
    a = optvq_normalize_reference(torch.cdist(x, e), normalize, x.shape[1])
    n, k = a.shape
    s = -epsilon * a
    return sinkhorn_ops.sinkhorn(s, torch.ones(n, dtype=s.dtype, device=s.device),
                                 torch.full((k,), n / k, dtype=s.dtype, device=s.device),
                                 steps=2 * iters, start="col", return_potentials=True)


@pytest.mark.parametrize("normalize", ["all", "dim", None])
@pytest.mark.parametrize("n,k,d,chunk", [(2, 3, 4, None), (5, 3, 4, 1), (33, 31, 5, 7),
                                         (257, 64, 16, None), (100, 257, 8, 33)])
def test_assign_matches_operator(n, k, d, chunk, normalize):
    x, e = problem(n, k, d, seed=n + k, near=False)
    idx, g = sinkhorn_assign(x, e, normalize=normalize, chunk_size=chunk, return_potentials=True)
    ref = op_assignment(x, e, normalize=normalize)
    assert torch.equal(idx, ref.plan.argmax(1)), f"{(idx != ref.plan.argmax(1)).sum()} differ"
    # Same recursion from f = g = 0, so the gauge already agrees; compare centred g anyway.
    assert_close(g - g.mean(), ref.g - ref.g.mean(), atol=1e-9, rtol=1e-9, name="g")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [16, None])
def test_assign_float32_matches_operator(device, chunk):
    x, e = problem(300, 129, 16, seed=3, dtype=torch.float32, device=device)
    idx, g = sinkhorn_assign(x, e, chunk_size=chunk, return_potentials=True)
    ref = op_assignment(x, e)
    assert g.dtype == torch.float32 and idx.device == x.device
    # Rounding differs (GEMM form, streamed statistics): only near-ties may flip.
    assert (idx != ref.plan.argmax(1)).float().mean() <= 0.01
    assert_close(g - g.mean(), ref.g - ref.g.mean(), atol=2e-3, rtol=1e-4, name="g")


@pytest.mark.parametrize("normalize", ["all", "dim", None])
@pytest.mark.parametrize("n,k,d", [(64, 16, 4), (100, 33, 8), (257, 31, 5)])
def test_assign_matches_published_loop(n, k, d, normalize):
    x, e = problem(n, k, d, seed=7 * n + k)
    a = optvq_normalize_reference(torch.cdist(x, e), normalize, d)
    # float64 and these sizes: the kernel-domain loop does not underflow.
    exact = optvq_sinkhorn_reference(a, guard=0.0)
    idx, g = sinkhorn_assign(x, e, normalize=normalize, chunk_size=13, return_potentials=True)
    assert torch.equal(idx, exact.argmax(1))
    # Our plan is the row softmax of S + g: without its guards the loop is section 1 exactly.
    assert_close(torch.softmax(-10.0 * a + g, dim=1), exact, atol=1e-10, rtol=1e-9, name="plan")
    # With the published 1e-8 guards (which move this plan by up to ~0.1 here): guard=1e-8.
    published = optvq_sinkhorn_reference(a)
    idx, g = sinkhorn_assign(x, e, normalize=normalize, chunk_size=13, return_potentials=True,
                             guard=1e-8)
    assert torch.equal(idx, published.argmax(1))
    rows = published / published.sum(1, keepdim=True)
    assert_close(torch.softmax(-10.0 * a + g, dim=1), rows, atol=1e-10, rtol=1e-8,
                 name="plan rows vs published")


def test_published_guards_matter():
    """The guards change assignments on ordinary data (recorded here; MATH.md's table omits it)."""
    x, e = problem(100, 33, 8, seed=7 * 100 + 33)
    exact = sinkhorn_assign(x, e)
    guarded = sinkhorn_assign(x, e, guard=1e-8)
    assert not torch.equal(exact, guarded)


def test_nearest_neighbour_special_case():
    x, e = problem(200, 50, 6, seed=1, dtype=torch.float32, near=False)
    idx = sinkhorn_assign(x, e, epsilon=1.0, iters=0, normalize=None, chunk_size=17)
    assert torch.equal(idx, torch.cdist(x, e).argmin(1))


def _cpu_peak_bytes(fn):
    """Peak of live CPU allocations during fn(), from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_assign_memory_is_one_chunk():
    n, k, d, chunk = 2048, 512, 16, 128
    x, e = problem(n, k, d, dtype=torch.float32, near=False)
    peak = _cpu_peak_bytes(lambda: sinkhorn_assign(x, e, chunk_size=chunk))
    chunk_bytes, full_bytes = chunk * k * 4, n * k * 4
    # One chunk buffer, an eighth of it as row-LSE scratch, and O((N + K) d) vectors.
    assert peak <= 1.5 * chunk_bytes + 16 * (n + k) * 4, (peak, chunk_bytes)
    assert peak < full_bytes / 8, (peak, full_bytes)


@pytest.mark.parametrize("n,k,chunk", [(64, 10, 5), (33, 7, None), (5, 8, 2)])
def test_balanced_assignment_matches_swav(n, k, chunk):
    scores = torch.nn.functional.normalize(torch.randn(n, k, dtype=torch.float64), dim=1)
    q = balanced_assignment(scores, chunk_size=chunk)
    assert_close(q, swav_sinkhorn_reference(scores), atol=1e-9, rtol=1e-9, name="Q")
    assert_close(q.sum(1), torch.ones(n, dtype=q.dtype), atol=1e-12, name="row sums")
    s = scores / 0.05
    ref = sinkhorn_ops.sinkhorn(s, torch.ones(n, dtype=s.dtype), torch.full((k,), n / k,
                                dtype=s.dtype), steps=6, start="col")
    assert_close(q, ref, atol=1e-12, rtol=1e-10, name="Q vs operator")


def test_sampling_follows_the_plan():
    x, e = problem(4, 3, 2, seed=5, near=False)
    ref = op_assignment(x, e, epsilon=1.0)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sinkhorn_assign(x, e, epsilon=1.0, sample=True, generator=gen)
                         for _ in range(600)])
    freq = F.one_hot(draws, 3).double().mean(0)
    assert_close(freq, ref.plan, atol=0.08, name="sampling frequencies")


def test_bad_inputs():
    x, e = problem(8, 4, 3)
    with pytest.raises(ValueError, match=r"sinkhorn_assign: expected x of shape \(N, d\)"):
        sinkhorn_assign(x, e[:, :2])
    with pytest.raises(ValueError, match="sinkhorn_assign: expected normalize"):
        sinkhorn_assign(x, e, normalize="max")
    with pytest.raises(ValueError, match="sinkhorn_assign: expected chunk_size"):
        sinkhorn_assign(x, e, chunk_size=0)
    with pytest.raises(ValueError, match="balanced_assignment: expected epsilon"):
        balanced_assignment(x, epsilon=-1.0)
    assert sinkhorn_assign(x[:0], e).shape == (0,)


# ---- the module ----------------------------------------------------------------------------

def _flat_input(x, heads):
    if x.dim() == 4:
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])
    return x.reshape(-1, x.shape[-1] // heads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,heads", [((2, 8, 3, 5), 2), ((3, 7, 8), 1), ((2, 5, 12), 4)])
def test_module_matches_reference_forward(device, shape, heads):
    torch.manual_seed(0)
    c = shape[1] if len(shape) == 4 else shape[-1]
    vq = SinkhornVectorQuantizer(32, c, num_head=heads, chunk_size=7).to(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    out, loss, idx = vq(x)
    flat = _flat_input(x.detach(), heads)
    embed = vq.embedding.weight.detach()
    want = op_assignment(flat.double(), embed.double()).plan.argmax(1)
    got = idx.permute(0, 2, 3, 1).reshape(-1) if len(shape) == 4 else idx.reshape(-1)
    assert out.shape == x.shape
    assert idx.shape == ((shape[0], heads, shape[2], shape[3]) if len(shape) == 4
                         else (shape[0], shape[1], heads))
    assert (got != want).float().mean() <= 0.02  # float32 module vs float64 operator: near-ties
    x_q = embed[got]
    want_out = x_q.view(shape[0], -1, c)
    if len(shape) == 4:
        want_out = want_out.view(shape[0], shape[2], shape[3], c).permute(0, 3, 1, 2)
    assert_close(out, want_out, atol=1e-6, name="x_q")
    want_loss = (flat - x_q).pow(2).mean() * (1 + 0.25)
    assert_close(loss, want_loss, atol=1e-6, rtol=1e-5, name="loss")


def test_module_gradients_straight_through():
    torch.manual_seed(1)
    vq = SinkhornVectorQuantizer(16, 6, num_head=2, beta=0.25)
    x = torch.randn(4, 5, 6, requires_grad=True)
    out, loss, idx = vq(x)
    upstream = torch.randn_like(out)
    gx, = torch.autograd.grad((out * upstream).sum(), x, retain_graph=True)
    assert_close(gx, upstream, atol=0, name="straight-through dx")
    gx_loss, ge = torch.autograd.grad(loss, (x, vq.embedding.weight))
    flat = x.detach().reshape(-1, 3)
    x_q = vq.embedding.weight.detach()[idx.reshape(-1)]
    assert_close(gx_loss.reshape(-1, 3), 2 * (flat - x_q) / flat.numel(), atol=1e-7, name="dx")
    want = torch.zeros_like(ge).index_add_(0, idx.reshape(-1), 0.25 * 2 * (x_q - flat) / flat.numel())
    assert_close(ge, want, atol=1e-7, name="d codebook")


def test_module_cross_entropy_loss_and_projection():
    torch.manual_seed(2)
    vq = SinkhornVectorQuantizer(16, 8, loss_q_type="ce", use_proj=True)
    x = torch.randn(3, 4, 8)
    _, loss, idx = vq(x)
    embed = vq.get_codebook()
    want = F.cross_entropy(-torch.cdist(x.reshape(-1, 8), embed), idx.reshape(-1))
    assert_close(loss, want, atol=1e-6, name="ce loss")
    loss.backward()
    assert vq.proj.weight.grad is not None and vq.proj.weight.grad.abs().sum() > 0


def test_module_utilisation_and_nearest_at_eval():
    # Data in one blob, codes spread wide: nearest neighbour uses few codes, Sinkhorn spreads.
    torch.manual_seed(3)
    vq = SinkhornVectorQuantizer(64, 4, nearest_at_eval=True)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.randn(64, 4) * 3)
    x = torch.randn(8, 64, 4) * 0.3 + 2.0
    _, _, idx, stats = vq(x, return_stats=True)
    counts = torch.bincount(idx.reshape(-1), minlength=64).double()
    p = counts / counts.sum()
    assert stats["utilization"].item() == (counts > 0).double().mean().item()
    assert_close(stats["perplexity"], torch.exp(-(p[p > 0] * p[p > 0].log()).sum()), atol=1e-9)
    vq.eval()
    _, _, idx_nn = vq(x)
    assert torch.equal(idx_nn.reshape(-1), torch.cdist(x.reshape(-1, 4), vq.embedding.weight).argmin(1))
    nn_stats = codebook_stats(idx_nn, 64)
    assert stats["utilization"] >= 2 * nn_stats["utilization"]
    assert stats["perplexity"] >= 2 * nn_stats["perplexity"]


# ---- torch.distributed -------------------------------------------------------------------

def _gloo_worker(rank, port, path, world):
    with gloo_group(rank, world, port):
        x, e = problem(2 * 37, 19, 6, seed=11, dtype=torch.float32)
        mine = x.chunk(world)[rank]
        idx, g = sinkhorn_assign(mine, e, chunk_size=5, return_potentials=True)
        guarded = sinkhorn_assign(mine, e, chunk_size=5, guard=1e-8)
        scores = F.normalize(x, dim=1) @ F.normalize(e, dim=1).t()
        q = balanced_assignment(scores.chunk(world)[rank], chunk_size=4)
        stats = codebook_stats(idx, 19)
        torch.save({"idx": idx, "g": g, "q": q, "guarded": guarded, "counts": stats["counts"]},
                   os.path.join(path, f"{rank}.pt"))


def test_distributed_gloo_matches_single_process():
    world = 2
    parts = run_on_gloo(_gloo_worker, world, world)
    x, e = problem(2 * 37, 19, 6, seed=11, dtype=torch.float32)
    idx, g = sinkhorn_assign(x, e, chunk_size=5, return_potentials=True, distributed=False)
    assert torch.equal(torch.cat([p["idx"] for p in parts]), idx)
    guarded = sinkhorn_assign(x, e, chunk_size=5, guard=1e-8, distributed=False)
    assert torch.equal(torch.cat([p["guarded"] for p in parts]), guarded)
    for p in parts:
        assert_close(p["g"], g, atol=1e-5, rtol=1e-5, name="g on a rank")
        assert torch.equal(p["counts"], torch.bincount(idx, minlength=19).double())
    scores = F.normalize(x, dim=1) @ F.normalize(e, dim=1).t()
    q = balanced_assignment(scores, chunk_size=4, distributed=False)
    assert_close(torch.cat([p["q"] for p in parts]), q, atol=1e-6, rtol=1e-5, name="Q")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_float32(dtype):
    x, e = problem(64, 16, 8, seed=2, dtype=dtype, near=False)
    idx, g = sinkhorn_assign(x, e, chunk_size=9, return_potentials=True)
    ref_idx, ref_g = sinkhorn_assign(x.float(), e.float(), chunk_size=9, return_potentials=True)
    assert g.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    assert_close(g, ref_g, atol=0, name="g")


def test_module_float64_computes_in_float64():
    """A float64 module on float64 inputs computes in float64 (it cast them to float32 and gave
    a float64 loss with float32's accuracy, about 1e-8 off)."""
    torch.manual_seed(0)
    vq = SinkhornVectorQuantizer(n_e=16, e_dim=4).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    out, loss, idx = vq(x)
    x_q = vq.embedding.weight[idx.view(-1)].view_as(x)
    want = ((x - x_q) ** 2).mean() * (1 + vq.beta)
    assert out.dtype == loss.dtype == torch.float64
    assert abs(loss.item() - want.item()) < 1e-15
    assert_close(out, x_q, atol=1e-15, name="straight-through output")


@pytest.mark.parametrize("loss", ["l2", "ce"])
def test_module_mixed_float32_float64(loss):
    """Input and codebook of different precisions compute in float64 (with "ce", cdist needs one
    dtype: a float32 module on float64 input raised there)."""
    torch.manual_seed(1)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    for vq, inp in ((SinkhornVectorQuantizer(16, 8, loss_q_type=loss), x),
                    (SinkhornVectorQuantizer(16, 8, loss_q_type=loss).double(), x.float())):
        out, loss_value, _ = vq(inp)
        assert out.dtype == loss_value.dtype == torch.float64
        assert torch.isfinite(loss_value)


def test_module_bad_sizes():
    for name, kwargs in (("num_head", {"num_head": 0}), ("num_head", {"num_head": -2}),
                         ("n_e", {"n_e": 0}), ("e_dim", {"e_dim": 2.0})):
        args = {"n_e": 16, "e_dim": 8, **kwargs}
        with pytest.raises(ValueError, match=f"SinkhornVectorQuantizer: expected {name} to be "
                                             "an int >= 1"):
            SinkhornVectorQuantizer(**args)
    np = pytest.importorskip("numpy")
    vq = SinkhornVectorQuantizer(np.int64(16), np.int64(8), num_head=np.int32(2))
    assert (vq.n_e, vq.e_dim, vq.num_head) == (16, 8, 2)
