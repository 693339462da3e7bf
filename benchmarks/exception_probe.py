"""Which C++ exceptions kill the process, and on which path (the H200 run of 2026-11-28: every
c10::ValueError that the operator's front door threw, CPU or CUDA, ended in a segmentation
fault inside torch's redispatch, under torch 2.11.0+cu130 with the extension built there by
/opt/gcc's g++; every c10::TypeError from the same function reached Python as a TypeError).

Each case runs in a fresh interpreter, so one crash cannot hide the next; the table says, per
case, whether Python saw the expected exception or how the process ended.

    python benchmarks/exception_probe.py [--inline]    # --inline also compiles a one-op
                                                      # extension (load_inline, ~1 min)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = "import torch, sinkhorn_ops\n"

# name -> (code run after PRELUDE, the exception type expected to reach Python)
CASES = {
    # The crashing test's call: a C++ ValueError from the forward's front door, through the
    # operator's autograd kernel (the H200 crash went through the Python registration,
    # torch.library.register_autograd, and its redispatch; the autograd is in C++ since,
    # csrc/ops/sinkhorn_autograd.cpp).
    "value_via_autograd": ("sinkhorn_ops.sinkhorn(torch.randn(3))", "ValueError"),
    # The same throw site's TypeError (passed on the GPU machine).
    "type_via_autograd": (
        "sinkhorn_ops.sinkhorn(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.float64),"
        " torch.ones(2, 4))", "TypeError"),
    # A TypeError first, then the ValueError: does only the first C++ exception crash?
    "type_then_value": (
        "try:\n    sinkhorn_ops.sinkhorn(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.float64),"
        " torch.ones(2, 4))\nexcept TypeError:\n    pass\nsinkhorn_ops.sinkhorn(torch.randn(3))",
        "ValueError"),
    # The crashing path itself: Python's OpOverload.redispatch to the CPU kernel, as the Python
    # autograd registration did.
    "value_via_python_redispatch": (
        "torch.ops.sinkhorn_ops.sinkhorn.default.redispatch("
        "torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), torch.randn(3), None, None, None, 3,"
        " 'row', 0.0, 'unrolled', 1e-6, 100)", "ValueError"),
    # The op below the autograd key: no autograd kernel in between.
    "value_below_autograd": (
        "with torch._C._AutoDispatchBelowAutograd():\n"
        "    torch.ops.sinkhorn_ops.sinkhorn.default(torch.randn(3), None, None, None, 3, 'row',"
        " 0.0, 'unrolled', 1e-6, 100)", "ValueError"),
    # Another op's C++ front door (mHC, csrc/ops/mhc_v4.cpp), called directly.
    "value_mhc_op": ("torch.ops.sinkhorn_ops.mhc_v4_sinkhorn.default(torch.randn(4, 4), 0, 1e-6)",
                     "ValueError"),
    # With C++ stack traces in the message (what() takes another path).
    "value_with_cpp_stacktrace": ("sinkhorn_ops.sinkhorn(torch.randn(3))", "ValueError"),
}

INLINE = r'''
import torch
from torch.utils.cpp_extension import load_inline
src = """
#include <torch/library.h>
at::Tensor throw_value(const at::Tensor& x) { TORCH_CHECK_VALUE(x.dim() > 5, "probe: value"); return x; }
at::Tensor throw_type(const at::Tensor& x) { TORCH_CHECK_TYPE(x.dim() > 5, "probe: type"); return x; }
TORCH_LIBRARY(exc_probe, m) {
  m.def("throw_value(Tensor x) -> Tensor", &throw_value);
  m.def("throw_type(Tensor x) -> Tensor", &throw_type);
}
"""
load_inline("exc_probe", cpp_sources=src, is_python_module=False, verbose=False,
            extra_cflags=FLAGS)
for name, exc in (("throw_type", TypeError), ("throw_value", ValueError)):
    try:
        getattr(torch.ops.exc_probe, name)(torch.randn(2))
    except exc as e:
        print(name, "raised", type(e).__name__, flush=True)
'''


def run_case(code: str, env: dict, timeout: float = 120) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc.returncode, (proc.stdout + proc.stderr)


def outcome(rc: int, out: str, expected: str) -> str:
    if rc < 0 or rc >= 128 or "Fatal Python error" in out:
        return f"CRASH (rc={rc})"
    lines = [line for line in out.strip().splitlines() if line.strip()]
    raised = [line for line in lines if line.startswith(expected + ":")]
    if raised:  # the message can be followed by a C++ stack trace
        return f"ok: {raised[0][:90]}"
    return f"rc={rc}: {(lines[-1] if lines else '')[:90]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inline", action="store_true",
                        help="also compile and probe a one-op extension (load_inline)")
    args = parser.parse_args()
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    crashed = 0
    for name, (code, expected) in CASES.items():
        case_env = dict(env)
        if name == "value_with_cpp_stacktrace":
            case_env["TORCH_SHOW_CPP_STACKTRACES"] = "1"
        rc, out = run_case(PRELUDE + code, case_env)
        result = outcome(rc, out, expected)
        crashed += not result.startswith("ok")
        print(f"{name:28s} {result}", flush=True)
        if not result.startswith("ok"):
            print(textwrap.indent("\n".join(out.splitlines()[:12]), "    "), flush=True)
    if args.inline:
        # The extension's own flags (setup.py) and none: does a minimal op crash the same way?
        for label, flags in (("inline_plain", []),
                             ("inline_our_flags", ["-O3", "-fno-trapping-math", "-fopenmp"])):
            code = f"FLAGS = {flags!r}\n" + INLINE
            rc, out = run_case(code, env, timeout=300)
            ok = out.count(" raised ") == 2
            print(f"{label:28s} {'ok' if ok else f'CRASH (rc={rc})' if rc else 'rc=0'}: "
                  f"{' | '.join(out.strip().splitlines()[-2:])[:150]}", flush=True)
            crashed += not ok
    print(f"exception_probe: {crashed} case(s) did not raise as expected")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
