"""Runs pytest with the package's operators computed by the emulated CUDA kernels.

    python tests/emu/run_emulated.py [pytest arguments]

Builds (incrementally) the "replace" variant of build.py, which registers csrc/cuda's glue and
kernels as torch.ops.sinkhorn_ops on the CPU key, loads it in place of sinkhorn_ops._C (the CPU
kernels), and runs pytest: every CPU test of the package then checks the CUDA kernels against the
float64 reference with the suite's own tolerances.
"""
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import build  # noqa: E402

# Module level, so that the processes a test spawns (they import this file as __mp_main__) run
# the emulated kernels too.
build.load("replace")
# sinkhorn_ops/__init__.py imports ._C only to load the operators, which are now registered.
sys.modules["sinkhorn_ops._C"] = types.ModuleType("sinkhorn_ops._C")

if __name__ == "__main__":
    import pytest

    sys.exit(pytest.main(sys.argv[1:]))
