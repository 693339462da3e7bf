"""The CUDA kernels of csrc/cuda, run on the CPU by the emulation in tests/emu: against the CPU
operator on every path (tiny, block with and without shared-memory staging, large and its fused
iterations, composite backward, the mHC kernels), every dtype, and the environment switches that
force a path; then the package's whole CPU test suite with the CUDA kernels in place of the CPU
ones. This is what checks the CUDA code on a machine without a GPU; it does not replace a GPU run
(no races within a barrier interval beyond two thread orders, no timing, no out-of-bounds
detection).

The two emulated libraries build once (about a minute each on two cores) into build/emu.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, load_ops

load_ops()
sys.path.insert(0, str(ROOT / "tests" / "emu"))
import build  # noqa: E402
import cases  # noqa: E402

build.load()

CASE_IDS = [name for name, _, _ in cases.CASES]


@pytest.mark.parametrize("name", CASE_IDS)
def test_emulated_kernel_matches_the_cpu_operator(name):
    _, fn, kw = cases.CASES[CASE_IDS.index(name)]
    fn(**kw)


def _run_emulation_script(script, args, env_vars, timeout):
    """Runs tests/emu/<script> with args in a subprocess, env_vars added to its environment (the
    switches are read once per process) and the checkout on its PYTHONPATH."""
    env = dict(os.environ, **env_vars)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(ROOT / "tests" / "emu" / script), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# A subprocess per variant, each running the cases whose name contains the filter.
VARIANTS = {
    "forced-block": ({"SINKHORN_CUDA_FORWARD": "block", "SINKHORN_CUDA_BACKWARD": "block"}, ""),
    "forced-large": ({"SINKHORN_CUDA_FORWARD": "large", "SINKHORN_CUDA_BACKWARD": "composite"},
                     "wd-"),
    "forced-large-fused": ({"SINKHORN_CUDA_FORWARD": "large", "SINKHORN_CUDA_FUSED": "1"},
                           "fwd-"),
    # The large path's steps in one cooperative kernel (large_loop.cuh) for every forward case,
    # not only those with tol; and the host loop for those with tol.
    "forced-large-device-loop": ({"SINKHORN_CUDA_FORWARD": "large", "SINKHORN_CUDA_LOOP": "device"},
                                 "fwd-"),
    "forced-large-host-loop": ({"SINKHORN_CUDA_FORWARD": "large", "SINKHORN_CUDA_LOOP": "host"},
                               "tol"),
    # The device loop's shared-memory reuse between work blocks shows in the reverse order only.
    "forced-large-device-loop-reverse": ({"SINKHORN_CUDA_FORWARD": "large",
                                          "SINKHORN_CUDA_LOOP": "device",
                                          "SINKHORN_EMU_ORDER": "reverse"}, "fwd-"),
    # Every cooperative launch fails (as one may on a busy GPU): the host loop stands in.
    "cooperative-launch-fails": ({"SINKHORN_CUDA_FORWARD": "large",
                                  "SINKHORN_EMU_COOPERATIVE": "fail"}, "tol"),
    "no-staging": ({"SINKHORN_CUDA_SMEM": "0"}, "block"),
    "reverse-thread-order": ({"SINKHORN_EMU_ORDER": "reverse"}, ""),
    # The tiny and mHC backwards' histories in local arrays instead of shared memory.
    "local-history": ({"SINKHORN_CUDA_HISTORY": "local"}, ""),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_emulated_kernels_under_the_path_switches(variant):
    env_vars, pattern = VARIANTS[variant]
    out = _run_emulation_script("cases.py", [pattern], env_vars, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert " cases passed" in out.stdout


def test_a_forced_device_loop_reports_a_failed_launch():
    # SINKHORN_CUDA_LOOP=device must not fall back to the host loop: the op raises the error.
    env_vars = {"SINKHORN_CUDA_LOOP": "device", "SINKHORN_EMU_COOPERATIVE": "fail"}
    out = _run_emulation_script("cases.py", ["fwd-natural-large-1030"], env_vars, timeout=300)
    assert out.returncode != 0
    assert "CUDA error (emulated): code 720" in out.stdout, out.stdout[-2000:]


def test_the_package_test_suite_on_the_emulated_cuda_kernels():
    """Every CPU test of the package (this file aside), with sinkhorn_ops' operators computed by
    the emulated CUDA kernels instead of the CPU kernels (tests/emu/run_emulated.py): the CUDA
    paths against the float64 reference, autograd, torch.compile, DDP, bad inputs, the layers."""
    out = _run_emulation_script(
        "run_emulated.py",
        [str(ROOT / "tests"), "-q", "-p", "no:cacheprovider",
         f"--ignore={ROOT / 'tests' / 'test_cuda_emulated.py'}"], {}, timeout=2400)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout


def _host_has_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " fma " in f" {line} " for line in f)
    except OSError:
        return False


@pytest.mark.skipif(not _host_has_fma(), reason="the host CPU has no FMA instructions")
def test_the_kernel_suites_with_fused_multiply_adds():
    """nvcc contracts a * b + c into a fused multiply-add by default, with one rounding where the
    host build has two: the forward, backward and mHC suites again, on kernels built with
    -ffp-contract=fast -mfma (tests/emu/build.py, SINKHORN_EMU_FMA=1), so that their tolerances
    hold for the GPU's rounding too."""
    suites = ["test_forward.py", "test_backward.py", "test_mhc_v4.py", "test_mhc_paper_kernel.py",
              "test_mhc_mix.py"]
    args = [*(str(ROOT / "tests" / s) for s in suites), "-q", "-p", "no:cacheprovider"]
    out = _run_emulation_script("run_emulated.py", args, {"SINKHORN_EMU_FMA": "1"}, timeout=2400)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout


def test_the_emulation_runs_shuffles_votes_and_barriers():
    got = torch.ops.sinkhorn_emu.emu_selftest("shuffle")
    t = torch.arange(128) % 64  # two blocks of 64 threads
    want = (t ^ 1).float() + torch.where(t >= 32, 1000.0, 0.0)  # thread 37's warp voted
    assert torch.equal(got, want)
    got = torch.ops.sinkhorn_emu.emu_selftest("barrier")[:64]
    assert torch.equal(got, torch.arange(63, -1, -1).float())


def test_the_emulation_runs_cooperative_grids():
    # Block b read block b + 1's writes after a grid barrier and kept its own shared memory.
    got = torch.ops.sinkhorn_emu.emu_selftest("grid")
    t, b = torch.arange(128) % 32, torch.arange(128) // 32
    assert torch.equal(got, (t + 100 * b + t).float())


@pytest.mark.parametrize("what,message", [
    ("deadlock", "deadlock"),
    ("partial_mask", "mask does not name exactly the warp's threads"),
    ("exited_lane", "lanes that exited"),
    ("shared_limit", "65536 bytes of dynamic shared memory, 49152 allowed"),
    ("block_limit", "block of 2048 threads"),
    ("throw", "thrown by thread 3"),
    ("grid_not_cooperative", "grid sync in a kernel not launched cooperatively"),
    ("grid_exited", "grid sync that exited threads never reach"),
    ("grid_limit", "cooperative grid of 1000 blocks"),
])
def test_the_emulation_rejects_what_a_gpu_rejects(what, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.sinkhorn_emu.emu_selftest(what)
    # The emulation is usable again after the failed launch.
    assert torch.ops.sinkhorn_emu.emu_selftest("barrier")[0].item() == 63


def test_launch_rewrite():
    text = ("  k<T, 4><<<grid, 32, 0, s>>>(p);\n  ker\n      <<<g, b>>>(q);\n"
            "  extern __shared__ __align__(16) unsigned char buf[];")
    out = build.rewrite(text, "x.cu")
    assert "::emu::launch(k<T, 4>, ::emu::Config(grid, 32, 0, s))(p);" in out
    assert "::emu::launch(ker, ::emu::Config(g, b))(q);" in out
    assert "unsigned char* buf = reinterpret_cast<unsigned char*>(::emu::dynamic_shared());" in out
    out = build.rewrite("__global__ void __launch_bounds__(f(4), 2) k(int p) {\n  x;", "x.cu")
    assert out == ("__global__ void __launch_bounds__(f(4), 2) k(int p) {"
                   " ::emu::check_launch_bounds(f(4));\n  x;")
    out = build.rewrite("  __shared__ float a[4], b;\n", "x.cu")
    assert out == ("  __shared__ float a[4], b; ::emu::shared_variable(&a, sizeof(a));"
                   " ::emu::shared_variable(&b, sizeof(b));\n")
