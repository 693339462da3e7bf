#!/usr/bin/env bash
# One-shot check on a lent GPU machine (H100/H200, CUDA torch preinstalled, no network): build in
# place (or take the extension benchmarks/device_prebuild.sh built for these sources), the crash
# probe, CUDA tests, compute-sanitizer memcheck and racecheck, the profile, the
# mHC and large-OT benchmarks (large OT without the fused iterations and with them), the forward,
# backward and attention benchmarks. Every step runs even when an earlier one failed (except
# after a failed build); its exit code and time go to $OUT/summary.txt.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh      # the device runner sets OUT
#   PART=bench bash benchmarks/gpu_check.sh        # then, on the same machine: the benchmarks
#
# Step time limits (seconds) can be overridden: T_BUILD, T_CRASH_PROBE, T_EXCEPTION_PROBE,
# T_TESTS, T_GRAPHS, T_SANITIZER (memcheck), T_RACECHECK, T_PROFILE, T_BENCH_MHC,
# T_BENCH_MHC_MIX, T_BENCH_LARGE,
# T_BENCH, T_BENCH_FUSED, T_PROFILE_FUSED, T_BENCH_HOSTLOOP, T_BENCH_BACKWARD,
# T_BENCH_ATTENTION, T_BENCH_SECOND_ORDER. Steps run in order of importance (their limits add up to more than the
# deadline: on the first H100 run most
# steps ended well inside theirs, and the last ones are the first to go), and no step runs past
# DEADLINE seconds
# (default 570) after the script's start: a step gets the smaller of its limit and what is left,
# so the whole script ends under the device runner's 600 s per command, whatever the build
# takes. $OUT keeps at most 8 files: env.txt build.log tests.log failures.log sanitizer.log
# bench.log summary.txt, the rest packed in extra.tar.gz.
#
# POT is not installed on the device machines and has no wheel for their Python there; where
# .pot/ (ignored; built by benchmarks/make_pot_shim.sh, carried with the call) holds POT's
# pure-Python sources, the benchmarks import it from there (its compiled modules stubbed:
# sinkhorn_log, the function compared against, uses none of them).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
SANITIZER="$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

DEADLINE="${DEADLINE:-570}"
# The device image's Python is python3; the steps below (and the tests' subprocesses) say python.
if ! command -v python >/dev/null; then
  mkdir -p /tmp/gpu_check_bin && ln -sf "$(command -v python3)" /tmp/gpu_check_bin/python
  export PATH="/tmp/gpu_check_bin:$PATH"
fi
if [ -d .pot/ot ]; then
  export PYTHONPATH="$PWD/.pot${PYTHONPATH:+:$PYTHONPATH}"
fi

# step NAME LOG LIMIT CMD...: runs CMD with output appended to LOG, records "NAME rc=.. ..s".
# The limit shrinks to what is left before DEADLINE (less 15 s for the kill and the packing).
# PART=bench: a second call on the same warm machine, when the first ran out of time before the
# benchmarks (the probes, tests, sanitizers and profiles fill most of a call): the build (a no-op
# there: the build folder is kept between calls; the prebuilt extension again when the first call
# took it, as it then left no build folder) and the bench_* steps only.
PART="${PART:-all}"
step() {
  local name=$1 log=$2 limit=$3 start=$SECONDS rc left
  shift 3
  if [ "$PART" = bench ] && [[ ! "$name" =~ ^(build|bench) ]]; then
    echo "$name skipped: PART=bench" >>"$SUMMARY"
    return
  fi
  left=$((DEADLINE - SECONDS - 15))
  if [ "$left" -lt 5 ]; then
    echo "$name skipped: no time left before the ${DEADLINE}s deadline" >>"$SUMMARY"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "### $name (limit ${limit}s): $*" >>"$log"
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && echo "### $name: timed out after ${limit}s" >>"$log"
  echo "$name rc=$rc $((SECONDS - start))s (limit ${limit}s)" >>"$SUMMARY"
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo none)"
  echo "git status (short):"
  git status --short 2>/dev/null | head -40
  python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  python -c 'import ot; print("POT", ot.__version__, "from", ot.__file__)' 2>&1 | tail -1
  python -c 'import sys; print("python", sys.version.split()[0])'
  "$CUDA_HOME/bin/nvcc" --version | tail -2
  nvidia-smi
} >"$OUT/env.txt" 2>&1

# An extension prebuilt for exactly these sources, this torch and this Python
# (benchmarks/device_prebuild.sh; .prebuilt/ carried with the call) takes the build's place when
# it imports; otherwise the build runs here.
prebuilt=""
unpack_prebuilt() {
  local gz
  for gz in .prebuilt/_C*.so.gz; do
    [ -f "$gz" ] && gunzip -c "$gz" >"sinkhorn_ops/$(basename "${gz%.gz}")" || return 1
  done
}
if [ -f .prebuilt/stamp ]; then
  here="$(TORCH_CUDA_ARCH_LIST=9.0 python benchmarks/device_stamp.py 2>>"$OUT/build.log")"
  {
    echo "### prebuilt: $(cat .prebuilt/stamp)"
    echo "### here:     $here"
    cat .prebuilt/build_info.txt 2>/dev/null
  } >>"$OUT/build.log"
  if [ "$here" = "$(cat .prebuilt/stamp)" ] && unpack_prebuilt &&
    python -c "import torch, sinkhorn_ops as so; p = so.sinkhorn(torch.randn(3, 5, 5, \
      device='cuda'), steps=3); torch.cuda.synchronize(); assert p.isfinite().all()" \
      >>"$OUT/build.log" 2>&1; then  # the kernels load and run on this card
    prebuilt=yes
    echo "build rc=0 0s (prebuilt: $(head -1 .prebuilt/build_info.txt 2>/dev/null))" >>"$SUMMARY"
  else
    rm -f sinkhorn_ops/_C*.so
    echo "### prebuilt extension not used (stamp differs or it does not import): building" \
      >>"$OUT/build.log"
  fi
fi
if [ -z "$prebuilt" ]; then
  step build "$OUT/build.log" "${T_BUILD:-200}" \
    env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 SINKHORN_FORCE_CUDA=1 \
    python setup.py build_ext --inplace
fi
# Without the extension nothing below can run: stop at once and show why, so that a lease is not
# spent on steps that fail on import.
if ! ls sinkhorn_ops/_C*.so >/dev/null 2>&1 || ! grep -q "^build rc=0 " "$SUMMARY"; then
  grep -E "error|Error" "$OUT/build.log" | head -40
  tail -40 "$OUT/build.log"
  cat "$SUMMARY"
  exit 1
fi
# The first H100 run's open crash (segmentation faults in test_bad_argument on CUDA): which test,
# whether the CPU cases crash too, and a native backtrace (crash_probe.sh).
step crash_probe "$OUT/tests.log" "${T_CRASH_PROBE:-60}" bash benchmarks/crash_probe.sh
# The H200 run found it: every C++ ValueError crashed, every TypeError did not. Which paths crash
# (below the autograd key, another op, a one-op extension built there with and without our
# flags; exception_probe.py).
step exception_probe "$OUT/tests.log" "${T_EXCEPTION_PROBE:-100}" \
  python benchmarks/exception_probe.py --inline
# Twelve workers: the CUDA tests are many small cases, and the torch.compile ones spend their time
# compiling on the CPU. --timeout: a hung test fails alone instead of eating the step. -v: each
# test's outcome is logged as it ends, so a step cut short still says which test failed.
PYTEST_EXTRA=()
python -c 'import xdist' 2>/dev/null && PYTEST_EXTRA+=(-n 12)
python -c 'import pytest_timeout' 2>/dev/null && PYTEST_EXTRA+=(--timeout 90)
# SINKHORN_FAILURE_LOG (tests/conftest.py): each failure's traceback is written as it happens,
# so a step cut by its limit still says why (both earlier runs lost theirs).
step tests "$OUT/tests.log" "${T_TESTS:-200}" env SINKHORN_FAILURE_LOG="$OUT/failures.log" \
  python -m pytest tests -v -k "cuda and not emulated" -p no:cacheprovider --tb=short -rfE \
  "${PYTEST_EXTRA[@]}"
# The CUDA-graph tests again with the cooperative kernels forced (SINKHORN_CUDA_LOOP=device, the
# large forward's device loop; SINKHORN_CUDA_CG=device, the implicit backward's CG: a failed
# launch raises instead of falling back), so that a pass shows that they launched, also inside a
# capture.
step graphs_device_loop "$OUT/tests.log" "${T_GRAPHS:-60}" env SINKHORN_CUDA_LOOP=device \
  SINKHORN_CUDA_CG=device \
  SINKHORN_FAILURE_LOG="$OUT/failures.log" python -m pytest tests/test_cuda_graphs.py -v \
  -p no:cacheprovider --tb=short -rfE
# --error-exitcode: a reported hazard fails the step even though the script itself exits 0.
# No caching allocator under memcheck, so that an overrun of one tensor is not hidden inside a
# larger cached block. SINKHORN_CUDA_FUSED=1: the 1024 x 1100 case then takes the opt-in fused
# iteration (large_fused.cuh), the other large cases the default unfused one.
step memcheck "$OUT/sanitizer.log" "${T_SANITIZER:-45}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
  SINKHORN_CUDA_FUSED=1 "$SANITIZER" --tool memcheck --error-exitcode 1 \
  python benchmarks/sanitizer_case.py
step racecheck "$OUT/sanitizer.log" "${T_RACECHECK:-40}" env SINKHORN_CUDA_FUSED=1 \
  "$SANITIZER" --tool racecheck --error-exitcode 1 python benchmarks/sanitizer_case.py
# Where the time goes (kernels against wall time, the top kernels) for one case of each path.
step profile "$OUT/bench.log" "${T_PROFILE:-30}" \
  python benchmarks/profile_cuda.py --out "$OUT"
step profile_large "$OUT/bench.log" "${T_PROFILE:-30}" env SINKHORN_CUDA_FORWARD=large \
  python benchmarks/profile_cuda.py --out "$OUT" --tag large
# The tiny and mHC backwards' histories in local arrays, as before the H200 run: the A/B of the
# shared-memory histories, on the profile's 4 x 4 cases.
step profile_local_history "$OUT/bench.log" "${T_PROFILE:-30}" env SINKHORN_CUDA_HISTORY=local \
  python benchmarks/profile_cuda.py --out "$OUT" --tag local_history --only "1M x 4x4"
# Benchmarks in order of importance; each writes its table after every case.
# Host time of a differentiated call (the autograd now registered in C++): about 10 s.
step bench_overhead "$OUT/bench.log" "${T_BENCH_OVERHEAD:-20}" \
  python benchmarks/bench_host_overhead.py --device cuda --out "$OUT"
step bench_mhc "$OUT/bench.log" "${T_BENCH_MHC:-60}" \
  python benchmarks/bench_mhc.py --device cuda --quick --out "$OUT"
step bench_large "$OUT/bench.log" "${T_BENCH_LARGE:-45}" \
  python benchmarks/bench_large_ot.py --device cuda --out "$OUT"
step bench_fused "$OUT/bench.log" "${T_BENCH_FUSED:-20}" env SINKHORN_CUDA_FUSED=1 \
  python benchmarks/bench_large_ot.py --device cuda --sizes 8192 --no-pot --out "$OUT"
# The fused iteration's kernels (row_col_kernel, the merge) against the unfused profile's.
step profile_fused "$OUT/bench.log" "${T_PROFILE_FUSED:-15}" env SINKHORN_CUDA_FUSED=1 \
  python benchmarks/profile_cuda.py --out "$OUT" --tag fused --only "large fwd 1x8192"
# The stream mixings alone (16-byte chunks a lane since e84b135) against eager, torch.compile
# and a copy: 8 cases, each with a compilation.
step bench_mhc_mix "$OUT/bench.log" "${T_BENCH_MHC_MIX:-60}" \
  python benchmarks/bench_mhc_mix.py --device cuda --quick --out "$OUT"
# The large path's host loop for solves with tol (the device loop's A/B): 2048^2, where the
# launches after the stop cost the most against the solve.
step bench_hostloop "$OUT/bench.log" "${T_BENCH_HOSTLOOP:-20}" env SINKHORN_CUDA_LOOP=host \
  python benchmarks/bench_large_ot.py --device cuda --sizes 2048 --no-pot --out "$OUT"
step bench "$OUT/bench.log" "${T_BENCH:-45}" \
  python benchmarks/bench_forward.py --device cuda --quick --out "$OUT"
step bench_backward "$OUT/bench.log" "${T_BENCH_BACKWARD:-30}" \
  python benchmarks/bench_backward.py --device cuda --quick --out "$OUT"
step bench_attention "$OUT/bench.log" "${T_BENCH_ATTENTION:-20}" \
  python benchmarks/bench_attention.py --device cuda --quick --out "$OUT"
# Second order (a Hessian-vector product) against autograd through the eager loop: all cases.
step bench_second_order "$OUT/bench.log" "${T_BENCH_SECOND_ORDER:-20}" \
  python benchmarks/bench_second_order.py --device cuda --out "$OUT"
# Per-sample gradients of the mHC layer (vmap of grad) against the layer in PyTorch ops.
step bench_per_sample_mhc "$OUT/bench.log" "${T_BENCH_PER_SAMPLE:-15}" \
  python benchmarks/bench_per_sample_mhc.py --device cuda --quick --out "$OUT"

# The runner returns at most 8 files: pack anything beyond the expected set into one archive.
files=$(find "$OUT" -type f | wc -l)
if [ "$files" -gt 8 ]; then
  (cd "$OUT" && find . -type f ! -name env.txt ! -name build.log ! -name tests.log \
    ! -name sanitizer.log ! -name bench.log ! -name summary.txt ! -name failures.log -print0 |
    tar --null --remove-files -czf extra.tar.gz -T - && find . -type d -empty -delete)
  echo "packed $((files - 7)) extra files into extra.tar.gz" >>"$SUMMARY"
fi
cat "$SUMMARY"
