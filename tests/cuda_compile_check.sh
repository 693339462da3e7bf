#!/usr/bin/env bash
# Compile check of the CUDA sources on a machine without a GPU: every csrc/cuda/*.cu is built
# with nvcc for sm_90 (warnings are errors), every csrc/cuda/*.cpp is syntax-checked with g++
# against the installed (CPU) torch headers. Run from anywhere; exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="${NVCC:-$CUDA_HOME/bin/nvcc}"
PYTHON="${PYTHON:-python}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# The defines that torch.utils.cpp_extension passes to nvcc, so that code relying on the implicit
# half/bfloat16 conversions fails here as it would in the real build.
TORCH_NVCC_DEFINES=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
                    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)

mapfile -t TORCH_INC < <("$PYTHON" -c \
  'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()[:2]))')
# -isystem: warnings in torch's own headers are not ours to fix (with -std=c++17 torch 2.13 warns
# about C++20 extensions). C10_CUDA_NO_CMAKE_CONFIGURE_FILE: a CPU wheel lacks the generated
# c10/cuda/impl/cuda_cmake_macros.h, whose one macro only matters for Windows DLL exports.
GXX_FLAGS=(-std=c++17 -fsyntax-only -Wall -Wextra -Werror -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
           -I "$ROOT/csrc" -isystem "${TORCH_INC[0]}" -isystem "${TORCH_INC[1]}"
           -isystem "$CUDA_HOME/include")

count=0
shopt -s nullglob
for src in "$ROOT"/csrc/cuda/*.cu; do
  "$NVCC" -std=c++17 -gencode arch=compute_90,code=sm_90 -I "$ROOT/csrc" \
    "${TORCH_NVCC_DEFINES[@]}" --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
    -c "$src" -o "$TMP/$(basename "$src").o"
  echo "nvcc OK: ${src#"$ROOT"/}"
  count=$((count + 1))
done
for src in "$ROOT"/csrc/cuda/*.cpp; do
  g++ "${GXX_FLAGS[@]}" "$src"
  echo "g++ -fsyntax-only OK: ${src#"$ROOT"/}"
  count=$((count + 1))
done
if [ "$count" -eq 0 ]; then
  echo "cuda compile check: no sources found under csrc/cuda" >&2
  exit 1
fi
echo "cuda compile check: $count files OK"
