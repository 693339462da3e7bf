"""Every CPU build of the kernels (baseline, AVX2, AVX-512) against the float64 reference. The
build is chosen once per process, so each runs in a subprocess with SINKHORN_CPU_ISA set."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cpu_flags() -> set:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FLAGS = _cpu_flags()
ISAS = [
    "default",
    pytest.param("avx2", marks=pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= FLAGS,
                                                  reason="no AVX2 with FMA and F16C")),
    pytest.param("avx512", marks=pytest.mark.skipif(
        not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= FLAGS, reason="no AVX-512")),
]

SCRIPT = r"""
import torch, sinkhorn_ops
from sinkhorn_ops.reference import sinkhorn_reference
torch.manual_seed(0)
cases = [((37, 4, 4), dict(steps=40, start="col")), ((5, 16, 16), dict(steps=9, tol=1e-4)),
         ((3, 33, 70), dict(steps=7)), ((1, 300, 257), dict(steps=4)), ((2, 17, 5), dict(steps=500, tol=1e-6))]
for shape, kw in cases:
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 2e-5), (torch.bfloat16, 3e-2)]:
        S = torch.randn(*shape, dtype=torch.float64) * 2
        S[..., 0, 0] = float("-inf")
        r = sinkhorn_ops.sinkhorn(S.to(dtype), return_potentials=True, **kw)
        steps = int(r.steps.max())
        ref = sinkhorn_reference(S, **dict(kw, steps=steps, tol=0.0))
        if kw.get("tol", 0) == 0 or dtype == torch.float64:
            ref = sinkhorn_reference(S, **kw)
            assert torch.equal(r.steps, ref[3]), (shape, dtype, r.steps, ref[3])
        err = (r.plan.double() - ref[0]).abs().max().item()
        assert err <= tol, (shape, kw, dtype, err)
# The unrolled backward's tiny paths: the scaling replay (40 x 16 and 9 x 256 history entries)
# and the log-domain one (3000 x 35 entries, over kScaledHistory), and the V4 mHC kernel.
for shape, kw in [((37, 4, 4), dict(steps=40, start="col")), ((5, 16, 16), dict(steps=9)),
                  ((3, 7, 5), dict(steps=3000))]:
    S = torch.randn(*shape, dtype=torch.float64) * 2
    W = torch.randn(*shape, dtype=torch.float64)
    ref = torch.autograd.grad((sinkhorn_reference(S.requires_grad_(True), **kw)[0] * W).sum(), S)[0]
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
        x = S.detach().to(dtype).requires_grad_(True)
        got = torch.autograd.grad((sinkhorn_ops.sinkhorn(x, **kw) * W.to(dtype)).sum(), x)[0]
        err = (got.double() - ref).abs().max().item() / ref.abs().max().item()
        assert err <= tol, ("backward", shape, dtype, err)
X = torch.randn(37, 4, 4, dtype=torch.float64) * 3
W = torch.randn_like(X)
def v4(t):
    c = torch.softmax(t, -1) + 1e-6
    c = c / (c.sum(-2, keepdim=True) + 1e-6)
    for _ in range(19):
        c = c / (c.sum(-1, keepdim=True) + 1e-6)
        c = c / (c.sum(-2, keepdim=True) + 1e-6)
    return c
ref = torch.autograd.grad((v4(X.requires_grad_(True)) * W).sum(), X)[0]
for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
    x = X.detach().to(dtype).requires_grad_(True)
    got = torch.autograd.grad((sinkhorn_ops.mhc_v4_sinkhorn(x) * W.to(dtype)).sum(), x)[0]
    err = (got.double() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= tol, ("v4", dtype, err)
# The mHC stream mixings (37 channels: whole SIMD vectors and a scalar tail).
x, y = torch.randn(7, 4, 37, dtype=torch.float64), torch.randn(7, 37, dtype=torch.float64)
hq, hr = torch.rand(7, 4, dtype=torch.float64), torch.rand(7, 4, 4, dtype=torch.float64)
W = torch.randn_like(x)
x.requires_grad_(True)
ref = (hr.unsqueeze(-1) * x.unsqueeze(-3)).sum(-2) + hq.unsqueeze(-1) * y.unsqueeze(-2)
want = torch.autograd.grad((ref * W).sum(), x)[0]
for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-5)]:
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xl = x.detach().to(dtype).requires_grad_(True)
    out = sinkhorn_ops.mhc_combine(xl, y.to(dtype), hq.to(acc), hr.to(acc))
    got = torch.autograd.grad((out * W.to(dtype)).sum(), xl)[0]
    assert (out.double() - ref).abs().max().item() <= tol * 10, ("mix", dtype)
    assert (got.double() - want).abs().max().item() <= tol * 10, ("mix grad", dtype)
# mHC's fused mappings (37 tokens: whole SIMD vectors of tokens and a tail), forward and the
# gradients of proj and of every weight, against the same formulas in PyTorch ops.
from sinkhorn_ops.mhc import mappings_composite
P = (torch.randn(37, 24, dtype=torch.float64) * 2).requires_grad_(True)
Wm = [torch.tensor(v, dtype=torch.float64) for v in (0.7, -0.4, 1.3)]
Wm = [w.double().requires_grad_(True)
      for w in Wm + [torch.randn(4), torch.randn(4), torch.randn(4, 4)]]
ref = mappings_composite(P, Wm, lambda r: sinkhorn_ops.sinkhorn(r, steps=40, start="col"))
ups = [torch.randn_like(r) for r in ref]
ref_g = torch.autograd.grad(ref, [P, *Wm], ups)
for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
    args = [t.detach().to(dtype).requires_grad_(True) for t in [P, *Wm]]
    out = sinkhorn_ops.mhc_mappings(*args)
    got_g = torch.autograd.grad(out, args, [u.to(dtype) for u in ups])
    for u, v in zip(list(out) + list(got_g), list(ref) + list(ref_g)):
        err = (u.double() - v).abs().max().item() / max(v.abs().max().item(), 1.0)
        assert err <= tol, ("mappings", dtype, err)
# The low-precision loads and stores (SIMD conversions in the AVX2 and AVX-512 builds): bit
# for bit torch's own rounding, specials included.
import sys
sys.path.insert(0, "tests")
from test_mhc_mix import assert_same_bits, low_precision_rounding_case
for dtype in (torch.bfloat16, torch.float16):
    x, h, want = low_precision_rounding_case(dtype, "cpu")
    assert_same_bits(sinkhorn_ops.mhc_branch_input(x, h), want)
print("ok")
"""


@pytest.mark.parametrize("isa", ISAS)
def test_cpu_build_matches_reference(isa):
    env = dict(os.environ, SINKHORN_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def test_unknown_isa_is_a_clear_error():
    env = dict(os.environ, SINKHORN_CPU_ISA="sse9")
    code = "import torch, sinkhorn_ops; sinkhorn_ops.sinkhorn(torch.randn(2, 3, 3))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "SINKHORN_CPU_ISA" in out.stderr and "sse9" in out.stderr
