#!/usr/bin/env bash
# Pinpoints a test that kills its process (the first H100 run: segmentation faults inside the
# operator's call in tests/test_bad_input.py::test_bad_argument on CUDA, 6 and 16 times in two
# runs under pytest-xdist, which names no test when a worker dies). Runs FILE's tests one process
# for the whole file, verbose, so the last "tests/...::name" line before a crash names the test;
# then reruns that one test under cuda-gdb (which also debugs host code) for a native backtrace.
#
#   bash benchmarks/crash_probe.sh [FILE] [PYTEST -k EXPRESSION]   # from gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
FILE="${1:-tests/test_bad_input.py}"
EXPR="${2:-}"
LOG="$(mktemp)"
python -X faulthandler -m pytest "$FILE" -v -p no:cacheprovider -p no:xdist --tb=line \
  ${EXPR:+-k "$EXPR"} >"$LOG" 2>&1
rc=$?
ran=$(grep -E "PASSED|FAILED|ERROR" "$LOG" | grep -c "::")
echo "tests run (not skipped): $ran"
grep -E "FAILED|ERROR" "$LOG" | head -20
if [ "$rc" -lt 128 ] && ! grep -q "Fatal Python error" "$LOG"; then
  echo "crash_probe: no crash in $FILE (pytest rc=$rc)"
  tail -3 "$LOG"
  exit "$rc"
fi
# The test running at the crash: verbose mode prints its node id (which can hold spaces, e.g.
# "[cpu-row-(3, 4, 4)-nan]") before its outcome, or before the fault handler's report.
last=$(grep -E "^$FILE::" "$LOG" | tail -1 |
  sed -E 's/ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS|Fatal Python error).*$//')
echo "crash_probe: the process died (rc=$rc) in: ${last:-unknown}"
grep -A12 "Fatal Python error" "$LOG" | head -30
GDB="$(command -v cuda-gdb || echo /usr/local/cuda/bin/cuda-gdb)"
# No timeout of its own: a nested timeout would leave the process group that the caller's
# timeout (gpu_check.sh's step limit) kills; what is printed above is already in the log.
if [ -n "$last" ] && [ -x "$GDB" ]; then
  # The innermost frames only: the H200 run's "bt" plus "info sharedlibrary" under a tail cut
  # them off. A frame in a library is named with that library's path.
  "$GDB" -q -batch -ex "set pagination off" -ex run -ex "bt 30" \
    --args python -m pytest "$last" -q -p no:cacheprovider -p no:xdist 2>&1 |
    grep -vE "^\[New Thread|^\[Thread .* exited|^\[Detaching" | tail -60
fi
exit 1
