"""Builds the emulated CUDA libraries of the tests: csrc/cuda compiled by the host compiler.

The kernels, their launchers and the ATen glue of csrc/cuda are compiled unchanged except for
mechanical rewrites of a copy under build/emu/<variant>/csrc (the host compiler cannot parse the
first two):

- ``kernel<<<config>>>(args)`` becomes ``::emu::launch(kernel, ::emu::Config(config))(args)``;
- ``extern __shared__ T name[];`` becomes a pointer to the block's emulated dynamic shared memory,
  and every other ``__shared__`` declaration is followed by a call that poisons the variable
  when a block first meets it;
- each kernel with ``__launch_bounds__(B)`` starts with a check that fails a launch of more
  than B threads, as a GPU would;
- sinkhorn_cuda.cpp registers its operators on the CPU key instead of the CUDA key, under the
  variant's namespace (VARIANTS), and its conjugate-gradient solver for CPU tensors.

tests/emu/include shadows the CUDA headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, CUB's
BlockReduce, c10/cuda) with the emulation of emu_runtime.h. ``load()`` builds (incrementally) and
loads a variant; after ``load("emu")``, ``torch.ops.sinkhorn_emu`` holds the same operators as
``torch.ops.sinkhorn_ops``, computed by the CUDA kernels on CPU tensors.
"""
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMU = os.path.join(ROOT, "tests", "emu")
OUT = os.path.join(ROOT, "build", "emu")
# The dispatcher-level C++ API, the schema and the C++ autograd registrations (all on the
# sinkhorn_ops namespace) belong to the real library only.
SKIPPED_OPS = {"sinkhorn_op.cpp", "mhc_api.cpp", "mhc_autograd.cpp", "sinkhorn_autograd.cpp",
               "rms_projection.cpp", "sinkhorn_warm.cpp"}
_EXTERN_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];")
_REGISTRATION = "TORCH_LIBRARY_IMPL(sinkhorn_ops, CUDA, m)"
# The implicit backward's CUDA conjugate gradients (implicit_cg.cu), registered for CPU tensors
# in emulation, so that the "replace" build's implicit backward runs the emulated kernel.
_CG_REGISTRATION = "register_cg_solver(c10::DeviceType::CUDA"


def _kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression (a name with optional template arguments) ending at end."""
    k = end
    if text[k - 1] == ">":
        depth = 0
        while True:
            k -= 1
            if text[k] == ">":
                depth += 1
            elif text[k] == "<":
                depth -= 1
                if depth == 0:
                    break
    while k > 0 and (text[k - 1].isalnum() or text[k - 1] in "_:"):
        k -= 1
    return k


def rewrite_launches(text: str) -> str:
    out, pos = [], 0
    while (i := text.find("<<<", pos)) >= 0:
        j = text.index(">>>", i)
        end = i
        while text[end - 1].isspace():
            end -= 1
        start = _kernel_start(text, end)
        if start == end:
            raise ValueError(f"no kernel name before <<< at offset {i}")
        out.append(text[pos:start])
        out.append(f"::emu::launch({text[start:end]}, ::emu::Config({text[i + 3:j]}))")
        pos = j + 3
    out.append(text[pos:])
    return "".join(out)


_STATIC_SHARED = re.compile(r"^(\s*)__shared__ ([^;]+);", re.M)
_DECLARATOR = re.compile(r"(\w+)\s*(?:\[[^\]]*\])*\s*$")


def _register_shared(match) -> str:
    """``__shared__ T a[4], b;`` -> the declaration, then a shared_variable call per name."""
    indent, decl = match.group(1), match.group(2)
    names = [_DECLARATOR.search(part).group(1) for part in decl.split(",")]
    calls = "".join(f" ::emu::shared_variable(&{x}, sizeof({x}));" for x in names)
    return f"{indent}__shared__ {decl};{calls}"


def rewrite_launch_bounds(text: str) -> str:
    """After ``__launch_bounds__(B) ... {``, a call that fails a launch of more than B threads
    (on a GPU, such a launch fails)."""
    out, pos = [], 0
    while (i := text.find("__launch_bounds__(", pos)) >= 0:
        k, depth, bound = i + len("__launch_bounds__("), 1, None
        start = k
        while depth:
            if text[k] == "(":
                depth += 1
            elif text[k] == ")":
                depth -= 1
            elif text[k] == "," and depth == 1 and bound is None:
                bound = text[start:k]
            k += 1
        bound = bound if bound is not None else text[start:k - 1]
        body = text.index("{", k) + 1
        out.append(text[pos:body] + f" ::emu::check_launch_bounds({bound.strip()});")
        pos = body
    out.append(text[pos:])
    return "".join(out)


def rewrite(text: str, name: str, namespace: str = "sinkhorn_emu") -> str:
    text = rewrite_launch_bounds(text)
    text = _EXTERN_SHARED.sub(
        r"\1* \2 = reinterpret_cast<\1*>(::emu::dynamic_shared());", text)
    text = _STATIC_SHARED.sub(_register_shared, text)
    text = rewrite_launches(text)
    if name == "sinkhorn_cuda.cpp":
        for marker in (_REGISTRATION, _CG_REGISTRATION):
            if marker not in text:
                raise ValueError(f"sinkhorn_cuda.cpp no longer contains {marker}")
        text = text.replace(_REGISTRATION, f"TORCH_LIBRARY_IMPL({namespace}, CPU, m)")
        text = text.replace(_CG_REGISTRATION, "register_cg_solver(c10::DeviceType::CPU")
    return text


def _write_if_changed(path: str, text: str) -> None:
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return  # keep the timestamp: ninja rebuilds only what changed
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


# The two builds: "emu" registers the CUDA glue as torch.ops.sinkhorn_emu beside the real
# library (the cases compare the two); "replace" registers it as torch.ops.sinkhorn_ops itself,
# with the schemas, the C++ API and the CPU-independent registrations of csrc/ops but without the
# CPU kernels, to be loaded instead of sinkhorn_ops._C (run_emulated.py), so that the package and
# its tests run on the CUDA kernels.
VARIANTS = {"emu": "sinkhorn_emu", "replace": "sinkhorn_ops"}


def mirror(variant: str = "emu") -> list:
    """Writes the rewritten copy of csrc under build/emu/<variant>/csrc; returns the sources to
    compile."""
    namespace = VARIANTS[variant]
    out = os.path.join(OUT, variant)
    sources = []
    for src in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True):
        if os.path.isdir(src):
            continue
        rel = os.path.relpath(src, os.path.join(ROOT, "csrc"))
        with open(src) as f:
            text = f.read()
        top = rel.split(os.sep)[0]
        name = os.path.basename(rel)
        if top == "cuda":
            text = rewrite(text, name, namespace)
        dst = os.path.join(out, "csrc", rel + (".cpp" if rel.endswith(".cu") else ""))
        _write_if_changed(dst, text)
        if (top == "cuda" and dst.endswith(".cpp")) or (top == "ops" and name.endswith(".cpp") and (
                variant == "replace" or name not in SKIPPED_OPS)):
            sources.append(dst)
    sources = sorted(sources) + [os.path.join(EMU, "emu_runtime.cpp")]
    return sources + ([os.path.join(EMU, "emu_library.cpp")] if variant == "emu" else [])


def load(variant: str = "emu", verbose: bool = False) -> None:
    """Builds (incrementally) and loads a variant (see VARIANTS): for "emu",
    torch.ops.sinkhorn_emu then has the operators.

    SINKHORN_EMU_FMA=1 builds it with fused multiply-adds (-ffp-contract=fast -mfma, in a build
    of its own): nvcc contracts a * b + c into one rounding by default, g++ in ISO C++ mode does
    not, so only this build rounds as the GPU does."""
    from torch.utils.cpp_extension import load as load_extension

    fma = os.environ.get("SINKHORN_EMU_FMA", "0") == "1"
    sources = mirror(variant)
    out = os.path.join(OUT, variant)
    build_dir = os.path.join(out, "obj-fma" if fma else "obj")
    os.makedirs(build_dir, exist_ok=True)
    load_extension(
        name=f"sinkhorn_{variant}_emulated" + ("_fma" if fma else ""),
        sources=sources,
        extra_include_paths=[os.path.join(EMU, "include"), os.path.join(out, "csrc")],
        extra_cflags=["-O1", "-Wno-unused-function", "-Wno-unknown-pragmas"]
        + (["-ffp-contract=fast", "-mfma"] if fma else []),
        build_directory=build_dir,
        is_python_module=False,
        verbose=verbose,
    )


if __name__ == "__main__":
    load(sys.argv[1] if len(sys.argv) > 1 else "emu", verbose=True)
