"""What the compiler says of every CUDA kernel, with no GPU needed: ptxas's registers, spill bytes,
stack frame and static shared memory per kernel for sm_90, and the warps an SM can hold within
its 64K registers (the register limit on occupancy; shared memory and the block size may limit it
further). A register count or a spill is a fact about the build, not a GPU measurement: this is
how a session without a GPU checks that a change kept a kernel's arrays in registers.

Usage: python benchmarks/kernel_report.py [--out DIR] [--jobs N] [--filter TEXT]
Writes kernels_sm90.md and kernels_sm90.csv under --out (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench_util import git_commit

ROOT = Path(__file__).resolve().parent.parent
DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_\d+'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def nvcc() -> str:
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    found = shutil.which("nvcc") or str(Path(cuda) / "bin" / "nvcc")
    return os.environ.get("NVCC", found)


def ptxas_lines(src: Path, tmp: str) -> str:
    cmd = [nvcc(), "-std=c++17", "-gencode", "arch=compute_90,code=sm_90", "-I",
           str(ROOT / "csrc"), *DEFINES, "-Xptxas", "-v", "-c", str(src), "-o",
           os.path.join(tmp, src.name + ".o")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"kernel_report: nvcc failed on {src.name}:\n{done.stderr[-2000:]}")
    return done.stderr


def parse(source: str, text: str) -> list[dict]:
    """One row per kernel entry in ptxas -v output (entries, then their properties)."""
    rows, current = [], None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = dict(source=source, mangled=m.group(1), stack=0, spill_stores=0,
                           spill_loads=0)
            rows.append(current)
        elif current and (m := _FRAME.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        elif current and (m := _USED.search(line)):
            current.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return [r for r in rows if "registers" in r]


def demangle(names: list[str]) -> list[str]:
    if not shutil.which("c++filt"):
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines()


def register_warps(registers: int) -> int:
    """Warps an SM holds within its register file: a warp's registers come in units of 256
    (8 a thread)."""
    per_warp = -(-registers // 8) * 8 * 32
    return min(MAX_WARPS_PER_SM, REGISTERS_PER_SM // per_warp)


def short(name: str) -> str:
    """The kernel's name and template arguments, without namespaces and parameters."""
    name = re.sub(r"\(anonymous namespace\)::|sinkhorn::|large::|dev::", "", name)
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # the parameter list starts at the first '(' outside <>
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    return name[:cut].removeprefix("void ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--filter", default="", help="keep kernels whose name contains this")
    args = ap.parse_args()
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    with tempfile.TemporaryDirectory() as tmp, \
            concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        outputs = list(pool.map(lambda s: ptxas_lines(s, tmp), sources))
    rows = [r for src, text in zip(sources, outputs) for r in parse(src.name, text)]
    for r, name in zip(rows, demangle([r["mangled"] for r in rows])):
        r["kernel"] = short(name)
        r["warps_per_sm"] = register_warps(r["registers"])
    rows = [r for r in rows if args.filter in r["kernel"]]
    rows.sort(key=lambda r: (r["source"], r["kernel"]))
    fields = ["source", "kernel", "registers", "warps_per_sm", "spill_stores", "spill_loads",
              "stack", "smem"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "kernels_sm90.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    version = subprocess.run([nvcc(), "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release [^\n]*", version)
    lines = ["# CUDA kernels: registers and spills (ptxas, sm_90)", "",
             f"- **commit**: `{git_commit()}`",
             f"- **nvcc**: `{release.group(0) if release else 'unknown'}`",
             "- **command**: `python benchmarks/kernel_report.py`",
             "- compiler output only, no GPU: warps/SM is the register file's limit (64K "
             "registers, at most 64 warps); shared memory and block size can lower it", "",
             "| source | kernel | registers | warps/SM (registers) | spill stores B | "
             "spill loads B | stack B | static smem B |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['source']} | `{r['kernel']}` | {r['registers']} | "
                     f"{r['warps_per_sm']} | {r['spill_stores']} | {r['spill_loads']} | "
                     f"{r['stack']} | {r['smem']} |")
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    lines += ["", f"{len(rows)} kernels; {len(spilled)} spill registers to local memory."]
    (out / "kernels_sm90.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))
    print(f"wrote {out / 'kernels_sm90.md'}")


if __name__ == "__main__":
    main()
