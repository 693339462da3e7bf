#!/usr/bin/env bash
# Builds the CUDA extension on this machine (no GPU needed) for the device machines' Python and
# torch, into .prebuilt/ (ignored; carry it with the device call). benchmarks/gpu_check.sh there
# then skips its build, about two minutes of a fifteen-minute lease, when the stamp
# (benchmarks/device_stamp.py: the sources, torch, Python, the architectures) is the same there.
# The extension is also built by another compiler than the device image's, which is one of the
# two differences left for the crash on C++ ValueErrors seen there (README, GPU results).
#
#   bash benchmarks/device_prebuild.sh      # about 20-30 minutes on 2 cores
#
# VENV (default /tmp/dev312): a Python 3.12 environment with TORCH_SPEC (default torch==2.11.0,
# the device image's 2.11.0+cu130), created when missing from PY312 (default python3.12).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-/tmp/dev312}"
# torch would take CUDA_HOME from the nvcc on PATH (/usr/local/bin here: no headers under it).
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PY312:-python3.12}" -m venv "$VENV"
  "$VENV/bin/pip" install -q "${TORCH_SPEC:-torch==2.11.0}" numpy setuptools ninja
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The files the device copy gets (tracked, and untracked but not ignored), as they are now: the
# stamp is taken from this copy, so edits made during the build cannot be stamped as built.
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$work"
stamp="$(cd "$work" && TORCH_CUDA_ARCH_LIST=9.0 "$VENV/bin/python" benchmarks/device_stamp.py)"
source_of="commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- csrc setup.py ||
  echo ' with uncommitted changes to csrc or setup.py')"
(cd "$work" && MAX_JOBS="${MAX_JOBS:-2}" TORCH_CUDA_ARCH_LIST=9.0 SINKHORN_FORCE_CUDA=1 \
  "$VENV/bin/python" setup.py build_ext --inplace >"$work/build.log" 2>&1) ||
  { grep -E -m 40 "error|Error" "$work/build.log"; tail -15 "$work/build.log"; exit 1; }
rm -rf .prebuilt && mkdir -p .prebuilt
# -g comes from Python's flags: stripped (110 to 56 MB) and compressed (17 MB), as the carry
# holds 64 MiB in all.
for so in "$work"/sinkhorn_ops/_C*.so; do
  strip --strip-unneeded "$so"
  gzip -c "$so" >".prebuilt/$(basename "$so").gz"
done
echo "$stamp" >.prebuilt/stamp
{
  echo "built $(date -u +%FT%TZ) from the sources of $source_of"
  echo "stamp: $stamp"
  c++ --version | head -1
  nvcc --version | tail -1
} >.prebuilt/build_info.txt
cat .prebuilt/build_info.txt
ls -l .prebuilt/
