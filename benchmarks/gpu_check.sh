#!/usr/bin/env bash
# One-shot check on a lent GPU machine (H100/H200, CUDA torch preinstalled, no network): build in
# place, CUDA tests, compute-sanitizer memcheck and racecheck, the forward, backward, attention,
# mHC and large-OT benchmarks (the last with the fused iterations and without). Every step runs
# even when an earlier one failed; its exit code and time go to $OUT/summary.txt.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh      # the device runner sets OUT
#
# Step time limits (seconds) can be overridden: T_BUILD, T_TESTS, T_SANITIZER (memcheck),
# T_RACECHECK, T_BENCH, T_BENCH_BACKWARD, T_BENCH_ATTENTION, T_BENCH_MHC, T_BENCH_LARGE,
# T_BENCH_UNFUSED.
# The defaults add up to 565 s, under the device runner's 600 s per command with room for the
# set-up (a step that hits its limit gets 10 s more to die). $OUT keeps at most 8 files:
# env.txt build.log tests.log sanitizer.log bench.log summary.txt, the rest packed in extra.tar.gz.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
SANITIZER="$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

# step NAME LOG LIMIT CMD...: runs CMD with output appended to LOG, records "NAME rc=.. ..s".
step() {
  local name=$1 log=$2 limit=$3 start=$SECONDS rc
  shift 3
  echo "### $name: $*" >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && echo "### $name: timed out after ${limit}s" >>"$log"
  echo "$name rc=$rc $((SECONDS - start))s" >>"$SUMMARY"
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo none)"
  echo "git status (short):"
  git status --short 2>/dev/null | head -40
  python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  "$CUDA_HOME/bin/nvcc" --version | tail -2
  nvidia-smi
} >"$OUT/env.txt" 2>&1

step build "$OUT/build.log" "${T_BUILD:-180}" \
  env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 SINKHORN_FORCE_CUDA=1 \
  python -m pip install --no-build-isolation -e . -v
step tests "$OUT/tests.log" "${T_TESTS:-110}" \
  python -m pytest tests -x -q -k "cuda and not emulated" -p no:cacheprovider
# --error-exitcode: a reported hazard fails the step even though the script itself exits 0.
# No caching allocator under memcheck, so that an overrun of one tensor is not hidden inside a
# larger cached block.
step memcheck "$OUT/sanitizer.log" "${T_SANITIZER:-45}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
  "$SANITIZER" --tool memcheck --error-exitcode 1 python benchmarks/sanitizer_case.py
step racecheck "$OUT/sanitizer.log" "${T_RACECHECK:-40}" \
  "$SANITIZER" --tool racecheck --error-exitcode 1 python benchmarks/sanitizer_case.py
step bench "$OUT/bench.log" "${T_BENCH:-45}" \
  python benchmarks/bench_forward.py --device cuda --out "$OUT"
step bench_backward "$OUT/bench.log" "${T_BENCH_BACKWARD:-30}" \
  python benchmarks/bench_backward.py --device cuda --quick --out "$OUT"
step bench_attention "$OUT/bench.log" "${T_BENCH_ATTENTION:-20}" \
  python benchmarks/bench_attention.py --device cuda --quick --out "$OUT"
step bench_mhc "$OUT/bench.log" "${T_BENCH_MHC:-30}" \
  python benchmarks/bench_mhc.py --device cuda --quick --out "$OUT"
step bench_large "$OUT/bench.log" "${T_BENCH_LARGE:-45}" \
  python benchmarks/bench_large_ot.py --device cuda --out "$OUT"
step bench_unfused "$OUT/bench.log" "${T_BENCH_UNFUSED:-20}" env SINKHORN_CUDA_FUSED=0 \
  python benchmarks/bench_large_ot.py --device cuda --sizes 8192 --no-pot --out "$OUT"

# The runner returns at most 8 files: pack anything beyond the expected set into one archive.
files=$(find "$OUT" -type f | wc -l)
if [ "$files" -gt 8 ]; then
  (cd "$OUT" && find . -type f ! -name env.txt ! -name build.log ! -name tests.log \
    ! -name sanitizer.log ! -name bench.log ! -name summary.txt -print0 |
    tar --null --remove-files -czf extra.tar.gz -T - && find . -type d -empty -delete)
  echo "packed $((files - 6)) extra files into extra.tar.gz" >>"$SUMMARY"
fi
cat "$SUMMARY"
