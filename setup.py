"""Builds sinkhorn_ops._C against the installed torch.

CPU kernels always; CUDA kernels when torch is a CUDA build and nvcc is found.
Environment overrides: SINKHORN_FORCE_CUDA=1 (build CUDA even without a visible GPU, e.g. on a
build machine), SINKHORN_FORCE_CPU=1 (never build CUDA).
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _flag("SINKHORN_FORCE_CPU"):
        return False
    cuda_torch = torch.version.cuda is not None and CUDA_HOME is not None
    if _flag("SINKHORN_FORCE_CUDA"):
        if not cuda_torch:
            raise RuntimeError(
                "SINKHORN_FORCE_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME); "
                f"got torch {torch.__version__} (cuda={torch.version.cuda}), CUDA_HOME={CUDA_HOME}"
            )
        return True
    return cuda_torch


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions():
    sources = _sources("csrc/extension.cpp") + _sources("csrc/ops/*.cpp") + _sources("csrc/cpu/*.cpp")
    # -fno-trapping-math lets the vectoriser turn the -inf guards into selects. -fopenmp: ATen's
    # at::parallel_for is an OpenMP pragma in a header, serial in code compiled without it.
    cxx = ["-O3", "-fno-trapping-math", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    if _want_cuda():
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo", "-std=c++17"]
        kwargs["define_macros"] = [("WITH_CUDA", None)]
        return [CUDAExtension("sinkhorn_ops._C", sources, **kwargs)]
    return [CppExtension("sinkhorn_ops._C", sources, **kwargs)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
